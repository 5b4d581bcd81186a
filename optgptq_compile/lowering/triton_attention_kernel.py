"""``attention_fwd_kernel``: flash-attention forward for ``optgptq::attention`` (launcher and reference:
``triton_attention.py`` / ``attention.py``). Nothing but ``@triton.jit`` functions here (see ``triton_utils.kernels``).

One program owns BLOCK_M rows of one KV head's group. A row is a (query position i, head-in-group g) pair, packed
``r = i * G + g``: the G query heads that read the same K/V share every K/V tile the program loads (GQA costs no
extra K/V traffic), and a decode step with Sq = 1 and G = 4..8 still fills a 16-row ``tl.dot``. Scores are kept in
log2 units (``log2(e)`` folded into the scale and the ALiBi slopes) so the softmax is one ``exp2`` per score.

The KV loop runs in two parts: tiles that no causal or length mask touches (no per-score masking, only the
optional key-padding vector), then the tiles on the causal diagonal or past the last key, masked. Tiles wholly
above the diagonal are never visited. With SPLIT the program covers one chunk of the keys and writes its
normalized partial output plus the row log-sum-exp; ``attention_combine_kernel`` merges the chunks (decode).
"""

import triton
import triton.language as tl


@triton.jit
def _load_kv(base, offs_n, offs_d, stride_n, stride_d, Skv, MASKED: tl.constexpr, HEAD_D: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """A K or V tile [BN, BD]; masks only where a key can be past Skv (MASKED) or the head dim is padded."""
    ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    if MASKED:
        return tl.load(ptrs, mask=(offs_n < Skv)[:, None] & (offs_d < HEAD_D)[None, :], other=0.0)
    elif BLOCK_D == HEAD_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(offs_d < HEAD_D)[None, :], other=0.0)


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, offs_d, qpos_f, slope2, qk_scale, stride_kn, stride_kd,
            stride_vn, stride_vd, stride_pn, n_lo, n_hi, Skv,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr,
            IEEE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the KV tiles [n_lo, n_hi) (n_lo a multiple of BLOCK_N). MASKED: apply the causal and the
    key-count masks per score; otherwise every key of every tile is below the diagonal and < Skv."""
    for n0 in tl.range(n_lo, n_hi, BLOCK_N, num_stages=3):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN] key positions
        k = _load_kv(k_base, offs_n, offs_d, stride_kn, stride_kd, Skv, MASKED, HEAD_D, BLOCK_D)  # [BN, BD]
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BM, BN] fp32 (fp32 inputs: no tf32)
        else:
            qk = tl.dot(q, tl.trans(k))
        s = qk * qk_scale  # log2 units
        if HAS_ALIBI:  # slope * (key_pos - query_pos), <= 0 under causal masking: no large offsets
            s += slope2[:, None] * (offs_n.to(tl.float32)[None, :] - qpos_f[:, None])
        if MASKED:
            allowed = (offs_n < Skv)[None, :]  # [1, BN], [BM, BN] once causal
            if CAUSAL:
                allowed = allowed & (offs_n.to(tl.float32)[None, :] <= qpos_f[:, None])
            if HAS_PAD:
                pad = tl.load(pad_base + offs_n * stride_pn, mask=offs_n < Skv, other=0)  # [BN] True = attend
                allowed = allowed & (pad != 0)[None, :]
            s = tl.where(allowed, s, float("-inf"))
        elif HAS_PAD:
            pad = tl.load(pad_base + offs_n * stride_pn)  # [BN]
            s = tl.where((pad != 0)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf - 0) = 0, no NaN
        p = tl.math.exp2(s - m_safe[:, None])  # [BM, BN]
        alpha = tl.math.exp2(m_i - m_safe)  # [BM] rescale of what was accumulated so far
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(v_base, offs_n, offs_d, stride_vn, stride_vd, Skv, MASKED, HEAD_D, BLOCK_D)  # [BN, BD]
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)  # [BM, BD]
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attention_fwd_kernel(
    q_ptr,  # [B, Hq, Sq, D] any strides
    k_ptr,  # [B, Hkv, Skv, D] any strides
    v_ptr,  # [B, Hkv, Skv, D] any strides
    slopes_ptr,  # fp32 [Hq] (unused without HAS_ALIBI)
    pad_ptr,  # bool [B, Skv], True = attend (unused without HAS_PAD)
    out_ptr,  # [B, Hq, Sq, D] contiguous; SPLIT: fp32 [SPLITS, B, Hkv, Sq * G, D]
    lse_ptr,  # SPLIT: fp32 [SPLITS, B, Hkv, Sq * G] row log2-sum-exp2 of each chunk (unused otherwise)
    Sq, Skv, G, HKV,  # G = Hq // Hkv query heads per KV head
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_ob, stride_oh, stride_os,  # out's strides (d stride 1); SPLIT: rows of the partial buffer are contiguous
    qk_scale,  # scale * log2(e)
    kv_chunk,  # keys per split (a multiple of BLOCK_N); >= Skv without SPLIT
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_PAD: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_D, >= 16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor's launcher passes a Python float as fp64 (torch 2.11)
    pid_bh = tl.program_id(0)  # batch x KV head, fastest: the heaviest row tiles of all heads start first
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # causal: the last row tiles see the most keys
    split = tl.program_id(2)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    rows = Sq * G

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] packed rows i * G + g
    row_ok = offs_r < rows
    qi = offs_r // G  # [BM] query index
    head = hkv * G + offs_r % G  # [BM] query head
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    d_ok = offs_d < HEAD_D
    # query i sits at key position Skv - Sq + i; rows past the end get -1 (masked, never stored)
    qpos = tl.where(row_ok, Skv - Sq + qi, -1)  # [BM]
    qpos_f = qpos.to(tl.float32)

    q_base = q_ptr + b.to(tl.int64) * stride_qb
    q = tl.load(q_base + head[:, None].to(tl.int64) * stride_qh + qi[:, None].to(tl.int64) * stride_qs
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    pad_base = pad_ptr + b.to(tl.int64) * stride_pb
    if HAS_ALIBI:
        slope2 = tl.load(slopes_ptr + head, mask=row_ok, other=0.0) * LOG2E  # [BM] in log2 units
    else:
        slope2 = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # key range of this program: its chunk, cut at the last key the last row may see
    first_q = Skv - Sq + pid_m * BLOCK_M // G  # smallest query position in the tile
    last_q = Skv - Sq + tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, Sq - 1)
    n_lo = split * kv_chunk
    n_hi = tl.minimum(n_lo + kv_chunk, Skv)
    full_hi = (Skv // BLOCK_N) * BLOCK_N  # tiles before this hold only real keys
    if CAUSAL:
        n_hi = tl.minimum(n_hi, last_q + 1)  # tiles wholly above the diagonal: skipped
        full_hi = tl.minimum(full_hi, (first_q + 1) // BLOCK_N * BLOCK_N)  # ... and the diagonal ones masked
    full_hi = tl.maximum(tl.minimum(full_hi, n_hi), n_lo)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, offs_d, qpos_f, slope2, qk_scale,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, n_lo, full_hi, Skv,
                            False, CAUSAL, HAS_ALIBI, HAS_PAD, IEEE, HEAD_D, BLOCK_D, BLOCK_N)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, offs_d, qpos_f, slope2, qk_scale,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, full_hi, n_hi, Skv,
                            True, CAUSAL, HAS_ALIBI, HAS_PAD, IEEE, HEAD_D, BLOCK_D, BLOCK_N)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row with no key: acc is 0, the output too
    mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part = (split * tl.num_programs(0) + pid_bh).to(tl.int64) * rows + offs_r  # [BM] row of the partials
        tl.store(out_ptr + part[:, None] * HEAD_D + offs_d[None, :], out, mask=mask)
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=row_ok)  # -inf for a chunk with no key
    else:
        o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + head[:, None].to(tl.int64) * stride_oh
                  + qi[:, None].to(tl.int64) * stride_os + offs_d[None, :])
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def attention_combine_kernel(
    part_ptr,  # fp32 [SPLITS, B * Hkv * Sq * G, D] normalized partial outputs
    lse_ptr,  # fp32 [SPLITS, B * Hkv * Sq * G]
    out_ptr,  # [B, Hq, Sq, D] contiguous
    Sq, G, HKV, splits, total_rows,
    stride_ob, stride_oh, stride_os,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= splits
):
    """One program per packed row: out = sum_s 2**(lse_s - M) * o_s / sum_s 2**(lse_s - M)."""
    row = tl.program_id(0)  # (b * Hkv + hkv) * Sq * G + r
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < splits
    lse = tl.load(lse_ptr + offs_s * total_rows + row, mask=s_ok, other=float("-inf"))  # [BS]
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.math.exp2(lse - mx)  # [BS], 0 for chunks with no key
    part = tl.load(part_ptr + (offs_s[:, None].to(tl.int64) * total_rows + row) * HEAD_D + offs_d[None, :],
                   mask=s_ok[:, None] & (offs_d < HEAD_D)[None, :], other=0.0)  # [BS, BD]
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # [BD]; no key at all: zeros
    rows_per_bh = Sq * G
    bh = row // rows_per_bh
    r = row % rows_per_bh
    b = bh // HKV
    head = (bh % HKV) * G + r % G
    qi = r // G
    o = out_ptr + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + qi.to(tl.int64) * stride_os
    tl.store(o + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_D)
