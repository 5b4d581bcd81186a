"""``gptq_matmul_kernel``: y = x @ dequant(qweight) (+ bias), HF GPTQ layout, 2/3/4/8 bits (launcher and reference:
``triton_gptq_linear.py``). Nothing but ``@triton.jit`` functions here (see ``triton_utils.kernels``).

The K loop exists twice: FAST, which assumes every row k of this program's K range has ``g_idx[k] == k //
group_size`` (BLOCK_K divides the group size, so a tile is one group and loads one row of scales and zeros) and
counts the rows where that is false as it goes, and a general loop where each row gathers its own group's scale and
zero (any ``g_idx``), which redoes a program whose count is not zero. No data-dependent branch sits inside a loop,
so the software pipeliner can prefetch every load.
"""

import triton
import triton.language as tl

from .triton_utils import kernels

# through kernels(): an interpreted copy of this module must call the interpreted helper, not the JIT one
_silu_mul = kernels("triton_gptq_gemv_kernel")._silu_mul


@triton.jit
def _bits_at(ptr, bit, row_stride, mask, BITS: tl.constexpr):
    """BITS bits starting at bit offset ``bit`` of a little-endian int32 bit stream whose words are ``row_stride``
    elements apart. 3-bit values may straddle two words; 2/4/8-bit values never do."""
    word = bit // 32
    off = bit % 32
    lo = tl.load(ptr + word * row_stride, mask=mask, other=0)
    if BITS == 3:
        hi = tl.load(ptr + (word + 1) * row_stride, mask=mask & (off > 29), other=0)
        lo = lo.to(tl.uint32, bitcast=True) >> off.to(tl.uint32)
        hi = (hi.to(tl.uint32, bitcast=True) << 1) << (31 - off).to(tl.uint32)  # never a shift by 32
        return ((lo | hi) & 7).to(tl.int32)
    else:
        return (lo >> off) & ((1 << BITS) - 1)


