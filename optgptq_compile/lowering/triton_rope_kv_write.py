"""Triton RoPE + KV write: ``optgptq::rope_kv_write_triton``, the same schema as ``optgptq::rope_kv_write``
(``rope_kv_write.py``: contract and reference), for CUDA and ROCm. Kernel: ``triton_rope_kv_write_kernel.py``.

Grid: (token blocks of ``BLOCK_T``, q heads + KV heads). A decode step of a 7B model at batch 1 is 64 programs of
one token (32 q heads, 32 KV heads); at batch 8 the same 64 of 8 tokens. With PDL it releases the next kernel (paged
attention, whose one-tile splits then load older keys early) once the q/k/v projection has ended: the kernel
docstring says why not before.
Portability: no inline asm, ``tl.extra.cuda`` only under PDL (never on ROCm), no assumption on lanes per warp.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton

from .rope_kv_write import check_rope_kv_write, torch_rope_kv_write  # noqa: F401  (the reference: ground truth)
from .triton_utils import check_device, kernels, launch_options, pdl, per_backend, tracing_interpreted

KERNELS = "triton_rope_kv_write_kernel"
BLOCK_T = 16  # tokens per program: prefill rows in 16s; decode (one token per sequence) masks the rest


@triton_op("optgptq::rope_kv_write_triton", mutates_args=("k_cache", "v_cache"))
def rope_kv_write_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> torch.Tensor:
    check_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    check_device(q, "rope_kv_write_triton")
    return rope_kv_write_launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _broadcast_stride(t: torch.Tensor, dim: int) -> int:
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def rope_kv_write_launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Launcher: returns q_embed [B, Hq, Sq, D] (contiguous); k_embed and v go into the pools, in place."""
    b, hq, sq, d = q.shape
    t, hkv, _ = k.shape
    q_out = q.new_empty(q.shape)  # [B, Hq, Sq, D]
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError(f"rope_kv_write_triton: k_cache strides {k_cache.stride()} and v_cache strides "
                         f"{v_cache.stride()} must be equal, head_dim contiguous (the pools are written in place)")
    # q, k and v keep their own strides (views of the fused q/k/v projection output): a copy is a kernel more
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    if slot_mapping.stride(0) != 1:
        slot_mapping = slot_mapping.contiguous()
    if t == 0 or tracing_interpreted(q):
        return q_out
    mod = kernels(KERNELS)
    use_pdl = pdl(q)
    # every constexpr passed explicitly: Inductor's launcher for wrap_triton kernels ignores Python defaults
    wrap_triton(mod.rope_kv_write_kernel)[(-(-t // BLOCK_T), hq + hkv)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q_out, t, sq, hq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        _broadcast_stride(cos, 0), _broadcast_stride(cos, 2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=d, HALF_PAD=triton.next_power_of_2(d // 2), D_PAD=triton.next_power_of_2(d),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_T=BLOCK_T, PDL=use_pdl, num_warps=4, **launch_options(use_pdl))
    return q_out


VARIANTS = {torch.ops.optgptq.rope_kv_write.default: {"triton": torch.ops.optgptq.rope_kv_write_triton.default,
                                                      "prepare": None}}


def aot_specs(dtype: str = "fp16") -> list[tuple]:
    """(label, kernel, signature, constexprs, options, extra) for head dims 64/80/128 (80: halves of 40 padded to 64
    lanes), block size 16, built for CUDA sm90 with PDL and ROCm gfx90a/gfx942 without. ``extra``: the
    divisibility the JIT infers for fresh allocations (pointers, and strides that are multiples of 16)."""
    mod = kernels(KERNELS)
    specs = []
    for d in (64, 80, 128):
        const = dict(HEAD_DIM=d, HALF_PAD=triton.next_power_of_2(d // 2), D_PAD=triton.next_power_of_2(d),
                     BLOCK_SIZE=16, BLOCK_T=BLOCK_T)
        sig = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", cos_ptr=f"*{dtype}", sin_ptr=f"*{dtype}",
                   k_cache_ptr=f"*{dtype}", v_cache_ptr=f"*{dtype}", slot_ptr="*i64", q_out_ptr=f"*{dtype}",
                   T="i32", Sq="i32", Hq="i32", stride_qb="i32", stride_qh="i32", stride_qs="i32", stride_kt="i32",
                   stride_kh="i32", stride_vt="i32", stride_vh="i32", stride_csb="i32", stride_css="i32",
                   stride_cb="i32", stride_cs="i32", stride_ch="i32", **{name: "constexpr" for name in const})
        names = mod.rope_kv_write_kernel.arg_names
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items()
                 if ty != "constexpr" and (n.endswith("_ptr") or n.startswith("stride_"))}
        specs += per_backend((f"rope_kv_write d{d}", mod.rope_kv_write_kernel, sig, const, dict(num_warps=4),
                              dict(attrs=attrs)))
    return specs
