"""``optgptq::rope_kv_write``: rotary position embedding (RoPE) of q and k, and k/v written into the paged pool, in
one op. Reference and fake here; the Triton kernel in ``triton_rope_kv_write.py``.

It stands for what a Llama-family attention layer does between its q/k/v projections and attention when its cache
is paged (``passes/fuse_rope_kv_write.py`` rewrites that)::

    q_embed = q * cos + rotate_half(q) * sin            # HF apply_rotary_pos_emb, cos/sin [Bc, 1, Sc, D]
    k_embed = k * cos + rotate_half(k) * sin
    kv_write(k_embed as [T, Hkv, D], v, k_cache, v_cache, slot_mapping)
    return q_embed

On a GPU that is one kernel where it was two (Inductor's RoPE kernel, then ``kv_write``), and one that takes part
in programmatic dependent launch (Inductor's did not). H100 session 12 (``benchmarks/bench_rope_kv_write.py``):
1.5-2.1 us against 3.5-5.0 for the two kernels at decode, 9.3 against 13.2 us for a 512-token prefill; a batch-1
decode step of 4 layers did not get measurably faster (398 against 397-403 us: the time saved moved into the
kernels around it).

``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])`` (HF's, the "non-interleaved" form Llama, Mistral, Qwen2 and
SmolLM checkpoints use). Token ``t = b * Sq + s`` of k/v/slot_mapping is query position ``s`` of sequence ``b``.
"""

from __future__ import annotations

import torch

from .paged_attention import check_kv_write, torch_kv_write


def check_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    """Raise a ValueError naming the tensor whose shape or dtype does not fit (kv_write's own checks included)."""
    if q.dim() != 4:
        raise ValueError(f"rope_kv_write: q {tuple(q.shape)} must be [B, Hq, Sq, D]")
    b, _, sq, d = q.shape
    if d % 2:
        raise ValueError(f"rope_kv_write: head_dim {d} must be even (rotate_half splits it in two)")
    check_kv_write(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] != b * sq or k.shape[2] != d:
        raise ValueError(f"rope_kv_write: k {tuple(k.shape)} must be [B * Sq = {b * sq}, kv_heads, {d}] for q "
                         f"{tuple(q.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if (t.dim() != 4 or t.shape[1] != 1 or t.shape[0] not in (1, b) or t.shape[2] not in (1, sq)
                or t.shape[3] != d):
            raise ValueError(f"rope_kv_write: {name} {tuple(t.shape)} must broadcast as [B or 1, 1, Sq or 1, {d}] "
                             f"against q {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"rope_kv_write: {name} dtype {t.dtype} != q dtype {q.dtype} (HF casts cos/sin to q's)")
    if k.dtype != q.dtype:
        raise ValueError(f"rope_kv_write: k dtype {k.dtype} != q dtype {q.dtype}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def torch_rope_kv_write(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [T = B * Sq, Hkv, D], before RoPE
    v: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [B or 1, 1, Sq or 1, D], q's dtype
    sin: torch.Tensor,  # [B or 1, 1, Sq or 1, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [T], -1 = padding token, not stored
) -> torch.Tensor:  # q_embed [B, Hq, Sq, D], contiguous
    """Reference: HF's arithmetic op by op in the input dtype (the graph it replaces gives the same bits on a CPU)."""
    q_embed, k_embed = torch_rope(q, k, cos, sin)
    torch_kv_write(k_embed, v, k_cache, v_cache, slot_mapping)
    return q_embed.contiguous()


def torch_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q_embed [B, Hq, Sq, D], k_embed [T, Hkv, D]): HF's ``apply_rotary_pos_emb`` on the op's layouts."""
    b, _, sq, d = q.shape
    k4 = k.reshape(b, sq, k.shape[1], d).transpose(1, 2)  # [B, Hkv, Sq, D], as HF holds it
    k_embed = (k4 * cos + rotate_half(k4) * sin).transpose(1, 2).reshape(k.shape)  # [T, Hkv, D]
    return q * cos + rotate_half(q) * sin, k_embed


@torch.library.custom_op("optgptq::rope_kv_write", mutates_args=("k_cache", "v_cache"))
def rope_kv_write(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> torch.Tensor:
    check_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return torch_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


@rope_kv_write.register_fake
def _rope_kv_write_fake(q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
    check_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return q.new_empty(q.shape)  # contiguous, like the real output
