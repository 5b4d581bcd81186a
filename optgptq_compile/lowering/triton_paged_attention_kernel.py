"""Paged attention and KV-write kernels (launchers and references: ``triton_paged_attention.py``,
``paged_attention.py``). Nothing but ``@triton.jit`` functions here (see ``triton_utils.kernels``).

``paged_attention_kernel``: one program per (sequence, KV head, query tile, KV split). The rows of a query tile are
(query position, head in the group) pairs, row ``r = i * GROUP + h``: every query head that shares a KV head sits in
the same ``tl.dot`` tile, so a K/V token is read once per KV head (decode with GQA 4 fills 4 of 16 rows; without
the packing it would read the cache 4 times). K/V tiles of BLOCK_N tokens are gathered through the block table,
token by token (a tile may span several pool blocks, or part of one); each token row is HEAD_DIM contiguous
elements. Softmax is online, in fp32, in base 2 (``qk_scale`` includes log2(e), and so do the ALiBi slopes).

The key range of a program is cut in two loops: tiles every row of the tile may see in full (no mask at all), then
the few tiles at the causal diagonal and the end of the context (masked). Keys past what the tile can see are
never visited. With SPLIT, a program covers only ``split_len`` keys and writes its partial (max, sum, acc) to fp32
scratch; ``paged_attention_reduce_kernel`` combines the splits (a split that starts past the context writes the
neutral partial: max -inf, sum 0, acc 0).

ONE_TILE (split_len == BLOCK_N, decode at small batch: H100 session 7 found one tile per split fastest there) has
no loop: a program's time is then a chain of dependent loads (context length, block ids, K/V). With PDL and
EARLY_KV the chain starts before ``gdc_wait``: the context length, the block table and keys older than the step's
Sq new ones are written by no kernel that can still be running (the launcher's ``early_kv_ok`` says why), so only
the program whose tile holds a new key loads K/V after the wait, and every program loads q after it.

ROPE (``optgptq::rope_paged_attention`` at decode, Sq == 1, ONE_TILE only): q arrives before its rotary embedding,
and the step's key and value (position ctx - 1) arrive as the q/k/v projection's output, not from the pool. The
tile then holds the keys before it only -- all older than the step, so with EARLY_KV the whole tile (and the token's
slot) loads before ``gdc_wait`` -- and every program rotates its query rows after the wait. The program whose split
holds the new key rotates it and adds it to its softmax as one more key from registers (``_attend_new``, a rank-1
update); the last split's first query tile stores it and the value into the pool. Each row is rotated from two reads
of it, at d and at its ``rotate_half`` partner (fp32, rounded once, as ``rope_kv_write_kernel`` does). The launcher
runs ``rope_kv_write_kernel`` and plain paged attention where the config has a K/V loop (larger batches): there the
step's key in registers cost more than it saved (H100, ``benchmarks/bench_rope_attention.py``, RESULTS.md).
"""

import triton
import triton.language as tl


