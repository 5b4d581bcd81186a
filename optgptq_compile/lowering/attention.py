"""``optgptq::attention``: grouped-query attention with in-op ALiBi, causal and key-padding masks.

Semantics (the contract every kernel variant matches):

- ``q`` [B, Hq, Sq, D], ``k``/``v`` [B, Hkv, Skv, D], Hq a multiple of Hkv: query head h reads KV head
  ``h // (Hq // Hkv)`` (HF's ``repeat_kv`` order; Hq == Hkv is plain multi-head attention).
- ``scores = scale * q @ k^T`` accumulated in fp32 (fp64 inputs: fp64), softmax likewise, output in ``q.dtype``.
- Differentiable (backward through the reference), so a compiled model can still be trained.
- ``causal``: query i sits at key position ``Skv - Sq + i`` (prefill: Sq == Skv; decode: the new tokens are the
  last Sq keys) and sees keys at positions <= its own.
- ``alibi_slopes`` fp32 [Hq]: adds ``slope[h] * (key_pos - query_pos)`` to the scores. BLOOM adds
  ``slope[h] * key_pos`` (key_pos counted from the first non-pad token); both differ by a constant per query row,
  which softmax ignores, so the two are the same attention. The relative form keeps the bias <= 0 under causal
  masking, which is what a kernel wants (no large positive offsets at long contexts).
- ``key_padding_mask`` bool [B, Skv], True = attend (HF's ``attention_mask`` over keys, left padding).
- A query row with no key to attend to (a pad position of a left-padded prompt) outputs zeros, never NaN: its
  value flows on as the next layer's key/value at a masked position, and 0 * NaN in ``P @ V`` would poison the
  real tokens.
"""

from __future__ import annotations

from typing import Optional

import torch


def check_attention_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
) -> None:
    """Raise a ValueError naming the argument whose shape or dtype does not fit the op's contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or not t.is_floating_point():
            raise ValueError(f"attention: {name} dtype {t.dtype} must be floating and equal q's {q.dtype}")
    b, hq, _, d = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k {tuple(k.shape)} does not fit q {tuple(q.shape)} (batch, head_dim)")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention: query heads {hq} must be a multiple of KV heads {hkv}")
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32 or tuple(alibi_slopes.shape) != (hq,)):
        raise ValueError(
            f"attention: alibi_slopes must be float32 [{hq}], got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}"
        )
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, k.shape[2])
    ):
        raise ValueError(
            f"attention: key_padding_mask must be bool [{b}, {k.shape[2]}], "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )


def torch_attention(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D]
    v: torch.Tensor,  # [B, Hkv, Skv, D]
    alibi_slopes: Optional[torch.Tensor],  # fp32 [Hq]
    key_padding_mask: Optional[torch.Tensor],  # bool [B, Skv], True = attend
    causal: bool,
    scale: float,
) -> torch.Tensor:  # [B, Hq, Sq, D]
    """Reference: fp32 scores per KV-head group (K/V are never repeated), masks and ALiBi built per call."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    acc = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 accumulate in fp32, fp64 stays fp64
    qf = q.to(acc).reshape(b, hkv, group, sq, d)  # [B, Hkv, G, Sq, D]
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qf, k.to(acc)) * scale  # [B, Hkv, G, Sq, Skv]
    key_pos = torch.arange(skv, device=q.device)  # [Skv]
    query_pos = torch.arange(sq, device=q.device) + (skv - sq)  # [Sq]
    if alibi_slopes is not None:
        rel = (key_pos[None, :] - query_pos[:, None]).float()  # [Sq, Skv]
        scores = scores + alibi_slopes.to(acc).reshape(hkv, group, 1, 1) * rel.to(acc)  # broadcast over B
    allowed = torch.ones(b, 1, 1, sq, skv, dtype=torch.bool, device=q.device)  # [B, 1, 1, Sq, Skv]
    if causal:
        allowed = allowed & (key_pos[None, :] <= query_pos[:, None])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, 0.0)  # rows with no key: 0, not NaN
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v.to(acc))  # [B, Hkv, G, Sq, D]
    return out.reshape(b, hq, sq, d).to(q.dtype)


@torch.library.custom_op("optgptq::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    scale: float,
) -> torch.Tensor:
    check_attention_shapes(q, k, v, alibi_slopes, key_padding_mask, causal)
    if causal and k.shape[2] < q.shape[2]:
        raise ValueError(f"attention: causal needs at least as many keys ({k.shape[2]}) as queries ({q.shape[2]})")
    # contiguous: the fake returns a fresh contiguous tensor, and Inductor asserts the real strides match it
    return (torch_attention(q, k, v, alibi_slopes, key_padding_mask, causal, scale)).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, alibi_slopes, key_padding_mask, causal, scale):
    check_attention_shapes(q, k, v, alibi_slopes, key_padding_mask, causal)
    return q.new_empty(q.shape)  # contiguous, like the real output (empty_like would copy q's strides)


def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, key_padding_mask, causal, scale = inputs
    ctx.save_for_backward(q, k, v, alibi_slopes, key_padding_mask)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad):
    """Gradients of q, k, v by differentiating the reference (so a compiled model can still be fine-tuned)."""
    q, k, v, alibi_slopes, key_padding_mask = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad[:3])]
        out = torch_attention(*leaves, alibi_slopes, key_padding_mask, ctx.causal, ctx.scale)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad)) if wanted else iter(())
    return (*(next(grads) if t.requires_grad else None for t in leaves), None, None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)