@triton.jit
def _weights(qw_ptr, k0, offs_k, mask_k, offs_n, mask_n, N, K, BITS: tl.constexpr, UNPACK_RESHAPE: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Integer weights q [BLOCK_K, BLOCK_N] of rows k0..k0+BLOCK_K."""
    if UNPACK_RESHAPE:  # 2/4/8 bits, k0 a multiple of the values per word: load each word once and split it
        PER: tl.constexpr = 32 // BITS
        wrow = k0 // PER + tl.arange(0, BLOCK_K // PER)  # [BK/PER]
        words = tl.load(qw_ptr + wrow[:, None] * N + offs_n[None, :],
                        mask=(wrow[:, None] < K // PER) & mask_n[None, :], other=0)  # [BK/PER, BN]
        shifts = tl.arange(0, PER) * BITS  # [PER]
        q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BK/PER, PER, BN]
        return tl.reshape(q, (BLOCK_K, BLOCK_N))
    else:  # each row reads its own word (repeated addresses are served by L1)
        return _bits_at(qw_ptr + offs_n[None, :], offs_k[:, None] * BITS, N, mask_k[:, None] & mask_n[None, :], BITS)


@triton.jit
def _group_mismatches(g_ptr, k0, K, group_size, BLOCK_K: tl.constexpr):
    """Rows of the tile at k0 whose g_idx is not k // group_size. The FAST loops assume it is; they count the
    mismatches as they go (one 256-byte load per tile, pipelined with the weights, instead of a serial pass over
    g_idx before the loop, which cost one memory round trip per tile) and the caller redoes a program whose count
    is not zero with the per-row-group loop."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0)
    return tl.sum(((g != offs_k // group_size) & (offs_k < K)).to(tl.int32), axis=0)


@triton.jit
def _k_loop(acc, x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_m, mask_m, offs_n, mask_n, N, K, ZW, stride_xm,
            k_start, k_end, group_size, FAST: tl.constexpr, BITS: tl.constexpr, USE_DOT: tl.constexpr,
            UNPACK_RESHAPE: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
            STAGES: tl.constexpr):
    zbit = offs_n * BITS  # [BN] bit offset of column n's zero point in a qzeros row
    bad = tl.sum(tl.zeros((BLOCK_K,), dtype=tl.int32), axis=0)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)  # [BM, BK]
        q = _weights(qw_ptr, k0, offs_k, mask_k, offs_n, mask_n, N, K, BITS, UNPACK_RESHAPE, BLOCK_K, BLOCK_N)
        if FAST:  # the tile is one group: one row of scales and zeros
            bad += _group_mismatches(g_ptr, k0, K, group_size, BLOCK_K)
            g = k0 // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]  # [1, BN]
            z = _bits_at(qz_ptr + g * ZW, zbit, 1, mask_n, BITS)[None, :]  # [1, BN]
        else:  # any g_idx: each row its own group
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)  # [BK]
            gmask = mask_k[:, None] & mask_n[None, :]
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)  # [BK, BN]
            z = _bits_at(qz_ptr + g[:, None] * ZW, zbit[None, :], 1, gmask, BITS)  # [BK, BN]
        w = ((q - z).to(tl.float32) * s).to(x.dtype)  # the reference's rounding: fp32 dequant, then x's dtype
        if USE_DOT:
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        else:  # BLOCK_M == 1 (decode): multiply and reduce over K in registers
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc, bad


@triton.jit
def _k_loop_interleaved(acc, x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_m, mask_m, offs_n, mask_n, N, K, ZW,
                        stride_xm, k_start, k_end, group_size, FAST: tl.constexpr, BITS: tl.constexpr,
                        IEEE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """2/4/8 bits with tl.dot: value j of every packed word is its own [BLOCK_K/PER, BLOCK_N] operand (rows
    r*PER + j), paired with the matching strided columns of x; no reshape or layout shuffle of the weight tile."""
    PER: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PER
    zbit = offs_n * BITS
    bad = tl.sum(tl.zeros((BLOCK_K,), dtype=tl.int32), axis=0)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        rows = k0 // PER + tl.arange(0, BKW)  # [BKW]
        words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=(rows[:, None] < K // PER) & mask_n[None, :], other=0)  # [BKW, BN]
        if FAST:
            bad += _group_mismatches(g_ptr, k0, K, group_size, BLOCK_K)
            g = k0 // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]  # [1, BN]
            z = _bits_at(qz_ptr + g * ZW, zbit, 1, mask_n, BITS)[None, :]
        for j in tl.static_range(PER):
            kj = rows * PER + j  # [BKW] input channels of value j
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kj[None, :],
                        mask=mask_m[:, None] & (kj[None, :] < K), other=0.0)  # [BM, BKW]
            if not FAST:
                gj = tl.load(g_ptr + kj, mask=kj < K, other=0)
                gmask = (kj < K)[:, None] & mask_n[None, :]
                s = tl.load(s_ptr + gj[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
                z = _bits_at(qz_ptr + gj[:, None] * ZW, zbit[None, :], 1, gmask, BITS)
            q = (words >> (j * BITS)) & ((1 << BITS) - 1)
            w = ((q - z).to(tl.float32) * s).to(x.dtype)  # [BKW, BN]
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
    return acc, bad


@triton.jit
def gptq_matmul_kernel(
    x_ptr,  # [M, K], row stride stride_xm
    qw_ptr,  # int32 [K*BITS/32, N]
    qz_ptr,  # int32 [G, ZW]
    s_ptr,  # [G, N]
    g_ptr,  # int32 [K]
    b_ptr,  # [N] (unused without HAS_BIAS)
    y_ptr,  # [M, N]; fp32 and zeroed when ATOMIC
    M, N, K, ZW, stride_xm, stride_ym,
    k_per_split,  # K rows per program along grid axis 1, a multiple of BLOCK_K
    group_size,  # rows per group (K for one group)
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,  # split-K: partial sums added atomically
    FAST_OK: tl.constexpr,  # BLOCK_K divides group_size (or there is one group): the FAST loop may be used
    USE_DOT: tl.constexpr,  # False only for BLOCK_M == 1
    UNPACK_RESHAPE: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 activations: exact fp32 dot (no tf32)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERLEAVE: tl.constexpr = False,  # dot per packed-value position (2/4/8 bits, BLOCK_K/PER >= 16)
    NUM_STAGES: tl.constexpr = 3,  # pipelining depth of the FAST loop (the per-row-group loop uses 1: its
    # gathered scale/zero tiles would not fit shared memory several times over)
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row blocks walk the N tiles together, so a weight tile is read from HBM about once
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FAST_OK:  # assume g_idx is k // group_size (sorted act-order weights are, too); the loop checks it
        if INTERLEAVE:
            acc, bad = _k_loop_interleaved(acc, x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_m, mask_m, offs_n, mask_n,
                                           N, K, ZW, stride_xm, k_start, k_end, group_size, True, BITS, IEEE,
                                           BLOCK_K, BLOCK_N, NUM_STAGES)
        else:
            acc, bad = _k_loop(acc, x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_m, mask_m, offs_n, mask_n, N, K, ZW,
                               stride_xm, k_start, k_end, group_size, True, BITS, USE_DOT, UNPACK_RESHAPE, IEEE,
                               BLOCK_K, BLOCK_N, NUM_STAGES)
        if bad != 0:  # it is not: redo this program with per-row groups
            acc, bad = _k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr,
                               offs_m, mask_m, offs_n, mask_n, N, K, ZW, stride_xm, k_start, k_end, group_size,
                               False, BITS, USE_DOT, UNPACK_RESHAPE, IEEE, BLOCK_K, BLOCK_N, 1)
    else:
        acc, bad = _k_loop(acc, x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_m, mask_m, offs_n, mask_n, N, K, ZW,
                           stride_xm, k_start, k_end, group_size, False, BITS, USE_DOT, UNPACK_RESHAPE, IEEE,
                           BLOCK_K, BLOCK_N, 1)

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]  # the first K split adds the bias
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=ymask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


# ----------------------------------------------------------------------------------------------------------------
# gptq_dot_kernel: decode batches (M = 2..64), 2/4/8 bits, fp16/bf16 activations, g_idx plain k // group_size


@triton.jit
def _word_bits(ptr, bit, mask, BITS: tl.constexpr):
    """BITS bits at bit offset ``bit`` of a little-endian int32 word stream (2/4/8 bits never straddle words)."""
    return (tl.load(ptr + bit // 32, mask=mask, other=0) >> (bit % 32)) & ((1 << BITS) - 1)


@triton.jit
def _value(lo, hi, z, magic, J: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """q - z of value J of every word, exact, in DT. lo: the words, hi: the words >> 16; z [BN] zero points.
    Value j of a 16-bit half-word sits at bit jb = j*BITS: masked in place and or-ed with the exponent of
    2**(23 - jb) its bits are the float 2**(23 - jb) + q; subtracting 2**(23 - jb) + z leaves q - z (no shift
    per value, no int-to-float conversion). ``magic`` is a run-time 0x4B000000 so LLVM cannot fold it back."""
    HALF: tl.constexpr = 16 // BITS
    JB: tl.constexpr = (J % HALF) * BITS
    magic_j = magic - (JB << 23)
    zf = ((z << JB) + magic_j).to(tl.float32, bitcast=True)[:, None]  # [BN, 1]; + not |: one LEA/IMAD
    if J < HALF:
        f = ((lo & (((1 << BITS) - 1) << JB)) | magic_j).to(tl.float32, bitcast=True)
    else:
        f = ((hi & (((1 << BITS) - 1) << JB)) | magic_j).to(tl.float32, bitcast=True)
    return (f - zf).to(DT)


@triton.jit
def _values(lo, hi, z, magic, J0: tl.constexpr, STEP: tl.constexpr, CNT: tl.constexpr, BITS: tl.constexpr,
            DT: tl.constexpr):
    """Values J0, J0+STEP, ... (CNT of them) of every word joined along new trailing dims, lowest J innermost:
    with J0=0, STEP=1, CNT=32//BITS the result reshapes to [BN, BKW*PER] in input-channel order k = r*PER + j."""
    if CNT == 1:
        return _value(lo, hi, z, magic, J0, BITS, DT)
    else:
        return tl.join(_values(lo, hi, z, magic, J0, STEP * 2, CNT // 2, BITS, DT),
                       _values(lo, hi, z, magic, J0 + STEP, STEP * 2, CNT // 2, BITS, DT))


@triton.jit
def _x_by_value(x_ptr, offs_m, mask_m, stride_xm, k0, k_end, HALF: tl.constexpr, HW: tl.constexpr):
    """x's tile k0 for the half-word dots, [HW, BM, HALF]: element (c, m, j) is x[m, k0 + HALF*c + j], the input
    channel of value j of half-word c. The HALF values of a (c, m) are adjacent in memory (one vector load) and
    in-thread (``tl.split`` takes them apart without moving data). Nothing from k_end on: the prefetch after a
    program's last tile reads nothing, and a partial last tile reads zeros."""
    k = k0 + HALF * tl.arange(0, HW)[:, None, None] + tl.arange(0, HALF)[None, None, :]  # [HW, 1, HALF]
    return tl.load(x_ptr + offs_m[None, :, None] * stride_xm + k, mask=mask_m[None, :, None] & (k < k_end),
                   other=0.0)


@triton.jit
def _half_word_dots(t, words, xv, J0: tl.constexpr, STEP: tl.constexpr, CNT: tl.constexpr, BITS: tl.constexpr,
                    MAGIC16: tl.constexpr, DT: tl.constexpr):
    """t [BN, BM] += sum over the CNT value positions j = J0, J0+STEP, ... of (value j of every half-word of the
    tile, as MAGIC16 + q) @ x_j. words [BN, BKW] int32, each two half-words (c = 2r low, 2r + 1 high); xv [HW, BM,
    2, ...] ``_x_by_value``'s tile with the value positions along the trailing dims, lowest bit of j last
    (``tl.split`` peels one bit per level).
    Value j of both half-words of a word comes out with one shift and one and-or on the 32-bit word: masked in
    place and or-ed with MAGIC16 in each half, its bits are the 16-bit float MAGIC16 + q (bf16 0x4300 = 128, fp16
    0x6400 = 1024, both with a unit last mantissa bit, so exact). The join and reshape into [BN, HW] put the two
    halves of a word at adjacent k, the pair a tensor-core operand register holds, so Triton loads the words from
    shared memory straight into the operand layout: no shared-memory round trip of the dequantized tile and no
    16-bit shifts (which LLVM splits into unpack, shift and repack). The offset and the zero point come off after
    the dot (the caller), not per value: a packed bf16 subtraction of MAGIC16 + z here made LLVM swap the halves of
    every pair before and after it (2 PRMT per word and value, H100 session 18: 2-11% slower)."""
    if CNT == 1:
        M2: tl.constexpr = ((1 << BITS) - 1) * 0x10001  # BITS bits at the bottom of each half
        v = ((words >> (J0 * BITS)) & M2) | (MAGIC16 * 0x10001)  # [BN, BKW] two MAGIC16 + q per word
        a = tl.join(v.to(tl.int16), (v >> 16).to(tl.int16)).reshape(words.shape[0], 2 * words.shape[1])
        return tl.dot(a.to(DT, bitcast=True), xv, t)  # [BN, HW] @ [HW, BM]
    else:
        x_even, x_odd = tl.split(xv)
        t = _half_word_dots(t, words, x_even, J0, STEP * 2, CNT // 2, BITS, MAGIC16, DT)
        return _half_word_dots(t, words, x_odd, J0 + STEP, STEP * 2, CNT // 2, BITS, MAGIC16, DT)


@triton.jit
def _any_group_rows(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_m, mask_m, offs_n, mask_n, N, K, ZW, stride_xm,
                    k_start, k_end, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The slow path of ``gptq_dot_kernel``, correct for any g_idx (unsorted act-order called directly): one input
    channel at a time, each with its own group's scale and zero, as an outer product. [BN, BM] fp32. Only [BN] and
    [BM] vectors besides the accumulator, so it does not crowd the main loop's registers."""
    PER: tl.constexpr = 32 // BITS
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_start, k_end):
        word = tl.load(qw_ptr + (k // PER) * N + offs_n, mask=mask_n, other=0)  # [BN]
        g = tl.load(g_ptr + k)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = _word_bits(qz_ptr + g * ZW, offs_n * BITS, mask_n, BITS)
        w = ((word >> ((k % PER) * BITS)) & ((1 << BITS) - 1)) - z
        x = tl.load(x_ptr + offs_m * stride_xm + k, mask=mask_m, other=0.0).to(tl.float32)  # [BM]
        acc += (w.to(tl.float32) * s)[:, None] * x[None, :]
    return acc


@triton.jit
def gptq_dot_kernel(
    x_ptr,  # [M, K], row stride stride_xm, fp16 or bf16
    qw_ptr,  # int32 [K*BITS/32, N]
    qz_ptr,  # int32 [G, ZW]
    s_ptr,  # [G, N]
    g_ptr,  # int32 [K]
    b_ptr,  # [N] (unused without HAS_BIAS)
    res_ptr,  # [M, N] residual added to y, y's strides (RESIDUAL only)
    y_ptr,  # [M, N], x's dtype, row stride stride_ym
    part_ptr,  # fp32 [K splits, M, N] partial sums (SPLIT only)
    lock_ptr,  # int32 [>= output tiles], all zero between launches (SPLIT only)
    M, N, K, ZW, stride_xm, stride_ym,
    k_per_split,  # K rows per program along grid axis 2, a multiple of BLOCK_K
    magic,  # 0x4B000000, the bits of the float 2**23 (a run-time value: see _value)
    half_shift,  # 16
    BITS: tl.constexpr,  # 2, 4 or 8
    HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,  # y += residual (gptq_linear_fused: the residual add after o_proj / down_proj)
    SILU_MUL: tl.constexpr,  # y [M, N/2] = silu(gate) * up of the [gate | up] columns (needs SPLIT; see below)
    SPLIT: tl.constexpr,  # partial sums per program along K, the last program of a tile (or tile pair) reduces
    GROUP_TILES: tl.constexpr,  # group_size // BLOCK_K (BLOCK_K divides the group), 0 for one group
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no column masks
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no row masks
    BLOCK_M: tl.constexpr,  # >= 16 (the dot's N side)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 32 // BITS, <= the group (a tile is one group)
    STAGES: tl.constexpr,  # software-pipelining depth of the K loop
    MAGIC16: tl.constexpr = 0,  # 0x4300 (bf16) / 0x6400 (fp16): dequantize by half-words (_half_word_dots); 0: by
    # words (_values). Half-words need BITS <= 4 (bf16) or 8 (fp16) and 2 * BLOCK_K // (32 // BITS) >= 16
    PDL: tl.constexpr = False,  # programmatic dependent launch (triton_utils.pdl)
):
    """y = x @ dequant(W) (+ bias) for small M, computed transposed: y^T [BN, BM] += W^T [BN, BK] @ x^T [BK, BM],
    so the dequantized weight tile is the dot's left operand (on the H100 a wgmma operand in registers; the
    64-row instruction side is the weights, the small side the batch) and x^T the right one (straight from the
    pipelined shared-memory copy). Per tile: words [BN, BKW] -> PER values each, exactly q - z in x's dtype
    (``_value``), joined into [BN, BK] in input-channel order, one dot with K = BLOCK_K; the group's scale is
    applied to the tile's fp32 result (each tile is one group). The check that g_idx is k // group_size is one
    compare per row per tile, reduced once after the loop; a program where it fails redoes its rows one input
    channel at a time. Split-K: each split stores fp32 partial sums; the last split of an output tile to arrive
    (an atomic counter) adds them in split order, adds the bias, writes y and resets the counter. With SILU_MUL
    (``act="silu_mul"``: the columns are [gate | up]) column tiles t and t + tiles / 2 count on one counter, and the
    last of their 2 x splits programs writes y[:, t's columns] = silu(gate) * up (as the gemv kernel does).

    With MAGIC16 (16-row blocks) each word is taken as two 16-bit half-words, and the tile is contracted as PER // 2
    dots, one per value position j (``_half_word_dots``): half-word c holds input channels HALF*c + j, so x's tile
    comes in as [HW, BM, HALF] (``_x_by_value``: the HALF channels of a half-word are adjacent, one vector load),
    a tile ahead in registers, and ``tl.split`` hands each dot its x_j. Each operand is MAGIC16 + q, exact; the
    offset and the zero point come off once per tile from the sum of x: s * (t - (MAGIC16 + z) * sum_k x). On the
    H100 (session 18, benchmarks/RESULTS.md; 128-deep tiles, one wave) this is 1.17-1.42x faster at M=2..16 on the
    7B shapes than session 6's half-words, which shifted 16-bit values (unpack + shift + repack each) and moved
    every x_j through shared memory behind a barrier and a tensor-core wait. Words stay for 64-row blocks, where
    half-words ran 1.4x slower in session 6."""
    PER: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PER
    DT: tl.constexpr = x_ptr.dtype.element_ty
    HALF: tl.constexpr = PER // 2  # values per 16-bit half-word
    HW: tl.constexpr = 2 * BKW  # half-words per column per tile (MAGIC16)
    if PDL:  # programmatic dependent launch (triton_utils.pdl): let the next kernel start, wait for the last one
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_m = tl.program_id(0)  # fastest: the row blocks of one column tile run together (weights read once)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    bad = tl.zeros((BLOCK_K,), dtype=tl.int32)  # per tile row: how often its g_idx was not k // group_size
    if MAGIC16 != 0:  # x's first tile; the loop loads each next one a tile ahead, into registers
        x_next = _x_by_value(x_ptr, offs_m, mask_m, stride_xm, k_start, k_end, HALF, HW)  # [HW, BM, HALF]
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        rows = k0 // PER + tl.arange(0, BKW)  # [BKW] word rows
        g = 0 if GROUP_TILES == 0 else k0 // BLOCK_K // GROUP_TILES  # the tile's group
        w_ptrs = qw_ptr + offs_n[:, None] + rows[None, :] * N  # [BN, BKW] words
        if EVEN_K:
            bad += (tl.load(g_ptr + offs_k) != g).to(tl.int32)
            if EVEN_N:
                words = tl.load(w_ptrs)
            else:
                words = tl.load(w_ptrs, mask=mask_n[:, None], other=0)
        else:
            bad += ((tl.load(g_ptr + offs_k, mask=offs_k < K, other=0) != g) & (offs_k < K)).to(tl.int32)
            words = tl.load(w_ptrs, mask=mask_n[:, None] & (rows < K // PER)[None, :], other=0)
        if EVEN_N:
            s = tl.load(s_ptr + g * N + offs_n).to(tl.float32)  # [BN]
            z = _word_bits(qz_ptr + g * ZW, offs_n * BITS, offs_n >= 0, BITS)  # [BN]
        else:
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = _word_bits(qz_ptr + g * ZW, offs_n * BITS, mask_n, BITS)
        if MAGIC16 == 0:
            x_ptrs = x_ptr + offs_k[:, None] + offs_m[None, :] * stride_xm  # [BK, BM]
            if EVEN_K:
                x = tl.load(x_ptrs, mask=mask_m[None, :], other=0.0)
            else:
                x = tl.load(x_ptrs, mask=(offs_k < K)[:, None] & mask_m[None, :], other=0.0)
            w = tl.reshape(_values(words, words >> half_shift, z, magic, 0, 1, PER, BITS, DT), (BLOCK_N, BLOCK_K))
            acc += tl.dot(w, x) * s[:, None]
        else:
            x = x_next
            x_next = _x_by_value(x_ptr, offs_m, mask_m, stride_xm, k0 + BLOCK_K, k_end, HALF, HW)
            if HALF == 2:
                xv = x
            elif HALF == 4:
                xv = tl.reshape(x, (HW, BLOCK_M, 2, 2))
            else:
                xv = tl.reshape(x, (HW, BLOCK_M, 2, 2, 2))
            t = _half_word_dots(tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), words, xv, 0, 1, HALF, BITS,
                                MAGIC16, DT)  # [BN, BM]: sum over the tile of (MAGIC16 + q) * x
            xs = tl.sum(tl.sum(x.to(tl.float32), axis=2), axis=0)  # [BM] the tile's sum of x
            off = tl.full((), MAGIC16, tl.int16).to(DT, bitcast=True).to(tl.float32)  # 128.0 or 1024.0
            acc += t * s[:, None] - (s * (z.to(tl.float32) + off))[:, None] * xs[None, :]
    if tl.sum(bad, axis=0) != 0:  # g_idx is not k // group_size here: per-row groups
        acc = _any_group_rows(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_m, mask_m, offs_n, mask_n, N, K, ZW,
                              stride_xm, k_start, k_end, BITS, BLOCK_M, BLOCK_N)

    y_off = offs_m[None, :] * stride_ym + offs_n[:, None]  # [BN, BM]
    ymask = mask_n[:, None] & mask_m[None, :]
    tl.static_assert(SPLIT or not SILU_MUL, "SILU_MUL reduces the gate and up tiles through the split-K path")
    if SPLIT:
        tl.store(part_ptr + pid_k * M * N + offs_m[None, :] * N + offs_n[:, None], acc, mask=ymask)
        tl.debug_barrier()  # every thread's partial sums are stored before the release below
        if SILU_MUL:  # gate tile t and up tile t + pairs share counter t
            col_tile = pid_n % (tl.num_programs(1) // 2)
            arrivals = 2 * tl.num_programs(2)
        else:
            col_tile = pid_n
            arrivals = tl.num_programs(2)
        tile = col_tile * tl.num_programs(0) + pid_m
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == arrivals - 1:  # the last split of this tile (pair): reduce, in split order
            if SILU_MUL:
                offs_g = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] gate columns; up: + N // 2
                gmask = (offs_g < N // 2)[:, None] & mask_m[None, :]
                g = _dot_partials(part_ptr, M, N, offs_m, offs_g, gmask, b_ptr, HAS_BIAS, BLOCK_M, BLOCK_N)
                u = _dot_partials(part_ptr, M, N, offs_m, N // 2 + offs_g, gmask, b_ptr, HAS_BIAS, BLOCK_M,
                                  BLOCK_N)
                tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_g[:, None],
                         _silu_mul(g, u, y_ptr.dtype.element_ty), mask=gmask)
            else:
                acc = _dot_partials(part_ptr, M, N, offs_m, offs_n, ymask, b_ptr, HAS_BIAS, BLOCK_M, BLOCK_N)
                if RESIDUAL:
                    acc += tl.load(res_ptr + y_off, mask=ymask, other=0.0).to(tl.float32)
                tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=ymask)
            tl.atomic_xchg(lock_ptr + tile, 0)  # zero again for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if RESIDUAL:
            acc += tl.load(res_ptr + y_off, mask=ymask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _dot_partials(part_ptr, M, N, offs_m, offs_n, mask, b_ptr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """gptq_dot_kernel's split-K sum of the [BN, BM] output tile at (offs_n, offs_m), in split order, + bias. Four
    splits' loads are in flight at once: one at a time waited an L2 round trip per split (H100, session 18: o
    4096x4096 at M=16, 17 splits, 16.2 -> 14.1 us). Four [BN, BM] tiles in the accumulator's own layout, so no
    data moves between threads (a [4, BN, BM] load summed over its first axis ran 1.4-2.4x slower)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    splits = tl.num_programs(2)
    p = part_ptr + offs_m[None, :] * N + offs_n[:, None]  # [BN, BM]
    for i in range(0, splits, 4):
        more = offs_n[:, None] * 0 + i  # [BN, 1] (a tensor: the interpreter masks only with tensors)
        p0 = tl.load(p + i * M * N, mask=mask, other=0.0, cache_modifier=".cg")
        p1 = tl.load(p + (i + 1) * M * N, mask=mask & (more + 1 < splits), other=0.0, cache_modifier=".cg")
        p2 = tl.load(p + (i + 2) * M * N, mask=mask & (more + 2 < splits), other=0.0, cache_modifier=".cg")
        p3 = tl.load(p + (i + 3) * M * N, mask=mask & (more + 3 < splits), other=0.0, cache_modifier=".cg")
        acc = acc + p0  # in split order: the sum does not depend on which split arrived last
        acc = acc + p1
        acc = acc + p2
        acc = acc + p3
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def gptq_dequant_kernel(qw_ptr, qz_ptr, s_ptr, g_ptr, w_ptr, N, K, ZW, n0, NC, stride_w, BITS: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_TILES: tl.constexpr):
    """Prefill: columns n0 .. n0 + NC of the weight dequantized to w [K, NC] (row stride ``stride_w``, the
    activation dtype), for one cuBLAS GEMM after it; N is the packed weight's column count. One [BLOCK_K, BLOCK_N]
    tile per program. 2/4/8 bits: each packed word is loaded once and its PER values stored to rows r*PER + j, one
    [BKW, BN] store per j straight from the word tile's registers (unpacking into [BK, BN] first costs a layout
    conversion through shared memory: 1.3-1.8x slower on the H100, RESULTS.md session 13). Where the tile lies in one
    group (GROUP_TILES >= 0: group_size // BLOCK_K, 0 for one group) and g_idx agrees (checked per tile), one row of
    scales and zeros serves the whole tile; otherwise every row gathers its own (act-order called directly)."""
    pid_k = tl.program_id(0)
    offs_n = n0 + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of the packed weight
    mask_n = offs_n < tl.minimum(n0 + NC, N)
    w_cols = w_ptr + (offs_n - n0)[None, :]  # [1, BN]
    zbit = (offs_n * BITS)[None, :]  # [1, BN]
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    if BITS == 3:  # values straddle words: one gathered load per value (no speed work here)
        mask = (offs_k < K)[:, None] & mask_n[None, :]
        q = _bits_at(qw_ptr + offs_n[None, :], offs_k[:, None] * BITS, N, mask, BITS)  # [BK, BN]
        g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0)
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        z = _bits_at(qz_ptr + g[:, None] * ZW, zbit, 1, mask, BITS)
        w = (q - z).to(tl.float32) * s
        tl.store(w_cols + offs_k[:, None] * stride_w, w.to(w_ptr.dtype.element_ty), mask=mask)
    else:
        PER: tl.constexpr = 32 // BITS
        BKW: tl.constexpr = BLOCK_K // PER
        rows = pid_k * BKW + tl.arange(0, BKW)  # [BKW]
        wmask = (rows < K // PER)[:, None] & mask_n[None, :]  # [BKW, BN]
        words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=wmask, other=0)  # [BKW, BN]
        plain = False  # (a run-time value below where tiles may be whole groups)
        g0 = 0 if GROUP_TILES <= 0 else pid_k // GROUP_TILES  # the tile's group if g_idx is k // group_size
        if GROUP_TILES >= 0:
            g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=g0)  # [BK]
            plain = tl.sum((g != g0).to(tl.int32), axis=0) == 0
        if plain:  # one row of scales and zeros for the tile
            s_row = tl.load(s_ptr + g0 * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]  # [1, BN]
            z_row = _bits_at(qz_ptr + g0 * ZW, zbit, 1, mask_n[None, :], BITS)  # [1, BN]
            for j in tl.static_range(PER):
                w = (((words >> (j * BITS)) & ((1 << BITS) - 1)) - z_row).to(tl.float32) * s_row
                tl.store(w_cols + (rows * PER + j)[:, None] * stride_w, w.to(w_ptr.dtype.element_ty), mask=wmask)
        else:  # every row its own group
            for j in tl.static_range(PER):
                kj = rows * PER + j  # [BKW]
                gj = tl.load(g_ptr + kj, mask=kj < K, other=0)
                s = tl.load(s_ptr + gj[:, None] * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
                z = _bits_at(qz_ptr + gj[:, None] * ZW, zbit, 1, wmask, BITS)
                w = (((words >> (j * BITS)) & ((1 << BITS) - 1)) - z).to(tl.float32) * s
                tl.store(w_cols + kj[:, None] * stride_w, w.to(w_ptr.dtype.element_ty), mask=wmask)
