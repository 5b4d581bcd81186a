"""``rope_kv_write`` (RoPE of q and k + the paged KV write, one Triton kernel) against what it replaces: HF's RoPE
compiled by Inductor (one fused elementwise kernel) followed by ``kv_write_triton``. Each result is checked against
the reference op at full size; timing as every kernel benchmark here (``timing.time_graph``: CUDA-graph replay, so
launch overhead is out of the number, as in a captured decode step), without PDL in both rows (the point of the op
on the GPU is PDL: ``profile_decode.py`` shows that part).

    PYTHONPATH=. python benchmarks/bench_rope_kv_write.py [--out DIR] [--smoke]

Shapes: decode (one token per sequence) at batch 1, 8, 64 and a 512-token prefill of one sequence, for the e2e
model's MHA (32/32 heads) and Llama-2-70B-style GQA (64/8 heads), head 128, fp16. Bandwidth floor: the bytes the op
must move (q, k, v read; q, k, v written; cos/sin read) at 3.0 TB/s. Writes ``bench_rope_kv_write.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import time_graph  # noqa: E402

from optgptq_compile.lowering import triton_rope_kv_write as T  # noqa: E402
from optgptq_compile.lowering.rope_kv_write import rotate_half, torch_rope_kv_write  # noqa: E402

CASES = [  # (label, batch, tokens per sequence, q heads, kv heads)
    ("decode b1 MHA 32/32", 1, 1, 32, 32),
    ("decode b8 MHA 32/32", 8, 1, 32, 32),
    ("decode b64 MHA 32/32", 64, 1, 32, 32),
    ("decode b8 GQA 64/8", 8, 1, 64, 8),
    ("prefill 512 MHA 32/32", 1, 512, 32, 32),
]
HEAD_DIM, BLOCK_SIZE, BW = 128, 16, 3.0e12


def make(b, sq, hq, hkv, device, dtype, seed=0):
    """q/k/v as views of one fused projection output (as the graph passes them), HF cos/sin, a pool, slots."""
    g = torch.Generator().manual_seed(seed)
    d = HEAD_DIM
    qkv = torch.randn(b, sq, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    q = qkv[..., : hq * d].reshape(b, sq, hq, d).transpose(1, 2)  # [B, Hq, Sq, D]
    k = qkv[..., hq * d: (hq + hkv) * d].reshape(b * sq, hkv, d)  # [T, Hkv, D]
    v = qkv[..., (hq + hkv) * d:].reshape(b * sq, hkv, d)
    pos = torch.randint(0, 4000, (b, sq), generator=g).float()
    freqs = pos[..., None] / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype)[:, None].to(device), emb.sin().to(dtype)[:, None].to(device)  # [B, 1, Sq, D]
    num_blocks = -(-b * sq // BLOCK_SIZE) * 2 + 4
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=g).to(dtype).to(device)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[: b * sq].to(device)
    return q, k, v, cos, sin, k_cache, v_cache, slots


def hf_rope(q, k, cos, sin):
    """What the graph did before the pass: HF's RoPE on q [B, Hq, Sq, D] and k (as [B, Hkv, Sq, D])."""
    b, _, sq, d = q.shape
    k4 = k.reshape(b, sq, -1, d).transpose(1, 2)
    k_embed = k4 * cos + rotate_half(k4) * sin
    return q * cos + rotate_half(q) * sin, k_embed.transpose(1, 2).reshape(k.shape)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="one small case (CPU: the Triton interpreter)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    cases = CASES[:1] if args.smoke or not cuda else CASES
    compiled_rope = torch.compile(hf_rope, dynamic=False) if cuda else hf_rope
    from optgptq_compile.lowering.triton_paged_attention import kv_write_launch

    rows = []
    for label, b, sq, hq, hkv in cases:
        copies = [make(b, sq, hq, hkv, device, dtype, seed) for seed in range(4)]
        q, k, v, cos, sin, k_cache, v_cache, slots = copies[0]
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        q_ref = torch_rope_kv_write(q.float(), k.float(), v.float(), cos.float(), sin.float(), k_ref, v_ref, slots)
        out = T.rope_kv_write_launch(q, k, v, cos, sin, k_cache, v_cache, slots)
        err = max(float((out.float() - q_ref).abs().max()), float((k_cache.float() - k_ref.float()).abs().max()))
        assert err < 4e-3 and torch.equal(v_cache, v_ref), f"{label}: max abs error {err}"

        def fused(c):
            return lambda: T.rope_kv_write_launch(*c)

        def split(c):
            def run():
                q_embed, k_embed = compiled_rope(c[0], c[1], c[3], c[4])
                kv_write_launch(k_embed, c[2], c[5], c[6], c[7])
            return run

        t_fused = time_graph([fused(c) for c in copies])
        t_split = time_graph([split(c) for c in copies])
        moved = (2 * hq + 4 * hkv) * b * sq * HEAD_DIM * q.element_size() + 2 * cos.numel() * cos.element_size()
        rows.append(dict(case=label, max_abs_err=err, fused_us=t_fused, inductor_rope_plus_kv_write_us=t_split,
                         floor_us=moved / BW * 1e6))
        print(f"{label:24s} fused {t_fused:7.2f} us   Inductor RoPE + kv_write {t_split:7.2f} us   "
              f"floor {moved / BW * 1e6:6.2f} us   err {err:.1e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_rope_kv_write.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
