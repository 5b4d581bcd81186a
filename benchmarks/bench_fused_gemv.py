"""``gptq_linear_fused`` (RMSNorm before, residual after) against the plain matmul plus the separate kernels it
replaces, at a Llama-2-7B decode layer's four shapes (4-bit g128, bf16), for decode batches M (default 1: the
GEMV, which folds both in; M = 2..64: ``rms_norm_kernel`` + the dot kernel with the residual in its epilogue).

    PYTHONPATH=. python benchmarks/bench_fused_gemv.py [--ms 1,8] [--out DIR]

Rows per shape: ``plain`` (the GEMV alone, as before), ``fused`` (norm or residual in the kernel), ``plain +
torch`` (the GEMV plus ``F.rms_norm`` -- one aten kernel on CUDA -- or the residual add: what the fused kernel
replaces). q/k/v and gate/up take the norm of their input, o and down the residual; the second gate/up row adds
``act="silu_mul"`` (its "plain + torch" is the norm, the GEMV and HF's silu(gate) * up as torch ops). Each fused
result is checked against the op's reference. Timing as every kernel benchmark here (``timing.time_graph``:
CUDA-graph replay over enough weight copies to miss the L2). A last
table times the norm alone at hidden size 4096: aten's ``F.rms_norm``, ``rms_norm_kernel``, and the residual add +
norm as Inductor fuses it (``torch.compile`` of HF's RMSNorm code). Writes ``bench_fused_gemv.json`` to --out.
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
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear_fused, torch_silu_mul  # noqa: E402
from optgptq_compile.quant.format import default_g_idx, pack_weight  # noqa: E402

SHAPES = {  # name: (N, K, what is folded in)
    "qkv 12288x4096": (12288, 4096, "norm"),
    "o 4096x4096": (4096, 4096, "residual"),
    "gate/up 22016x4096": (22016, 4096, "norm"),
    "gate/up 22016x4096 ": (22016, 4096, "norm+silu"),  # act="silu_mul": silu(gate) * up in the epilogue too
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
    ap.add_argument("--ms", default="1", help="comma-separated decode batch sizes")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ms = [int(v) for v in a.ms.split(",")]
    results = [row for m in ms for row in bench_shapes(m, device)]
    norms = [bench_norm(m, device) for m in ms]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_fused_gemv.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", rows=results,
                       norm_rows=norms), f, indent=1)


def hf_add_rms_norm(x, residual, weight, eps: float = 1e-5):
    """HF Llama's residual add + LlamaRMSNorm, for Inductor to fuse (what the unfused backend graph runs)."""
    h = (x + residual).to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def bench_norm(m: int, device: str, k: int = 4096) -> dict:
    g = torch.Generator().manual_seed(m)
    xs = [(torch.randn(m, k, generator=g) * 3).to(torch.bfloat16).to(device) for _ in range(64)]
    w = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16).to(device)
    compiled = torch.compile(hf_add_rms_norm, dynamic=False)
    got, ref = T.rms_norm(xs[0], w, 1e-5), hf_add_rms_norm(xs[0], torch.zeros_like(xs[0]), w)
    err = ((got.double() - ref.double()).norm() / ref.norm()).item()
    row = dict(m=m, k=k, rel_err=err,
               aten_rms_norm_us=time_graph([lambda x=x: torch.nn.functional.rms_norm(x, (k,), w, 1e-5) for x in xs]),
               triton_rms_norm_us=time_graph([lambda x=x: T.rms_norm(x, w, 1e-5) for x in xs]),
               inductor_add_norm_us=time_graph([lambda x=x: compiled(x, x, w) for x in xs]))
    print(f"norm M={m:3d} K={k}: aten F.rms_norm {row['aten_rms_norm_us']:5.1f} us  rms_norm_kernel "
          f"{row['triton_rms_norm_us']:5.1f} us  Inductor add+norm {row['inductor_add_norm_us']:5.1f} us  "
          f"(rel err {err:.1e})", flush=True)
    assert err < 1e-2, f"rms_norm_kernel rel err {err}"
    return row


def bench_shapes(m: int, device: str) -> list[dict]:
    results = []
    for name, (n, k, extra) in SHAPES.items():
        copies = max(2, -(-200 * 2**20 // (n * k // 2)))  # > 200 MB of weights: out of the 50 MB L2
        ws = [weights(n, k, i, device) for i in range(copies)]
        g = torch.Generator().manual_seed(9)
        x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16).to(device)
        nw = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16).to(device) if "norm" in extra else None
        act = "silu_mul" if "silu" in extra else "none"
        res = torch.randn(m, n, generator=g).to(torch.bfloat16).to(device) if extra == "residual" else None

        def plain(w):
            return lambda: T.gptq_matmul(x, *w, None, 4, 128)

        def fused(w):
            return lambda: T.gptq_matmul(x, *w, None, 4, 128, norm_weight=nw, eps=1e-5, residual=res, act=act)

        def separate(w):
            if extra == "norm+silu":
                return lambda: torch_silu_mul(T.gptq_matmul(torch.nn.functional.rms_norm(x, (k,), nw, 1e-5), *w,
                                                            None, 4, 128))
            if extra == "norm":
                return lambda: T.gptq_matmul(torch.nn.functional.rms_norm(x, (k,), nw, 1e-5), *w, None, 4, 128)
            return lambda: T.gptq_matmul(x, *w, None, 4, 128).add_(res)

        ref = torch_gptq_linear_fused(x.double(), None if nw is None else nw.double(), 1e-5, *ws[0], None,
                                      None if res is None else res.double(), 4, act)
        got = fused(ws[0])().double()
        err = ((got - ref).norm() / ref.norm()).item()
        row = dict(shape=name, m=m, extra=extra, rel_err=err,
                   plain_us=time_graph([plain(w) for w in ws]),
                   fused_us=time_graph([fused(w) for w in ws]),
                   separate_us=time_graph([separate(w) for w in ws]))
        results.append(row)
        print(f"M={m:3d} {name:20s} +{extra:9s} plain {row['plain_us']:6.1f} us  fused {row['fused_us']:6.1f} us  "
              f"plain + torch {row['separate_us']:6.1f} us  (fused rel err {err:.1e})", flush=True)
        assert err < 1e-2, f"{name}: fused GEMV rel err {err}"
    return results


if __name__ == "__main__":
    main()
