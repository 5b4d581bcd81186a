"""Decode-batch GPTQ matmul (M = 2..64, ``gptq_dot_kernel``) configs timed beside bf16 cuBLAS and tinygemm at the 7B
decode shapes: the probe behind ``pick_config``'s wdot branch (session 6: half-word vs word dequant, tiles, stages).

    PYTHONPATH=. python benchmarks/wdot_probe.py --out DIR --plan PLAN.json [--ms '[4, 16]'] [--shapes '[[N, K]]']

PLAN is a JSON list (inline or a file) of ``[label, overrides, ms]``: ``overrides`` are merged into the launcher's
config for each M (``pick_config``; e.g. ``{"MAGIC16": 0}`` forces the word dequant, ``{"BLOCK_N": 256}``), ``ms``
limits the entry to those M (empty: every M). Each entry's output is checked against the reference (``err``).
Timing as in bench_gptq_matmul.py (CUDA-graph replay over enough weight copies to miss the L2). Writes
``wdot_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gptq_matmul import copies_for, random_gptq, tinygemm_weight  # noqa: E402
from gemv_probe import SHAPES, run  # noqa: E402  (run's "base" variant is the in-tree kernels, any config)
from timing import time_graph  # noqa: E402

from optgptq_compile.lowering import triton_gptq_linear as T  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan", required=True, help="JSON list of [label, config overrides, ms], or a file of it")
    ap.add_argument("--shapes", default=None, help="JSON list of [N, K] (default: the 7B decode shapes)")
    ap.add_argument("--ms", default="[4, 16]")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    plan = json.load(open(a.plan)) if os.path.exists(a.plan) else json.loads(a.plan)
    shapes = [tuple(s) for s in json.loads(a.shapes)] if a.shapes else SHAPES
    results = []
    for n, k in shapes:
        copies = copies_for(n * k // 2)
        ws = [random_gptq(n, k, seed=i) for i in range(copies)]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
        packed = [tinygemm_weight(w, n, k, 128) for w in ws]
        for m in json.loads(a.ms):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            bf16 = time_graph([lambda w=w: F.linear(xs[0], w) for w in dense])
            tiny = time_graph([lambda p=p: torch._weight_int4pack_mm(xs[0], p[0], 128, p[1]) for p in packed])
            row = dict(shape=f"{n}x{k}", m=m, bf16=bf16, tinygemm=tiny)
            print(f"{n}x{k} M={m}: bf16 {bf16:.1f} us, tinygemm {tiny:.1f} us", flush=True)
            for label, overrides, ms in plan:
                if ms and m not in ms:
                    continue
                cfg = {**T.pick_config(m, n, k, 4, 128), "SPLIT_K": 0, **overrides}
                err, us = run("base", cfg, ws, xs)
                results.append(dict(**row, label=label, cfg=overrides, us=us, rel_err=err))
                print(f"  {label:24s} {json.dumps(overrides):60s} {us:6.1f} us  x{bf16 / us:.2f} bf16  "
                      f"x{tiny / us:.2f} tinygemm  err {err:.1e}", flush=True)
        del dense, packed
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "wdot_probe.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
