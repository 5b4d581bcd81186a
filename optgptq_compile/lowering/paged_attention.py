"""Paged-KV ops: ``optgptq::kv_write`` (new K/V into the block pool), ``optgptq::paged_attention`` (attention that
reads K/V straight from the blocks) and ``optgptq::kv_gather`` (blocks -> a left-padded contiguous tensor, for
attention code that needs one; the ``paged_kv`` pass removes it in compiled graphs). References and fakes.

Pool layout, per layer: ``k_cache``/``v_cache`` [num_blocks, block_size, kv_heads, head_dim]. Token ``t`` of a
sequence lives in block ``block_tables[b, t // block_size]`` at offset ``t % block_size``; its slot is
``block * block_size + offset``. Query ``i`` of sequence ``b`` sits at position ``context_lens[b] - Sq + i``
(the new tokens are the last ``Sq`` of the context; rows padded on the left get positions before them).

GPU kernels register as separate ops with the same schema in ``lowering.KERNEL_VARIANTS``.
"""

from __future__ import annotations

from typing import Optional

import torch


def check_kv_write(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Raise a ValueError naming the tensor whose shape or dtype does not fit the pool layout."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"kv_write: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [T, kv_heads, head_dim]")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"kv_write: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         "[num_blocks, block_size, kv_heads, head_dim]")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"kv_write: k {tuple(k.shape)} heads/head_dim do not match k_cache {tuple(k_cache.shape)}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != k.shape[:1]:
        raise ValueError(f"kv_write: slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")


