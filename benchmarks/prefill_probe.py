"""Prefill's GPTQ matmul (M >= DEQUANT_MIN_M): dequantize + cuBLAS, configs of the dequant kernel and of the
chunked path, beside bf16 cuBLAS in the same run.

    PYTHONPATH=. python benchmarks/prefill_probe.py [--ms 256,2048] [--plan JSON] [--old-kernel FILE] [--out DIR]

``--plan``: a JSON object name -> overrides of the launcher's dequant config (``pick_config`` at each M): BLOCK_K,
BLOCK_N, num_warps, and CHUNK_N (columns per dequant + GEMM round through one reused buffer; 0: the whole weight at
once), or another kernel's whole config (``"KERNEL": "wdot"`` with its block sizes, warps, stages and SPLIT_K).
For each shape and M: bf16 ``F.linear`` on a dense weight, the dequant kernel alone per config (its bytes against
the 3.0 TB/s floor: packed weight + scales read, bf16 weight written), and the whole op per config, each result
checked against the fp32 reference. ``--old-kernel`` times a previous ``gptq_dequant_kernel`` (a module file
with the old signature ``(qw, qz, s, g, w, N, K, ZW, BITS, BLOCK_K, BLOCK_N)``) + ``torch.mm`` as a row too.
Timing: ``timing.time_graph`` over enough weight copies to miss the L2. Writes ``prefill_probe.json``.
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
from bench_gptq_matmul import copies_for, random_gptq, rel_err  # noqa: E402
from timing import time_graph  # noqa: E402

from optgptq_compile.lowering import triton_gptq_linear as T  # noqa: E402
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear  # noqa: E402

SHAPES = {"up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008), "qkvo 4096x4096": (4096, 4096)}
BW = 3.0e12
PLAN = {"shipped": {}}


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("old_dequant_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # @triton.jit reads the source back through the module
    spec.loader.exec_module(mod)
    return mod


def dequant_only(w, buf, cfg, bits=4, group=128):
    """The dequant kernel alone, the whole weight into buf [K, N]."""
    T.dequant_columns(buf, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], bits, group, 0, cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="256,2048")
    ap.add_argument("--plan", type=json.loads, default=PLAN, help="name -> dequant config overrides, as JSON")
    ap.add_argument("--old-kernel", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    old = load_module(a.old_kernel) if a.old_kernel else None
    rows = []
    for label, (n, k) in SHAPES.items():
        copies = copies_for(n * k // 2)
        ws = [random_gptq(n, k, seed=i) for i in range(copies)]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
        base = T.pick_config(2048, n, k, 4, 128)
        buf = torch.empty(k, n, device="cuda", dtype=torch.bfloat16)
        floor = (n * k // 2 + n * k // 128 * 2 + 2 * n * k) / BW * 1e6  # packed + scales read, bf16 written
        for name, over in a.plan.items():
            if "CHUNK_N" in over or over.get("KERNEL", "dequant") != "dequant":  # chunks: the same kernel
                continue
            cfg = {**base, **over}
            us = time_graph([lambda w=w, c=cfg: dequant_only(w, buf, c) for w in ws])
            rows.append(dict(shape=label, m=0, variant=name, cfg=cfg, us=us, floor_us=floor))
            print(f"{label} dequant alone {name} {json.dumps(over)}: {us:.1f} us (floor {floor:.1f}, "
                  f"{floor / us * 3.0:.2f} TB/s)", flush=True)
        if old is not None:
            def old_dequant(w):
                old.gptq_dequant_kernel[(k // 128, -(-n // 64))](w["qweight"], w["qzeros"], w["scales"], w["g_idx"],
                                                                 buf, n, k, w["qzeros"].shape[1], BITS=4, BLOCK_K=128,
                                                                 BLOCK_N=64, num_warps=4, num_stages=1)
            us = time_graph([lambda w=w: old_dequant(w) for w in ws])
            rows.append(dict(shape=label, m=0, variant="old", us=us, floor_us=floor))
            print(f"{label} dequant alone old: {us:.1f} us", flush=True)
        for m in (int(v) for v in a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = time_graph([lambda d=d: F.linear(x, d) for d in dense])
            ref = torch_gptq_linear(x.float(), ws[0]["qweight"], ws[0]["qzeros"], ws[0]["scales"].float(),
                                    ws[0]["g_idx"], None, 4)
            print(f"{label} M={m}: bf16 {bf16:.1f} us", flush=True)
            rows.append(dict(shape=label, m=m, variant="bf16", us=bf16))
            for name, over in a.plan.items():
                cfg = {**T.pick_config(m, n, k, 4, 128), **over}
                fns = [lambda w=w, c=cfg: T.gptq_matmul(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], None,
                                                        4, 128, config=c) for w in ws]
                err = rel_err(fns[0](), ref)
                us = time_graph(fns)
                rows.append(dict(shape=label, m=m, variant=name, cfg=cfg, us=us, x_bf16=bf16 / us, rel_err=err))
                print(f"  {name:12s} {json.dumps(over):50s} {us:7.1f} us  x{bf16 / us:.3f} bf16  err {err:.1e}"
                      f"{'' if err < 1e-2 else '  WRONG'}", flush=True)
            if old is not None:
                def old_path(w):
                    old_dequant(w)
                    return torch.mm(x, buf)
                us = time_graph([lambda w=w: old_path(w) for w in ws])
                rows.append(dict(shape=label, m=m, variant="old", us=us, x_bf16=bf16 / us))
                print(f"  {'old':12s} {'':50s} {us:7.1f} us  x{bf16 / us:.3f} bf16", flush=True)
        ws = dense = buf = None  # free this shape's copies before the next
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "prefill_probe.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if any(r.get("rel_err", 0) >= 1e-2 for r in rows):
        sys.exit("a result disagrees with the reference")


if __name__ == "__main__":
    main()
