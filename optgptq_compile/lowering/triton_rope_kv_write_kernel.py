"""RoPE + KV-write kernel (launcher: ``triton_rope_kv_write.py``; reference: ``rope_kv_write.py``). Nothing but
``@triton.jit`` functions here (see ``triton_utils.kernels``).

``rope_kv_write_kernel``: one program per BLOCK_T tokens of one head, the heads numbered q heads first, then KV
heads. A q-head program rotates its rows and writes them to the contiguous q output; a KV-head program rotates k and
writes k and v to their pool slots (slot -1, a padding token: neither read nor stored). Each row is read as its two
halves, so ``rotate_half`` is a choice of operands, not a data movement: out[:H] = x1 cos1 - x2 sin1, out[H:] =
x2 cos2 + x1 sin2, in fp32, rounded once (Inductor's fused RoPE kernel, which this replaces, rounds once too).
"""

import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, row_off, cs_off, cos_ptr, sin_ptr, mask, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """RoPE of rows at ``x_ptr + row_off`` [BT] with cos/sin at ``cs_off`` [BT]: the two rotated halves, fp32."""
    j = tl.arange(0, HALF_PAD)  # [HP]
    x_lo = row_off[:, None] + j[None, :]  # [BT, HP]
    c_lo = cs_off[:, None] + j[None, :]
    x1 = tl.load(x_ptr + x_lo, mask=mask, other=0.0).to(tl.float32)  # [BT, HP]
    x2 = tl.load(x_ptr + x_lo + HALF, mask=mask, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + c_lo, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_lo + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + c_lo, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + c_lo + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def rope_kv_write_kernel(
    q_ptr,  # [B, Hq, Sq, D], last dim contiguous
    k_ptr,  # [T, Hkv, D], last dim contiguous, before RoPE
    v_ptr,  # [T, Hkv, D], last dim contiguous (its own strides: a view of the fused qkv output)
    cos_ptr,  # [Bc, 1, Sc, D], last dim contiguous (the launcher passes stride 0 for a broadcast dim)
    sin_ptr,  # same strides as cos
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D], last dim contiguous
    v_cache_ptr,  # same strides as k_cache
    slot_ptr,  # int64 [T], -1 = padding row, not stored
    q_out_ptr,  # [B, Hq, Sq, D] contiguous
    T, Sq, Hq,
    stride_qb, stride_qh, stride_qs, stride_kt, stride_kh, stride_vt, stride_vh, stride_csb, stride_css,
    stride_cb, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (triton_utils.pdl): wait for the q/k/v projection, then let the next
        # kernel (paged attention) start: released before the wait, its early K/V loads competed with the
        # projection's weight stream (H100 session 12, RESULTS.md: a 4-layer step 402-409 us against 398)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    HALF: tl.constexpr = HEAD_DIM // 2
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] token = b * Sq + s
    head = tl.program_id(1)  # q heads 0..Hq-1, then KV heads
    tok_ok = tok < T
    b = (tok // Sq).to(tl.int64)  # [BT]
    s = tok % Sq
    cs_off = b * stride_csb + s * stride_css  # [BT]
    j = tl.arange(0, HALF_PAD)  # [HP]
    if head < Hq:
        mask = tok_ok[:, None] & (j < HALF)[None, :]  # [BT, HP]
        lo, hi = _rotate(q_ptr, b * stride_qb + head * stride_qh + s * stride_qs, cs_off, cos_ptr, sin_ptr, mask,
                         HALF, HALF_PAD)  # [BT, HP] x 2
        dst = (((b * Hq + head) * Sq + s) * HEAD_DIM)[:, None] + j[None, :]  # [BT, HP]
        tl.store(q_out_ptr + dst, lo.to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(q_out_ptr + dst + HALF, hi.to(q_out_ptr.dtype.element_ty), mask=mask)
    else:
        kv_head = head - Hq
        slot = tl.load(slot_ptr + tok, mask=tok_ok, other=-1)  # [BT] int64
        store_ok = slot >= 0  # padding rows are neither read nor stored
        dst_row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head * stride_ch  # [BT]
        mask = store_ok[:, None] & (j < HALF)[None, :]  # [BT, HP]
        lo, hi = _rotate(k_ptr, tok.to(tl.int64) * stride_kt + kv_head * stride_kh, cs_off, cos_ptr, sin_ptr, mask,
                         HALF, HALF_PAD)
        k_dst = dst_row[:, None] + j[None, :]  # [BT, HP]
        tl.store(k_cache_ptr + k_dst, lo.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + k_dst + HALF, hi.to(k_cache_ptr.dtype.element_ty), mask=mask)
        d = tl.arange(0, D_PAD)  # [DP]
        v_mask = store_ok[:, None] & (d < HEAD_DIM)[None, :]  # [BT, DP]
        v = tl.load(v_ptr + (tok.to(tl.int64) * stride_vt + kv_head * stride_vh)[:, None] + d[None, :], mask=v_mask,
                    other=0.0)
        tl.store(v_cache_ptr + dst_row[:, None] + d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)
