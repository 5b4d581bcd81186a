"""``optgptq::rope_paged_attention``: RoPE of q and k, the new k/v written into the paged pool, and paged attention
over the pool, in one op. Reference and fake here; the Triton launcher in ``triton_rope_paged_attention.py``.

It stands for ``rope_kv_write`` followed by the ``paged_attention`` that reads its rotated query (the
``fuse_rope_attention`` pass rewrites that pair)::

    q_embed = rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)   # k_embed and v into the pool
    return paged_attention(q_embed, k_cache, v_cache, block_tables, context_lens, alibi_slopes, causal, scale)

Why one op: at decode (one new token per sequence) the attention kernel can rotate its own query rows and the new
key itself, use the new key and value from registers and store them into the pool, so the RoPE kernel between the
q/k/v projection and attention disappears -- together with its wait for the projection, its stores, and the
attention kernel's wait for it (one kernel boundary less per layer, on the critical path of every decode step).
Elsewhere (prefill) the Triton path runs the two kernels it stands for.
"""

from __future__ import annotations

from typing import Optional

import torch

from .paged_attention import check_paged_attention, torch_paged_attention
from .rope_kv_write import check_rope_kv_write, torch_rope_kv_write


def check_rope_paged_attention(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                               alibi_slopes) -> None:
    """Raise a ValueError naming the tensor whose shape or dtype does not fit (both parts' own checks)."""
    check_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    check_paged_attention(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes)


def torch_rope_paged_attention(
    q: torch.Tensor,  # [B, Hq, Sq, D], before RoPE
    k: torch.Tensor,  # [T = B * Sq, Hkv, D], before RoPE
    v: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [B or 1, 1, Sq or 1, D], q's dtype
    sin: torch.Tensor,  # [B or 1, 1, Sq or 1, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # int64 [T], -1 = padding token, not stored
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    context_lens: torch.Tensor,  # int32 [B], the new tokens included
    alibi_slopes: Optional[torch.Tensor],  # fp32 [Hq]
    causal: bool,
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, D], contiguous
    """Reference: the two references in sequence, exactly what the rewritten graph computed."""
    q_embed = torch_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    out = torch_paged_attention(q_embed, k_cache, v_cache, block_tables, context_lens, alibi_slopes, causal, scale)
    return out.contiguous()


@torch.library.custom_op("optgptq::rope_paged_attention", mutates_args=("k_cache", "v_cache"))
def rope_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    causal: bool,
    scale: float,
) -> torch.Tensor:
    check_rope_paged_attention(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                               alibi_slopes)
    return torch_rope_paged_attention(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                                      alibi_slopes, causal, scale)


@rope_paged_attention.register_fake
def _rope_paged_attention_fake(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                               alibi_slopes, causal, scale):
    check_rope_paged_attention(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                               alibi_slopes)
    return q.new_empty(q.shape)  # contiguous, like the real output
