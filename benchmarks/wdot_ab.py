"""Same-run A/B of the decode-batch GPTQ matmul (M = 2..16): another revision's ``triton_gptq_linear_kernel.py``
with its launcher config against the working tree's kernel and ``pick_config``, beside bf16 cuBLAS and tinygemm.

    git show REV:optgptq_compile/lowering/triton_gptq_linear_kernel.py > /tmp/old_kernel.py
    PYTHONPATH=. python benchmarks/wdot_ab.py --old-kernel /tmp/old_kernel.py --old-config CONFIG.json \\
        [--ms '[2, 4, 8, 16]'] [--dtype bf16|fp16] [--out DIR]

CONFIG is a JSON object (inline or a file) of launcher configs for the old kernel: ``{"default": {...}}`` and
optional entries keyed by N (as a string) for shapes that used another config. Session 18 (RESULTS.md) compared
108ed8a's kernel with ``{"default": {"KERNEL": "wdot", "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4,
"num_stages": 3, "SPLIT_K": 0}, "12288": {... "BLOCK_N": 256 ...}, "22016": {... "BLOCK_N": 256 ...}}``. Both sides
run through this tree's launcher (``gptq_matmul``), so only the kernel module and the config differ. Every output
is checked against the reference. Timing as in bench_gptq_matmul.py. Writes ``wdot_ab_{dtype}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gptq_matmul import copies_for, random_gptq, rel_err, tinygemm_weight  # noqa: E402
from gemv_probe import SHAPES, module_from_source  # noqa: E402
from timing import time_graph  # noqa: E402

from optgptq_compile.lowering import triton_gptq_linear as T  # noqa: E402
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear  # noqa: E402


def load_kernel_module(path: str):
    """The other revision's kernel module, its relative import made absolute (it is loaded from outside the
    package)."""
    src = open(path).read().replace("from .triton_utils import", "from optgptq_compile.lowering.triton_utils import")
    return module_from_source("wdot_ab_old_kernel", src)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-kernel", required=True, help="another revision's triton_gptq_linear_kernel.py")
    ap.add_argument("--old-config", required=True, help='JSON {"default": config, "N": config, ...} or a file of it')
    ap.add_argument("--ms", default="[2, 4, 8, 16]")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    old = load_kernel_module(a.old_kernel)
    configs = json.load(open(a.old_config)) if os.path.exists(a.old_config) else json.loads(a.old_config)
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[a.dtype]
    rows = []
    for n, k in SHAPES:
        copies = copies_for(n * k // 2)
        ws = [random_gptq(n, k, dtype=dtype, seed=i) for i in range(copies)]
        dense = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(copies_for(2 * n * k))]
        packed = [tinygemm_weight(w, n, k, 128) for w in ws] if dtype == torch.bfloat16 else None  # bf16 only
        old_cfg = configs.get(str(n), configs["default"])
        for m in json.loads(a.ms):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = torch_gptq_linear(x.float(), ws[0]["qweight"], ws[0]["qzeros"], ws[0]["scales"], ws[0]["g_idx"],
                                    None, 4)
            dense_us = time_graph([lambda w=w: F.linear(x, w) for w in dense])
            tiny = time_graph([lambda p=p: torch._weight_int4pack_mm(x, p[0], 128, p[1]) for p in packed]) \
                if packed else None
            new = [lambda w=w: T.gptq_matmul(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], None, 4, 128)
                   for w in ws]
            new_err, new_us = rel_err(new[0](), ref), time_graph(new)
            real = T.kernels
            T.kernels = lambda name: old if name == "triton_gptq_linear_kernel" else real(name)
            try:
                fns = [lambda w=w: T.gptq_matmul(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], None, 4,
                                                 128, config=old_cfg) for w in ws]
                old_err, old_us = rel_err(fns[0](), ref), time_graph(fns)
            finally:
                T.kernels = real
            rows.append(dict(shape=f"{n}x{k}", m=m, dtype=a.dtype, dense=dense_us, tinygemm=tiny, old=old_us,
                             new=new_us, old_err=old_err, new_err=new_err, new_config=T.pick_config(m, n, k, 4, 128)))
            print(f"{n}x{k} M={m}: dense {dense_us:.1f} tinygemm {tiny or 0:.1f} | old {old_us:.1f} "
                  f"(x{dense_us / old_us:.2f}) new {new_us:.1f} (x{dense_us / new_us:.2f}) old/new "
                  f"{old_us / new_us:.2f} | err {old_err:.1e} {new_err:.1e}", flush=True)
        del ws, dense, packed
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, f"wdot_ab_{a.dtype}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
