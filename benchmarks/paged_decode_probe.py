"""Batch-1 paged decode at the e2e benchmark's shape: tiles x warps x KV splits, timed beside the launcher's choice.

    PYTHONPATH=. python benchmarks/paged_decode_probe.py [--out DIR]

GQA 32/8, head 128, fp16, block 16; one sequence of 600 tokens in a 640-token block table (a 512-token prompt
with 128 new tokens: the batch-1 decode of benchmarks/e2e.py) and 2000 in 2048. The number of splits is chosen
from the table width (CUDA-graph safe), so splits past the context exit at once. Every config is checked against
``torch_paged_attention``; timing as in bench_paged_attention.py (CUDA-graph replay over enough pool copies to
miss the L2). Writes paged_decode_probe.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_paged_attention as B  # noqa: E402
from timing import time_graph  # noqa: E402

from optgptq_compile.lowering import triton_paged_attention as P  # noqa: E402
from optgptq_compile.lowering.paged_attention import torch_paged_attention  # noqa: E402


def plan(width: int) -> list:
    out = [None]  # the launcher's choice
    for bn in (16, 32, 64):
        for splits in (5, 10, 20, 40, 80):
            if splits * bn <= 2 * width:
                for warps in (4, 2):
                    out.append(dict(BLOCK_M=16, BLOCK_N=bn, num_warps=warps,
                                    num_stages=3 if bn * splits < width else 2, SPLITS=splits))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    results = []
    for ctx_len, width in ((600, 640), (2000, 2048)):
        case = B.Case(1, width, B.copies_for(2 * width * B.HKV * B.D * 2))
        case.ctx.fill_(ctx_len)
        picked = P.pick_config(1, B.HKV, 1, B.HQ // B.HKV, B.D, width, torch.float16, num_sms=B._sms())
        print(f"context {ctx_len} in {width}: launcher {picked}", flush=True)
        ref = torch_paged_attention(case.q, *case.pools[0], case.tables, case.ctx, None, True, case.scale)
        for cfg in plan(width):
            fns = [lambda k=k, v=v: P.paged_attention_fwd(case.q, k, v, case.tables, case.ctx, None, True, case.scale,
                                                          config=cfg) for k, v in case.pools]
            err = B.rel_err(fns[0](), ref)
            assert err < 2e-3, (cfg, err)
            us = time_graph(fns)
            results.append(dict(context=ctx_len, width=width, cfg=cfg or dict(picked=picked), us=us, rel_err=err))
            print(f"  {json.dumps(cfg or 'launcher'):95s} {us:6.2f} us  err {err:.1e}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "paged_decode_probe.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
