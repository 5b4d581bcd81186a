"""``rope_paged_attention`` (RoPE + KV write + paged attention, one kernel at decode) against what it replaces:
``rope_kv_write`` then ``paged_attention`` (two kernels, plus the split reduce in both). Checked at full size against
the two kernels and the reference; timed as every kernel benchmark here (``timing.time_graph``: CUDA-graph replay),
with PDL as the runtime launches them, in two settings:

* attention alone: the op's kernels over 4 copies of q/k/v and pools;
* in its place in a decode layer: q/k/v GEMV (RMSNorm folded in) -> attention -> o GEMV (+ residual), the chain a
  decode step runs (4-bit g128 weights, 4 copies so they come from HBM). This is where the kernel boundary saved
  shows: the attention's wait for the projection and the o projection's wait for the attention.

    PYTHONPATH=. python benchmarks/bench_rope_attention.py [--out DIR] [--smoke]

Shapes: e2e.py's Llama-2-7B (MHA 32/32 heads, head 128, fp16) at batch 1, 8 and 32 with 576 keys (512-token
prompt + 64 generated) in a 640-token block table, and GQA 32/8 at batch 1. Writes ``bench_rope_attention.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fused_gemv import weights  # noqa: E402
from timing import time_graph  # noqa: E402

from optgptq_compile.lowering import triton_gptq_linear as G  # noqa: E402
from optgptq_compile.lowering.rope_paged_attention import torch_rope_paged_attention  # noqa: E402
from optgptq_compile.lowering.triton_paged_attention import paged_attention_fwd  # noqa: E402
from optgptq_compile.lowering.triton_rope_kv_write import rope_kv_write_launch  # noqa: E402
from optgptq_compile.lowering.triton_rope_paged_attention import rope_paged_attention_launch  # noqa: E402

CASES = [  # (label, batch, q heads, kv heads)
    ("b1 MHA 32/32", 1, 32, 32),
    ("b1 GQA 32/8", 1, 32, 8),
    ("b8 MHA 32/32", 8, 32, 32),
    ("b32 MHA 32/32", 32, 32, 32),
]
HEAD_DIM, BLOCK_SIZE, CONTEXT, TABLE = 128, 16, 576, 640


def make(b, hq, hkv, device, dtype, seed, with_gemv):
    """One copy: pools with a private block table per sequence, the new token's slot, HF-style cos/sin, and either
    q/k/v as views of a fused projection output or (with_gemv) the q/k/v and o GEMV weights and a hidden state."""
    g = torch.Generator().manual_seed(seed)
    d = HEAD_DIM
    width = TABLE // BLOCK_SIZE
    num_blocks = b * width + 2
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=g).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=g).to(dtype).to(device)
    tables = torch.randperm(num_blocks, generator=g)[: b * width].view(b, width).int().to(device)
    lens = torch.full((b,), CONTEXT, dtype=torch.int32, device=device)
    pos = CONTEXT - 1
    slots = (tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE).contiguous()
    freqs = pos / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs))[None, None, None].expand(b, 1, 1, d)
    cos, sin = emb.cos().to(dtype).to(device).contiguous(), emb.sin().to(dtype).to(device).contiguous()
    c = dict(k_cache=k_cache, v_cache=v_cache, tables=tables, lens=lens, slots=slots, cos=cos, sin=sin)
    n_qkv = (hq + 2 * hkv) * d
    if with_gemv:
        for name, (n, kk, s) in (("w_qkv", (n_qkv, hq * d, seed)), ("w_o", (hq * d, hq * d, seed + 100))):
            c[name] = weights(n, kk, s, device)
            c[name][2] = c[name][2].to(dtype)  # scales in the activations' dtype (fp16 here)
        c["h"] = (torch.randn(b, hq * d, generator=g) * 0.5).to(dtype).to(device)
        c["norm"] = (1 + 0.1 * torch.randn(hq * d, generator=g)).to(dtype).to(device)
    else:
        c["qkv"] = torch.randn(b, n_qkv, generator=g).to(dtype).to(device)
    return c


def views(qkv, b, hq, hkv):
    """q [B, Hq, 1, D], k and v [B, Hkv, D]: views of the fused projection output, as the graph hands them over."""
    d = HEAD_DIM
    q = qkv[:, : hq * d].view(b, 1, hq, d).transpose(1, 2)
    k = qkv[:, hq * d: (hq + hkv) * d].view(b, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(b, hkv, d)
    return q, k, v


def attend(c, qkv, b, hq, hkv, fused):
    q, k, v = views(qkv, b, hq, hkv)
    args = (c["k_cache"], c["v_cache"])
    tail = (c["tables"], c["lens"], None, True, 1 / math.sqrt(HEAD_DIM))
    if fused:
        return rope_paged_attention_launch(q, k, v, c["cos"], c["sin"], *args, c["slots"], *tail)
    q_embed = rope_kv_write_launch(q, k, v, c["cos"], c["sin"], *args, c["slots"])
    return paged_attention_fwd(q_embed, *args, *tail)


def layer(c, b, hq, hkv, fused):
    """q/k/v GEMV (RMSNorm folded in) -> attention -> o GEMV + residual: the new hidden state [B, H]."""
    qkv = G.gptq_matmul(c["h"], *c["w_qkv"], None, 4, 128, norm_weight=c["norm"], eps=1e-5)
    out = attend(c, qkv, b, hq, hkv, fused)  # [B, Hq, 1, D]
    return G.gptq_matmul(out.view(b, hq * HEAD_DIM), *c["w_o"], None, 4, 128, residual=c["h"])


def check(c, b, hq, hkv, dtype, device):
    """Fused vs two kernels (outputs and pools) and vs the reference, at full size: max abs errors."""
    two_c = {**c, "k_cache": c["k_cache"].clone(), "v_cache": c["v_cache"].clone()}
    ref_k, ref_v = c["k_cache"].float(), c["v_cache"].float()
    q, k, v = views(c["qkv"], b, hq, hkv)
    ref = torch_rope_paged_attention(q.float(), k.float(), v.float(), c["cos"].float(), c["sin"].float(), ref_k,
                                     ref_v, c["slots"], c["tables"], c["lens"], None, True, 1 / math.sqrt(HEAD_DIM))
    fused = attend(c, c["qkv"], b, hq, hkv, True)
    two = attend(two_c, c["qkv"], b, hq, hkv, False)
    torch.cuda.synchronize() if device == "cuda" else None
    errs = dict(vs_two=float((fused.float() - two.float()).abs().max()),
                vs_reference=float((fused.float() - ref).abs().max()),
                k_pool_vs_two=float((c["k_cache"].float() - two_c["k_cache"].float()).abs().max()),
                v_pool_equal=bool(torch.equal(c["v_cache"], two_c["v_cache"])))
    tol = 4e-3 if dtype == torch.float16 else 1e-4
    assert errs["vs_two"] < tol and errs["vs_reference"] < tol and errs["k_pool_vs_two"] < tol \
        and errs["v_pool_equal"], errs
    return errs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="one small check (CPU: the Triton interpreter)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    rows = []
    cases = CASES if cuda and not args.smoke else [("smoke b1 GQA 4/2", 1, 4, 2)]
    for label, b, hq, hkv in cases:
        errs = check(make(b, hq, hkv, device, dtype, 0, False), b, hq, hkv, dtype, device)
        row = dict(case=label, **errs)
        if cuda:
            copies = [make(b, hq, hkv, device, dtype, s, False) for s in range(4)]
            for name, fused in (("two_kernels", False), ("fused", True)):
                row[f"attention_{name}_us"] = time_graph([lambda c=c, f=fused: attend(c, c["qkv"], b, hq, hkv, f)
                                                          for c in copies])
            copies = [make(b, hq, hkv, device, dtype, s, True) for s in range(4)]
            for name, fused in (("two_kernels", False), ("fused", True)):
                row[f"layer_{name}_us"] = time_graph([lambda c=c, f=fused: layer(c, b, hq, hkv, f) for c in copies])
            del copies
            print(f"{label:14s} attention: two kernels {row['attention_two_kernels_us']:7.2f} us, fused "
                  f"{row['attention_fused_us']:7.2f} | qkv -> attention -> o: two {row['layer_two_kernels_us']:7.2f}"
                  f" us, fused {row['layer_fused_us']:7.2f} | errors {errs}", flush=True)
        else:
            print(f"{label}: errors {errs}")
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_rope_attention.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