@triton.jit
def _kv_offsets(start, bt_row_ptr, kv_head_off, key_end, stride_kb, stride_ks, MASKED: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys start..start+BLOCK_N: their positions [BN], pool offsets [BN] (through the block table) and, MASKED,
    which are before ``key_end`` [BN] (the others are not looked up)."""
    kpos = start + tl.arange(0, BLOCK_N)  # [BN] key positions
    if MASKED:
        key_ok = kpos < key_end  # [BN]
        block = tl.load(bt_row_ptr + kpos // BLOCK_SIZE, mask=key_ok, other=0)  # [BN] pool block of each token
    else:  # the whole tile lies inside the context
        key_ok = kpos >= 0
        block = tl.load(bt_row_ptr + kpos // BLOCK_SIZE)
    token_off = block.to(tl.int64) * stride_kb + (kpos % BLOCK_SIZE) * stride_ks + kv_head_off  # [BN]
    return kpos, token_off, key_ok


@triton.jit
def _load_kv(k_ptr, v_ptr, token_off, key_ok, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """K and V [BN, DP] at the keys' pool offsets; MASKED: keys not ``key_ok`` are not read (zeros)."""
    d = tl.arange(0, D_PAD)  # [DP]
    kv_off = token_off[:, None] + d[None, :]  # [BN, DP]
    if MASKED:
        if HEAD_DIM == D_PAD:
            kv_mask = key_ok[:, None]
        else:
            kv_mask = key_ok[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [BN, DP]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)  # [BN, DP]
    elif HEAD_DIM == D_PAD:
        k = tl.load(k_ptr + kv_off)
        v = tl.load(v_ptr + kv_off)
    else:  # head dim 80: padded to 128 lanes
        k = tl.load(k_ptr + kv_off, mask=(d < HEAD_DIM)[None, :], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=(d < HEAD_DIM)[None, :], other=0.0)
    return k, v


@triton.jit
def _attend(acc, m_i, l_i, q, k, v, kpos, ctx, qpos, slope, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
            ALIBI: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with one K/V tile [BN, DP] at key positions kpos [BN]."""
    if IEEE:  # fp32 caches: exact fp32 products, not tf32
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BM, BN]
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if ALIBI:  # slope * (key - query), log2 units
        s += slope[:, None] * (kpos[None, :] - qpos[:, None]).to(tl.float32)
    if MASKED:
        allowed = (kpos < ctx)[None, :]
        if CAUSAL:
            allowed = allowed & (kpos[None, :] <= qpos[:, None])  # [BM, BN]
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BM]
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf - 0) = 0, not NaN
    alpha = tl.math.exp2(m_i - m_use)  # [BM]
    p = tl.math.exp2(s - m_use[:, None])  # [BM, BN]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # [BM, DP]
    return acc, m_new, l_i


@triton.jit
def _attend_tile(acc, m_i, l_i, q, start, k_ptr, v_ptr, bt_row_ptr, kv_head_off, ctx, qpos, slope,
                 stride_kb, stride_ks, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, ALIBI: tl.constexpr,
                 IEEE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """One K/V tile of keys start..start+BLOCK_N: load it, then the online-softmax update."""
    kpos, token_off, key_ok = _kv_offsets(start, bt_row_ptr, kv_head_off, ctx, stride_kb, stride_ks, MASKED,
                                          BLOCK_SIZE, BLOCK_N)
    k, v = _load_kv(k_ptr, v_ptr, token_off, key_ok, MASKED, HEAD_DIM, D_PAD)
    return _attend(acc, m_i, l_i, q, k, v, kpos, ctx, qpos, slope, qk_scale, MASKED, CAUSAL, ALIBI, IEEE)


@triton.jit
def _rope_rows(ptr, row_off, mask, cos, sin, d, HEAD_DIM: tl.constexpr):
    """RoPE of rows at ``ptr + row_off`` [R] (the last dim contiguous) with cos/sin [DP] fp32: [R, DP] fp32. Each
    row is read at d and at its ``rotate_half`` partner: out[:H] = x1 cos - x2 sin, out[H:] = x2 cos + x1 sin."""
    HALF: tl.constexpr = HEAD_DIM // 2
    low = d < HALF  # [DP]
    partner = tl.where(low, d + HALF, d - HALF)  # [DP]
    x = tl.load(ptr + row_off[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)  # [R, DP]
    xp = tl.load(ptr + row_off[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.where(low[None, :], x * cos[None, :] - xp * sin[None, :], x * cos[None, :] + xp * sin[None, :])


@triton.jit
def _attend_new(acc, m_i, l_i, q, k_new, v_new, qk_scale, take):
    """``_attend`` for one more key k_new [DP] with value v_new [DP] (the step's own, from registers), where take
    [BM] (its split is this program's); no ALiBi term: the key is at the query's own position."""
    s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale  # [BM]
    s = tl.where(take, s, float("-inf"))
    m_new = tl.maximum(m_i, s)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use)  # [BM]
    l_i = l_i * alpha + p
    # p rounded to V's dtype, as _attend rounds it for its P @ V dot
    acc = acc * alpha[:, None] + p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
    return acc, m_new, l_i


@triton.jit
def paged_attention_kernel(
    q_ptr,  # [B, Hq, Sq, D], last dim contiguous
    k_ptr,  # [num_blocks, block_size, Hkv, D], last dim contiguous
    v_ptr,  # [num_blocks, block_size, Hkv, D], same strides as k
    bt_ptr,  # int32 [B, max_blocks]
    ctx_ptr,  # int32 [B]
    slopes_ptr,  # fp32 [Hq] (unused without ALIBI)
    out_ptr,  # [B, Hq, Sq, D] contiguous (written without SPLIT)
    m_ptr,  # fp32 [B * Hkv, Sq * GROUP, num_splits] running max, log2 units (written with SPLIT)
    l_ptr,  # fp32 [B * Hkv, Sq * GROUP, num_splits] softmax denominators
    acc_ptr,  # fp32 [B * Hkv, Sq * GROUP, num_splits, D] unnormalized outputs
    kn_ptr,  # ROPE: [B, Hkv, D] (strides below, last dim contiguous) the step's keys, before RoPE
    vn_ptr,  # ROPE: [B, Hkv, D] the step's values
    cos_ptr,  # ROPE: [Bc, 1, 1, D] q's dtype, last dim contiguous (stride_csb 0 when shared by the batch)
    sin_ptr,  # ROPE: same strides as cos
    slot_ptr,  # ROPE: int64 [B] the new token's pool slot; -1 = a padding token: nothing stored, and its key and
    # value are read from the pool (as attention after a write that skipped it reads them)
    Sq, Hkv, num_splits, split_len, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_ks, stride_kh, stride_btb,
    stride_knb, stride_knh, stride_vnb, stride_vnh, stride_csb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ALIBI: tl.constexpr, SPLIT: tl.constexpr,
    IEEE: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr,
    ONE_TILE: tl.constexpr,  # split_len == BLOCK_N: one K/V tile per program, no loop (decode at small batch)
    EARLY_KV: tl.constexpr,  # with PDL and ONE_TILE: read the context length, block ids and older keys before
    # gdc_wait (the module docstring says why that is safe; the launcher turns it off where it would not be)
    ROPE: tl.constexpr,  # Sq == 1: q and the new key rotated here, the new k/v stored here (module docstring)
):
    tl.static_assert(ONE_TILE or not ROPE, "ROPE is for one-tile programs (the launcher's choice)")
    if PDL:  # programmatic dependent launch (triton_utils.pdl): let the next kernel start, wait for the last one
        tl.extra.cuda.gdc_launch_dependents()
        if not (ONE_TILE and EARLY_KV):
            tl.extra.cuda.gdc_wait()
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor's launcher passes a Python float as fp64 (torch 2.11)
    pid_bh = tl.program_id(0)  # b * Hkv + kv head
    tile = tl.program_id(1)  # query tile
    split = tl.program_id(2)  # KV split
    b = pid_bh // Hkv
    kv_head = pid_bh % Hkv
    n_rows = Sq * GROUP
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] row = query * GROUP + head in group
    row_ok = rows < n_rows
    qi = rows // GROUP  # [BM] query index
    head = kv_head * GROUP + rows % GROUP  # [BM] query head
    d = tl.arange(0, D_PAD)  # [DP]
    d_ok = d < HEAD_DIM
    ctx = tl.load(ctx_ptr + b)
    qpos = ctx - Sq + qi  # [BM] position of each row's query in its sequence
    kv_end = ctx - 1 if ROPE else ctx  # the tiles' keys: ROPE attends to the step's own key from registers

    # keys this tile can see: [0, key_end); keys every (real, non-padding) row sees: [0, full_end)
    first_q = (tile * BLOCK_M) // GROUP
    last_q = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, Sq - 1)
    if CAUSAL:
        key_end = tl.minimum(kv_end, ctx - Sq + last_q + 1)
        # a tile with a left-padding row (position < 0) also holds position 0, so its full_end floors to 0: padding
        # rows only ever meet masked tiles, where causality masks every key for them (they end with l = 0 -> zeros)
        full_end = tl.minimum(kv_end, tl.maximum(ctx - Sq + first_q, 0) + 1)
    else:
        key_end = kv_end
        full_end = kv_end
    full_end = (full_end // BLOCK_N) * BLOCK_N
    lo = split * split_len  # split_len is a multiple of BLOCK_N: tiles stay aligned
    hi = tl.minimum(lo + split_len, key_end)  # <= lo: a split past the context, no iteration
    mid = tl.maximum(tl.minimum(full_end, hi), lo)
    bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_btb
    kv_head_off = kv_head * stride_kh

    if ONE_TILE:  # keys lo..lo+BLOCK_N, masked past key_end (a split past the context reads nothing)
        kpos, token_off, key_ok = _kv_offsets(lo, bt_row_ptr, kv_head_off, key_end, stride_kb, stride_ks, True,
                                              BLOCK_SIZE, BLOCK_N)  # [BN] x 3
        # keys before the step's Sq new ones are not being written now: with EARLY_KV they load before the wait
        # (ROPE: every key of the tile is, the step's own is not in it)
        early = ((kpos * 0 + lo + BLOCK_N) <= ctx - Sq) | ROPE  # [BN], all equal (the interpreter masks only with
        # tensors)
        k, v = _load_kv(k_ptr, v_ptr, token_off, key_ok & early, True, HEAD_DIM, D_PAD)  # [BN, DP] x 2
        if ROPE:  # written by no kernel of the chain either: the token's slot, and the pool's row at its position
            slot = tl.load(slot_ptr + b) + d * 0  # [DP] int64, all equal (the interpreter masks only with tensors)
            k_old, v_old = _pool_row(k_ptr, v_ptr, bt_row_ptr, ctx - 1, kv_head_off, d, d_ok & (slot < 0),
                                     stride_kb, stride_ks, BLOCK_SIZE)  # [DP] x 2 (a padding token's, else zeros)
        if PDL and EARLY_KV:
            tl.extra.cuda.gdc_wait()  # the last kernel is done: q and the step's new keys are written
        if not ROPE:
            k_late, v_late = _load_kv(k_ptr, v_ptr, token_off, key_ok & ~early, True, HEAD_DIM, D_PAD)
            k = tl.where(early[:, None], k, k_late)
            v = tl.where(early[:, None], v, v_late)

    q_off = b.to(tl.int64) * stride_qb + head * stride_qh + qi * stride_qs  # [BM]
    if ROPE:  # Sq == 1: rotate q; the step's key and value come from the projection (module docstring)
        cos = tl.load(cos_ptr + b * stride_csb + d, mask=d_ok, other=0.0).to(tl.float32)  # [DP]
        sin = tl.load(sin_ptr + b * stride_csb + d, mask=d_ok, other=0.0).to(tl.float32)
        q = _rope_rows(q_ptr, q_off, row_ok[:, None] & d_ok[None, :], cos, sin, d, HEAD_DIM)  # [BM, DP] fp32
        q = q.to(q_ptr.dtype.element_ty)
        k_new, v_new = _new_key(kn_ptr, vn_ptr, k_ptr, v_ptr, slot, b, kv_head, kv_head_off, cos, sin, d, d_ok,
                                split == num_splits - 1, tile == 0, stride_knb, stride_knh, stride_vnb, stride_vnh,
                                stride_kb, stride_ks, HEAD_DIM, BLOCK_SIZE)  # [DP] x 2
        k_new = tl.where(slot >= 0, k_new, k_old)  # a padding token: what the pool holds
        v_new = tl.where(slot >= 0, v_new, v_old)
    else:
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, DP]
    if ALIBI:
        slope = tl.load(slopes_ptr + head, mask=row_ok, other=0.0) * 1.4426950408889634  # [BM] log2 units
    else:
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ONE_TILE:
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, kpos, kv_end, qpos, slope, qk_scale, True, CAUSAL, ALIBI,
                                IEEE)
    else:
        for start in tl.range(lo, mid, BLOCK_N, num_stages=NUM_STAGES):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, start, k_ptr, v_ptr, bt_row_ptr, kv_head_off, kv_end, qpos,
                                         slope, stride_kb, stride_ks, qk_scale, False, CAUSAL, ALIBI, IEEE, HEAD_DIM,
                                         D_PAD, BLOCK_SIZE, BLOCK_N)
        for start in tl.range(mid, hi, BLOCK_N, num_stages=NUM_STAGES):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, start, k_ptr, v_ptr, bt_row_ptr, kv_head_off, kv_end, qpos,
                                         slope, stride_kb, stride_ks, qk_scale, True, CAUSAL, ALIBI, IEEE, HEAD_DIM,
                                         D_PAD, BLOCK_SIZE, BLOCK_N)
    if ROPE:  # the step's own key, in the split that holds its position
        new_pos = qi * 0 + ctx - 1  # [BM]
        acc, m_i, l_i = _attend_new(acc, m_i, l_i, q, k_new, v_new, qk_scale,
                                    (new_pos >= lo) & (new_pos < lo + split_len))

    if SPLIT:  # a split with no key for a row (past the context, or a padding row) writes max -inf, sum 0, acc 0
        part = (pid_bh.to(tl.int64) * n_rows + rows) * num_splits + split  # [BM]
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    else:
        keep = l_i > 0.0  # no key at all (context 0, padding row): zeros, not NaN
        out = tl.where(keep[:, None], acc / tl.where(keep, l_i, 1.0)[:, None], 0.0)
        o_off = ((b.to(tl.int64) * (Hkv * GROUP) + head) * Sq + qi) * HEAD_DIM  # [BM]
        tl.store(out_ptr + o_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _pool_row(k_ptr, v_ptr, bt_row_ptr, pos, kv_head_off, d, mask, stride_kb, stride_ks, BLOCK_SIZE: tl.constexpr):
    """The pool's K and V rows [DP] at key position ``pos`` (through the block table), where ``mask`` [DP]."""
    pos = pos + d * 0  # [DP]
    mask = mask & (pos >= 0)
    block = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=mask, other=0)  # [DP], all equal
    off = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_ks + kv_head_off + d  # [DP]
    return tl.load(k_ptr + off, mask=mask, other=0.0), tl.load(v_ptr + off, mask=mask, other=0.0)


@triton.jit
def _new_key(kn_ptr, vn_ptr, k_ptr, v_ptr, slot, b, kv_head, kv_head_off, cos, sin, d, d_ok, last_split, first_tile,
             stride_knb, stride_knh, stride_vnb, stride_vnh, stride_kb, stride_ks, HEAD_DIM: tl.constexpr,
             BLOCK_SIZE: tl.constexpr):
    """ROPE: the step's key (rotated) and value [DP] in the pool's dtype, stored at the token's slot ([DP] int64, all
    equal) by the last split's first query tile; a padding token (slot -1) loads and stores nothing (zeros)."""
    new_ok = d_ok & (slot >= 0)  # [DP]
    kn_row = (b.to(tl.int64) * stride_knb + kv_head * stride_knh) + tl.zeros([1], dtype=tl.int64)  # [1]
    k_new = tl.reshape(_rope_rows(kn_ptr, kn_row, new_ok[None, :], cos, sin, d, HEAD_DIM), [d.shape[0]])  # [DP]
    # rounded as the reference rounds: k_embed in k's dtype, then the pool's
    k_new = k_new.to(kn_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty)
    v_new = tl.load(vn_ptr + b.to(tl.int64) * stride_vnb + kv_head * stride_vnh + d, mask=new_ok,
                    other=0.0).to(v_ptr.dtype.element_ty)  # [DP]
    slot_off = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks + kv_head_off + d  # [DP]
    # the last split's: in grid order (the interpreter's), the splits before it read the pool before this store,
    # as they may on a GPU, and must not depend on it
    if last_split & first_tile:
        tl.store(k_ptr + slot_off, k_new, mask=new_ok)
        tl.store(v_ptr + slot_off, v_new, mask=new_ok)
    return k_new, v_new


@triton.jit
def paged_attention_reduce_kernel(
    m_ptr,  # fp32 [B * Hkv, Sq * GROUP, num_splits]
    l_ptr,  # fp32 [B * Hkv, Sq * GROUP, num_splits]
    acc_ptr,  # fp32 [B * Hkv, Sq * GROUP, num_splits, D]
    out_ptr,  # [B, Hq, Sq, D] contiguous
    Sq, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
):
    """One program per (sequence, KV head, row): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    if PDL:  # programmatic dependent launch (triton_utils.pdl): let the next kernel start, wait for the last one
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)  # [SP]
    d = tl.arange(0, D_PAD)  # [DP]
    s_ok = s < num_splits
    base = (pid_bh.to(tl.int64) * (Sq * GROUP) + row) * num_splits
    m = tl.load(m_ptr + base + s, mask=s_ok, other=float("-inf"))  # [SP]
    l = tl.load(l_ptr + base + s, mask=s_ok, other=0.0)  # [SP]
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)))  # [SP]
    total = tl.sum(w * l, axis=0)
    acc = tl.load(acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
                  mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [SP, DP]
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0.0, total, 1.0)  # [DP]; no key: acc 0 -> zeros
    bh = pid_bh * GROUP + row % GROUP  # b * Hq + query head (pid_bh = b * Hkv + kv head)
    o_off = (bh.to(tl.int64) * Sq + row // GROUP) * HEAD_DIM
    tl.store(out_ptr + o_off + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def kv_write_kernel(
    k_ptr,  # [T, Hkv, D], last dim contiguous
    v_ptr,  # [T, Hkv, D], last dim contiguous (its own strides: v is often a view of the fused qkv output)
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D], last dim contiguous
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D], same strides as k_cache
    slot_ptr,  # int64 [T], -1 = padding row, not stored
    T,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per BLOCK_T tokens of one KV head: rows [T, D] scattered to their slots."""
    if PDL:  # programmatic dependent launch (triton_utils.pdl): let the next kernel start, wait for the last one
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    head = tl.program_id(1)
    d = tl.arange(0, D_PAD)  # [DP]
    slot = tl.load(slot_ptr + tok, mask=tok < T, other=-1)  # [BT] int64
    store_ok = slot >= 0
    k_src = tok.to(tl.int64)[:, None] * stride_kt + head * stride_kh + d[None, :]  # [BT, DP]
    v_src = tok.to(tl.int64)[:, None] * stride_vt + head * stride_vh + d[None, :]  # [BT, DP]
    dst = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + head * stride_ch)[:, None] + d[None, :]
    mask = store_ok[:, None] & (d < HEAD_DIM)[None, :]  # padding rows are neither read nor stored
    k = tl.load(k_ptr + k_src, mask=mask, other=0.0)
    v = tl.load(v_ptr + v_src, mask=mask, other=0.0)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
