"""Sibling projections as separate GPTQ calls vs one fused call (what the ``fuse_projections`` pass does).

    PYTHONPATH=. python benchmarks/bench_fuse_projections.py [--out DIR]     # H100: about a minute
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/bench_fuse_projections.py --smoke   # CPU: the script runs

For Llama-2-7B (q/k/v 3 x 4096, gate/up 2 x 11008) and Llama-3-8B (GQA 32/8: q/k/v 4096 + 1024 + 1024, gate/up
2 x 14336) shapes, int4 g128, M = 1 / 4 / 16 (decode batches) and 512 (a prefill: fusion must not hurt there):
``separate`` = one ``optgptq::gptq_linear_triton`` call per projection; ``fused`` = one call over the weights
concatenated along N (``quant.format.concat_out_features``, as the pass builds them) followed by the split the pass
inserts (views: no copy). Timing as in bench_gptq_matmul.py: the median of a CUDA graph replaying 20 rounds (decode
steps run as CUDA graphs), cycling over enough weight copies to exceed the 50 MB L2, divided by 20; ``eager``
columns time Python launches at M = 1. ``floor`` = bytes of weights + activations / 3.0 TB/s. Before timing, the
fused outputs are checked against the separate ones (they compute the same columns: equal up to split-K order).
Writes ``bench_fuse_projections.json`` and ``bench_fuse_projections.md`` to ``--out`` (default $OUT or .).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gptq_matmul import BW, copies_for, rel_err, time_eager, time_graph  # noqa: E402

from optgptq_compile.lowering import triton_gptq_linear  # noqa: E402,F401  (registers gptq_linear_triton)
from optgptq_compile.quant.format import GPTQWeight, concat_out_features  # noqa: E402

GROUPS = {  # name -> (output features of each sibling, K)
    "7B qkv 3x4096": ([4096, 4096, 4096], 4096),
    "7B gate/up 2x11008": ([11008, 11008], 4096),
    "8B qkv 4096+1024+1024": ([4096, 1024, 1024], 4096),
    "8B gate/up 2x14336": ([14336, 14336], 4096),
}
MS = (1, 4, 16, 512)
BITS, GROUP = 4, 128
SMOKE_GROUPS = {"tiny qkv 64+32+32": ([64, 32, 32], 128), "tiny gate/up 2x96": ([96, 96], 128)}


def _random_weight(n: int, k: int, dtype, device, seed: int) -> GPTQWeight:
    """Random packed weights (every bit pattern is a valid GPTQ value), scales ~ 1/(16 * sqrt(K)), g_idx k // group."""
    g = torch.Generator(device=device).manual_seed(seed)
    groups = -(-k // GROUP)
    words = dict(generator=g, device=device, dtype=torch.int32)
    qweight = torch.randint(-2**31, 2**31 - 1, (k * BITS // 32, n), **words)  # [K*bits/32, N]
    qzeros = torch.randint(-2**31, 2**31 - 1, (groups, n * BITS // 32), **words)  # [G, N*bits/32]
    scales = (torch.rand(groups, n, generator=g, device=device) + 0.5).mul(2.0 / (2**BITS * math.sqrt(k)))
    g_idx = (torch.arange(k, device=device) // GROUP).to(torch.int32)  # [K]
    return GPTQWeight(qweight, qzeros, scales.to(dtype), g_idx, BITS, GROUP)


def _call(x, w: GPTQWeight):
    return torch.ops.optgptq.gptq_linear_triton(x, w.qweight, w.qzeros, w.scales, w.g_idx, None, w.bits,
                                                w.group_size)


def _copy_set(sizes: list[int], k: int, seed: int, dtype, device) -> tuple[list[GPTQWeight], GPTQWeight]:
    """One layer's siblings (random packed weights) and their fused form."""
    parts = [_random_weight(n, k, dtype, device, seed * 16 + i) for i, n in enumerate(sizes)]
    return parts, concat_out_features(parts)


def run_group(name: str, sizes: list[int], k: int, m: int, smoke: bool) -> dict:
    dtype = torch.float16 if smoke else torch.bfloat16  # the interpreter's bf16 dot is wrong in triton 3.9
    device = "cpu" if smoke else "cuda"
    n = sum(sizes)
    wbytes = k * n * BITS / 8 + (k // GROUP) * n * 2 * (1 + BITS / 16)  # packed ints + scales + zeros
    ncopy = 1 if smoke else copies_for(wbytes)
    sets = [_copy_set(sizes, k, i, dtype, device) for i in range(ncopy)]
    x = torch.randn(m, k, device=device, dtype=dtype)
    parts, fused = sets[0]
    separate_out = torch.cat([_call(x, w) for w in parts], dim=-1)
    fused_out = _call(x, fused)
    err = rel_err(fused_out, separate_out)
    assert err < 5e-3, (name, m, err)
    assert [p.shape[-1] for p in torch.split(fused_out, sizes, dim=-1)] == sizes
    row = dict(group=name, m=m, n=n, k=k, calls=len(sizes), fused_vs_separate_rel_err=err,
               floor_us=(wbytes + 2 * m * (k + n)) / BW * 1e6)
    if smoke:
        return row
    separate = [lambda ps=ps: [_call(x, w) for w in ps] for ps, _ in sets]
    fused_fns = [lambda f=f: torch.split(_call(x, f), sizes, dim=-1) for _, f in sets]
    row["separate_us"] = time_graph(separate)
    row["fused_us"] = time_graph(fused_fns)
    row["speedup"] = row["separate_us"] / row["fused_us"]
    if m == 1:
        row["separate_eager_us"] = time_eager(separate)
        row["fused_eager_us"] = time_eager(fused_fns)
    del sets
    torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| group | M | separate (us) | fused (us) | speedup | floor (us) | eager sep / fused (us, M=1) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        eager = f"{r['separate_eager_us']:.1f} / {r['fused_eager_us']:.1f}" if "fused_eager_us" in r else ""
        lines.append(f"| {r['group']} | {r['m']} | {r.get('separate_us', math.nan):.1f} | "
                     f"{r.get('fused_us', math.nan):.1f} | {r.get('speedup', math.nan):.2f}x | {r['floor_us']:.1f} | "
                     f"{eager} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), no timing")
    a = ap.parse_args()
    if not a.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA/ROCm GPU (or --smoke with TRITON_INTERPRET=1)")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    groups, ms = (SMOKE_GROUPS, (1, 5)) if a.smoke else (GROUPS, MS)
    info = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    print(info, flush=True)
    rows = []
    for (name, (sizes, k)), m in itertools.product(groups.items(), ms):
        rows.append(run_group(name, sizes, k, m, a.smoke))
        r = rows[-1]
        print(f"{name:24s} M={m:4d} separate {r.get('separate_us', math.nan):7.1f} us  fused "
              f"{r.get('fused_us', math.nan):7.1f} us  x{r.get('speedup', math.nan):4.2f}  floor {r['floor_us']:6.1f}"
              f"  err {r['fused_vs_separate_rel_err']:.1e}", flush=True)
        with open(os.path.join(a.out, "bench_fuse_projections.json"), "w") as f:  # kept if a time limit hits
            json.dump(dict(info=info, rows=rows), f, indent=1)
    with open(os.path.join(a.out, "bench_fuse_projections.md"), "w") as f:
        f.write(f"Fused vs separate sibling projections, int4 g{GROUP}, {info['device']}\n\n" + markdown(rows))
    print(markdown(rows))
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
