"""Triton RoPE + KV write + paged attention: ``optgptq::rope_paged_attention_triton``, the same schema as
``optgptq::rope_paged_attention`` (``rope_paged_attention.py``: contract and reference), for CUDA and ROCm.

Decode (Sq == 1) with one K/V tile a program is one launch of ``paged_attention_kernel`` with ``ROPE`` (its
docstring says how the query and the new key are rotated and the new k/v stored there), plus the split reduce where
the context is split. Anything else (a prefill chunk, a K/V loop) runs what the op stands for:
``rope_kv_write_kernel``, then paged attention (``triton_paged_attention.paged_attention_fwd`` chooses).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from .rope_paged_attention import check_rope_paged_attention, torch_rope_paged_attention  # noqa: F401
from .triton_paged_attention import paged_attention_fwd
from .triton_rope_kv_write import _last_dim_contiguous
from .triton_utils import check_device


@triton_op("optgptq::rope_paged_attention_triton", mutates_args=("k_cache", "v_cache"))
def rope_paged_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor], causal: bool, scale: float
) -> torch.Tensor:
    check_rope_paged_attention(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                               alibi_slopes)
    check_device(q, "rope_paged_attention_triton")
    return rope_paged_attention_launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables,
                                       context_lens, alibi_slopes, causal, scale)


def rope_paged_attention_launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                                alibi_slopes, causal, scale, config: Optional[dict] = None) -> torch.Tensor:
    """Launcher: out [B, Hq, Sq, D] (contiguous); k_embed and v go into the pools. ``config`` overrides the
    attention's ``pick_config`` (tests)."""
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError(f"rope_paged_attention_triton: k_cache strides {k_cache.stride()} and v_cache strides "
                         f"{v_cache.stride()} must be equal, head_dim contiguous (the pools are written in place)")
    # k and v keep their own strides (views of the fused q/k/v projection output); the kernels need the last dim
    # contiguous, and cos/sin with the same strides
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    if slot_mapping.stride(0) != 1:
        slot_mapping = slot_mapping.contiguous()
    # paged_attention_fwd picks: the fused kernel (decode, one tile a program) or rope_kv_write + paged attention
    return paged_attention_fwd(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes, causal, scale,
                               config=config, rope=(k, v, cos, sin, slot_mapping))


VARIANTS = {torch.ops.optgptq.rope_paged_attention.default: {
    "triton": torch.ops.optgptq.rope_paged_attention_triton.default, "prepare": None}}


def aot_specs(dtype: str = "fp16") -> list[tuple]:
    """The decode launch is ``paged_attention_kernel`` with ROPE: its specs are in ``triton_paged_attention``."""
    return []
