"""Where the M=1 GEMV's time goes: diagnostic variants of ``gptq_gemv_kernel``, made by source edits, timed beside
bf16 cuBLAS and tinygemm at the 7B decode shapes, with the launcher's configs overridden.

    PYTHONPATH=. python benchmarks/gemv_probe.py --out DIR --plan '[["base", {}], ["memw", {}], ["memw_nored", {}]]'

Variants (never shipped; each edit asserts the line it replaces, so a kernel change breaks the probe loudly):
  base        the kernel as it is
  nog         no ``g_idx`` check in the K loop (its cost)
  memw        weights, scales and zeros streamed as the kernel does, no dequant arithmetic (x still comes in with
              the weights, 16 bytes a word row from L1): the memory floor of this loop structure
  memw_nored  memw without the split-K reduce (partials stored; no atomic counter, no last-program reduction)
  tiled       each (8 word rows x BLOCK_N columns) tile read from one contiguous block instead of 8 rows N words
              apart: what a tile-major repacked weight layout would buy (the result is wrong, the bytes the same)
  memw_tiled  memw with tiled's addressing
  relaxed     the split-K arrival counter without its acquire/release fences (wrong in principle): their cost
  arrive_only the counter as shipped, but the last split writes its own sums (no partial-sum loads): their cost
  unroll      the last split's partial-sum loop unrolled 4x, so its loads can be in flight together
  file:PATH   a whole kernel module (a candidate kernel: same ``gptq_gemv_kernel`` signature, extra constexprs with
              defaults)
A plan entry's config is merged into the launcher's M=1 config (``pick_config``), e.g. ``{"num_warps": 4}``.
Timing and copies as in bench_gptq_matmul.py (CUDA-graph replay over enough weight copies to miss the L2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gptq_matmul import copies_for, random_gptq, rel_err, tinygemm_weight  # noqa: E402
from timing import time_graph  # noqa: E402

from optgptq_compile.lowering import triton_gptq_linear as T  # noqa: E402
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "optgptq_compile", "lowering",
                   "triton_gptq_gemv_kernel.py")
SHAPES = [(11008, 4096), (4096, 11008), (4096, 4096), (12288, 4096), (22016, 4096)]  # up, down, o, qkv, gate-up
G_CHECK = "            bad += ((gk != g) & (offs_k < K)).to(tl.int32)\n"
TILE_CALL = ("            t, xs, sq = _tile(words, xw, ww, x_ptr, nw_ptr, rows, K, half_shift, EVEN_K, X_PAIRS, NORM,"
             " BITS,\n                              PER)  # [BKW, BN], [BKW], [BKW]\n")
ARRIVE = '        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")\n'
SUM_N = "                acc = _sum_splits(part_ptr, N, offs_n, mask_n, splits, REDUCE_ROWS, BLOCK_N)\n"
SUM_LOOP = "    for i0 in range(0, splits, REDUCE_ROWS):\n"
W_ADDR = "    words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask="
# tile (k0 // BLOCK_K, column tile) at its own contiguous BKW * BN words: a permutation of the same buffer
W_TILED = ("    BNW: tl.constexpr = offs_n.shape[0]\n"
           "    words = tl.load(qw_ptr + (k0 // PER) * N + tl.arange(0, BKW)[:, None] * BNW"
           " + (offs_n + offs_n // BNW * ((BKW - 1) * BNW))[None, :], mask=")


def _replace(src: str, old: str, new: str) -> str:
    assert old in src, f"the probe's edit no longer matches the kernel: {old!r}"
    return src.replace(old, new)


VARIANTS = ("base", "nog", "memw", "memw_nored", "relaxed", "arrive_only", "unroll", "tiled", "memw_tiled")


def variant_source(name: str) -> str:
    if name.startswith("file:"):
        return open(name[5:]).read()
    src = open(SRC).read()
    if name == "base":
        return src
    if name == "nog":
        return _replace(src, G_CHECK, "            pass\n")
    if name == "memw":
        src = _replace(src, G_CHECK, "            pass\n")
        return _replace(src, TILE_CALL,
                        "            t = words.to(tl.float32, bitcast=True) + z[None, :].to(tl.float32)\n"
                        "            xs = tl.zeros((BKW,), dtype=tl.float32)\n"
                        "            sq = xs\n")
    if name == "memw_nored":
        return _replace(variant_source("memw"), ARRIVE, "        arrived = -1\n")
    if name == "relaxed":
        return _replace(src, ARRIVE, ARRIVE.replace('sem="acq_rel"', 'sem="relaxed"'))
    if name == "arrive_only":
        return _replace(src, SUM_N, "                pass\n")
    if name == "unroll":
        return _replace(src, SUM_LOOP, SUM_LOOP.replace("REDUCE_ROWS):", "REDUCE_ROWS, loop_unroll_factor=4):")
                        .replace("range(", "tl.range("))
    if name == "tiled":
        return _replace(src, W_ADDR, W_TILED)
    if name == "memw_tiled":
        return _replace(variant_source("memw"), W_ADDR, W_TILED)
    raise KeyError(f"unknown variant {name!r}")


def module_from_source(name: str, src: str):
    """A kernel module made from source text (written to $TMPDIR/<name>.py, so @triton.jit can read it back, and
    registered in sys.modules under ``name``). Shared with wdot_ab.py, which loads another revision's kernel."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # @triton.jit reads the source back through the module
    spec.loader.exec_module(mod)
    return mod


