"""The M=1 GEMV with the RMSNorm / residual folded in (``gptq_linear_fused``) against the plain GEMV plus the
separate kernels it replaces, at a Llama-2-7B decode layer's four shapes (4-bit g128, bf16).

    PYTHONPATH=. python benchmarks/bench_fused_gemv.py [--out DIR]

Rows per shape: ``plain`` (the GEMV alone, as before), ``fused`` (norm or residual in the kernel), ``plain +
torch`` (the GEMV plus ``F.rms_norm`` -- one fused aten kernel on CUDA -- or the residual add: what the fused kernel
replaces, an upper bound on what Inductor's fused add + norm kernel costs). q/k/v and gate/up take the norm of
their input, o and down the residual. Each fused result is checked against the op's reference. Timing as every
kernel benchmark here (``timing.time_graph``: CUDA-graph replay over enough weight copies to miss the L2). Writes
``bench_fused_gemv.json`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import time_graph  # noqa: E402

from optgptq_compile.lowering import triton_gptq_linear as T  # noqa: E402
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear_fused  # noqa: E402
from optgptq_compile.quant.format import default_g_idx, pack_weight  # noqa: E402

SHAPES = {  # name: (N, K, what is folded in)
    "qkv 12288x4096": (12288, 4096, "norm"),
    "o 4096x4096": (4096, 4096, "residual"),
    "gate/up 22016x4096": (22016, 4096, "norm"),
    "down 4096x11008": (4096, 11008, "residual"),
}


def weights(n, k, seed, device):
    g = torch.Generator().manual_seed(seed)
    groups = k // 128
    q = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.randint(0, 16, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
    w = pack_weight(q, zeros, scales, default_g_idx(k, 128), 4, 128)
    return [t.to(device) for t in (w.qweight, w.qzeros, w.scales, w.g_idx)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for name, (n, k, extra) in SHAPES.items():
        copies = max(2, -(-200 * 2**20 // (n * k // 2)))  # > 200 MB of weights: out of the 50 MB L2
        ws = [weights(n, k, i, device) for i in range(copies)]
        g = torch.Generator().manual_seed(9)
        x = (torch.randn(1, k, generator=g) * 3).to(torch.bfloat16).to(device)
        nw = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16).to(device) if extra == "norm" else None
        res = torch.randn(1, n, generator=g).to(torch.bfloat16).to(device) if extra == "residual" else None

        def plain(w):
            return lambda: T.gptq_matmul(x, *w, None, 4, 128)

        def fused(w):
            return lambda: T.gptq_matmul(x, *w, None, 4, 128, norm_weight=nw, eps=1e-5, residual=res)

        def separate(w):
            if extra == "norm":
                return lambda: T.gptq_matmul(torch.nn.functional.rms_norm(x, (k,), nw, 1e-5), *w, None, 4, 128)
            return lambda: T.gptq_matmul(x, *w, None, 4, 128).add_(res)

        ref = torch_gptq_linear_fused(x.double(), None if nw is None else nw.double(), 1e-5, *ws[0], None,
                                      None if res is None else res.double(), 4)
        got = fused(ws[0])().double()
        err = ((got - ref).norm() / ref.norm()).item()
        row = dict(shape=name, extra=extra, rel_err=err,
                   plain_us=time_graph([plain(w) for w in ws]),
                   fused_us=time_graph([fused(w) for w in ws]),
                   separate_us=time_graph([separate(w) for w in ws]))
        results.append(row)
        print(f"{name:20s} +{extra:8s} plain {row['plain_us']:6.1f} us  fused {row['fused_us']:6.1f} us  "
              f"plain + torch {row['separate_us']:6.1f} us  (fused rel err {err:.1e})", flush=True)
        assert err < 1e-2, f"{name}: fused GEMV rel err {err}"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_fused_gemv.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", rows=results), f, indent=1)


if __name__ == "__main__":
    main()