def check_paged_attention(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes) -> None:
    """Raise a ValueError naming the tensor whose shape or dtype does not fit ``paged_attention``."""
    if q.dim() != 4:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} must be [B, Hq, Sq, D]")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must "
                         "both be [num_blocks, block_size, kv_heads, head_dim]")
    b, hq, _, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"paged_attention: q head_dim {d} != k_cache head_dim {k_cache.shape[3]}")
    if hq % hkv:
        raise ValueError(f"paged_attention: q heads {hq} not a multiple of kv_heads {hkv}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"paged_attention: block_tables must be int32 [{b}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if context_lens.dtype != torch.int32 or context_lens.shape != (b,):
        raise ValueError(f"paged_attention: context_lens must be int32 [{b}], got {context_lens.dtype} "
                         f"{tuple(context_lens.shape)}")
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32 or alibi_slopes.shape != (hq,)):
        raise ValueError(f"paged_attention: alibi_slopes must be float32 [{hq}], got {alibi_slopes.dtype} "
                         f"{tuple(alibi_slopes.shape)}")


def torch_kv_write(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [T], -1 = padding token, not stored
) -> None:
    """Reference: scatter the rows into the flattened pool without a data-dependent shape (no host sync, so it
    can run inside a captured CUDA graph): a padding row rewrites the first valid row's slot with that row's own
    value (duplicate indices carrying equal values are harmless), or slot 0 with its current value when no row is
    valid."""
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    valid = slot_mapping >= 0  # [T]
    # index_select, not t[first]: indexing with a 0-d tensor reads it on the host, which a CUDA graph cannot do
    first = valid.int().argmax().reshape(1)  # [1] index of the first valid row (0 if none)
    any_valid = valid.any()
    target = torch.where(valid, slot_mapping, torch.where(any_valid, slot_mapping.index_select(0, first), 0))  # [T]
    row = valid[:, None, None]
    k_new = torch.where(row, k, torch.where(any_valid, k.index_select(0, first), k_flat[:1])).to(k_cache.dtype)
    v_new = torch.where(row, v, torch.where(any_valid, v.index_select(0, first), v_flat[:1])).to(v_cache.dtype)
    k_flat.index_copy_(0, target, k_new)
    v_flat.index_copy_(0, target, v_new)


def _gather_positions(block_tables: torch.Tensor, block_size: int, num_blocks: int) -> torch.Tensor:
    """Slot of every token position a block table can address: [B, max_blocks * block_size] (clamped to the pool:
    entries past a sequence's length may hold anything, they are masked by the caller)."""
    blocks = block_tables.long().clamp(0, num_blocks - 1)  # [B, max_blocks]
    offsets = torch.arange(block_size, device=block_tables.device)  # [block_size]
    return (blocks[:, :, None] * block_size + offsets).flatten(1)  # [B, max_blocks * block_size]


def torch_paged_attention(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    context_lens: torch.Tensor,  # int32 [B]
    alibi_slopes: Optional[torch.Tensor],  # fp32 [Hq]
    causal: bool,
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """Reference: gather every addressable position, mask those past the context (and after the query when
    causal), softmax in fp32. A row with no key to attend to (a padding row) gives zeros, not NaN."""
    b, hq, sq, d = q.shape
    num_blocks, block_size, hkv, _ = k_cache.shape
    slots = _gather_positions(block_tables, block_size, num_blocks)  # [B, L]
    k = k_cache.view(-1, hkv, d)[slots].float()  # [B, L, Hkv, D]
    v = v_cache.view(-1, hkv, d)[slots].float()  # [B, L, Hkv, D]
    k = k.permute(0, 2, 1, 3).repeat_interleave(hq // hkv, dim=1)  # [B, Hq, L, D]
    v = v.permute(0, 2, 1, 3).repeat_interleave(hq // hkv, dim=1)  # [B, Hq, L, D]
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, Hq, Sq, L]
    key_pos = torch.arange(slots.shape[1], device=q.device)  # [L]
    ctx = context_lens.long()[:, None, None]  # [B, 1, 1]
    query_pos = ctx - sq + torch.arange(sq, device=q.device)[None, :, None]  # [B, Sq, 1]
    allowed = key_pos < ctx  # [B, 1, L]
    if causal:
        allowed = allowed & (key_pos <= query_pos)  # [B, Sq, L]
    if alibi_slopes is not None:  # slope * (key - query): a per-row constant away from BLOOM's slope * key
        scores = scores + alibi_slopes.float()[None, :, None, None] * (key_pos - query_pos)[:, None].float()
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
    return (probs @ v).to(q.dtype)


def torch_kv_gather(
    cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    context_lens: torch.Tensor,  # int32 [B]
    out_len: int,
) -> torch.Tensor:  # [B, Hkv, out_len, D]
    """Reference: sequence b's ``context_lens[b]`` tokens right-aligned in ``out_len`` positions, zeros before
    (left padding, HF's layout: query i then sits at key position out_len - Sq + i for every sequence)."""
    num_blocks, block_size, hkv, d = cache.shape
    pos = torch.arange(out_len, device=cache.device) - out_len + context_lens.long()[:, None]  # [B, out_len]
    valid = pos >= 0
    pos = pos.clamp(min=0)
    blocks = block_tables.long().gather(1, (pos // block_size).clamp(max=block_tables.shape[1] - 1))
    slots = blocks.clamp(0, num_blocks - 1) * block_size + pos % block_size  # [B, out_len]
    out = cache.view(-1, hkv, d)[slots] * valid[:, :, None, None]  # [B, out_len, Hkv, D]
    return out.permute(0, 2, 1, 3).contiguous()


@torch.library.custom_op("optgptq::kv_write", mutates_args=("k_cache", "v_cache"))
def kv_write(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    check_kv_write(k, v, k_cache, v_cache, slot_mapping)
    torch_kv_write(k, v, k_cache, v_cache, slot_mapping)


@kv_write.register_fake
def _kv_write_fake(k, v, k_cache, v_cache, slot_mapping):
    check_kv_write(k, v, k_cache, v_cache, slot_mapping)


@torch.library.custom_op("optgptq::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    causal: bool,
    scale: float,
) -> torch.Tensor:
    check_paged_attention(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes)
    # contiguous: the fake returns a fresh contiguous tensor, and Inductor asserts the real strides match it
    return (torch_paged_attention(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes, causal, scale)).contiguous()


@paged_attention.register_fake
def _paged_attention_fake(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes, causal, scale):
    check_paged_attention(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes)
    return q.new_empty(q.shape)  # contiguous, like the real output (empty_like would copy q's strides)


@torch.library.custom_op("optgptq::kv_gather", mutates_args=())
def kv_gather(
    cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, out_len: int, lengths_are_mask: bool
) -> torch.Tensor:
    """``lengths_are_mask``: the caller promises that the attention mask of this forward masks exactly the
    positions outside ``context_lens`` (true for the runtime's batches; not for HF generate, whose cache holds
    left-pad tokens). Only then may the ``paged_kv`` pass replace the gather + masked attention by
    ``paged_attention``, which knows no other mask. The flag does not change what the op computes."""
    # contiguous: the fake returns a fresh contiguous tensor, and Inductor asserts the real strides match it
    return (torch_kv_gather(cache, block_tables, context_lens, out_len)).contiguous()


@kv_gather.register_fake
def _kv_gather_fake(cache, block_tables, context_lens, out_len, lengths_are_mask):
    return cache.new_empty(block_tables.shape[0], cache.shape[2], out_len, cache.shape[3])
