"""Batch-1 paged decode at the e2e benchmark's shape: tiles x warps x KV splits, timed beside the launcher's choice.

    PYTHONPATH=. python benchmarks/paged_decode_probe.py [--out DIR]
    PYTHONPATH=. python benchmarks/paged_decode_probe.py --grid '{"bn128w8": {"BLOCK_N": 128, "num_warps": 8}}'

``--grid``: instead, batch 1/8/32/64 x contexts (full tables of 512/2048/4096 tokens, and the e2e batch-1/8 shape
of 600 in 640) with the launcher's choice and each named override of ``pick_config`` (splits recomputed by the
launcher's rule for the overridden tile), every config checked against the reference.

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


def grid(overrides: dict) -> list:
    results = []
    for b, ctx_len, width in ((1, 600, 640), (8, 600, 640), (1, 4096, 4096), (8, 2048, 2048), (32, 512, 512),
                              (32, 4096, 4096), (64, 2048, 2048)):
        case = B.Case(b, width, B.copies_for(2 * b * width * B.HKV * B.D * 2))
        case.ctx.fill_(ctx_len)
        picked = P.pick_config(b, B.HKV, 1, B.HQ // B.HKV, B.D, width, torch.float16, num_sms=B._sms())
        ref = torch_paged_attention(case.q, *case.pools[0], case.tables, case.ctx, None, True, case.scale)
        for name, over in {"launcher": {}, **overrides}.items():
            cfg = {**picked, **over}
            if "SPLITS" not in over:  # the launcher's split rule for this tile
                per_sequence = B.HKV * -(-(B.HQ // B.HKV) // cfg["BLOCK_M"])
                cfg["SPLITS"] = P.num_splits(b * per_sequence, per_sequence, width, cfg["BLOCK_N"], B._sms())
            fns = [lambda k=k, v=v, c=case, cfg=cfg: P.paged_attention_fwd(c.q, k, v, c.tables, c.ctx, None, True,
                                                                           c.scale, config=cfg) for k, v in case.pools]
            err = B.rel_err(fns[0](), ref)
            assert err < 2e-3, (cfg, err)
            us = time_graph(fns)
            results.append(dict(batch=b, context=ctx_len, width=width, name=name, cfg=cfg, us=us, rel_err=err))
            print(f"B={b:3d} {ctx_len:5d} in {width:5d}  {name:12s} {json.dumps(cfg):110s} {us:7.2f} us", flush=True)
        del case
        torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--grid", type=json.loads, default=None, help="name -> pick_config overrides, as JSON")
    a = ap.parse_args()
    if a.grid is not None:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "paged_decode_grid.json"), "w") as f:
            json.dump(grid(a.grid), f, indent=1)
        return
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