_loaded: dict = {}


def load(name: str):
    if name not in _loaded:
        tag = os.path.splitext(os.path.basename(name))[0] if name.startswith("file:") else name
        _loaded[name] = module_from_source(f"gemv_probe_{tag}", variant_source(name))
    return _loaded[name]


def run(variant: str, cfg: dict, ws, xs):
    mod = load(variant)
    real = T.kernels
    T.kernels = lambda name: mod if name == "triton_gptq_gemv_kernel" else real(name)
    try:
        fns = [lambda w=w, x=x: T.gptq_matmul(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], None, 4, 128,
                                              config=cfg) for w, x in zip(ws, xs)]
        y = fns[0]()
        ref = torch_gptq_linear(xs[0].float(), ws[0]["qweight"], ws[0]["qzeros"], ws[0]["scales"], ws[0]["g_idx"],
                                None, 4)
        return rel_err(y, ref), time_graph(fns)
    finally:
        T.kernels = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan", required=True, help='JSON list of [variant, config overrides]')
    ap.add_argument("--shapes", default=None, help="JSON list of [N, K] (default: the 7B decode shapes)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    plan = json.loads(a.plan)
    shapes = [tuple(s) for s in json.loads(a.shapes)] if a.shapes else SHAPES
    base = T.pick_config(1, 11008, 4096, 4, 128)
    results = []
    for n, k in shapes:
        copies = copies_for(n * k // 2)
        ws = [random_gptq(n, k, seed=i) for i in range(copies)]
        xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
        bf16 = time_graph([lambda w=w: F.linear(xs[0], w) for w in dense])
        del dense
        packed = [tinygemm_weight(w, n, k, 128) for w in ws]
        tiny = time_graph([lambda p=p: torch._weight_int4pack_mm(xs[0], p[0], 128, p[1]) for p in packed])
        del packed
        row = dict(shape=f"{n}x{k}", bf16=bf16, tinygemm=tiny)
        print(f"{n}x{k}: bf16 {bf16:.1f} us, tinygemm {tiny:.1f} us", flush=True)
        for variant, overrides in plan:
            cfg = {**base, "SPLIT_K": 0, **overrides}
            err, us = run(variant, cfg, ws, xs)  # memw variants compute nothing meaningful: their error is not
            results.append(dict(**row, variant=variant, cfg=overrides, us=us, rel_err=err))  # a check
            print(f"  {variant:10s} {json.dumps(overrides):60s} {us:6.1f} us  x{bf16 / us:.2f} bf16  "
                  f"x{tiny / us:.2f} tinygemm  err {err:.1e}", flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "gemv_probe.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
