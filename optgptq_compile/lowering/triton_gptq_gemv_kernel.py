"""``gptq_gemv_kernel``: y[N] = x[K] @ dequant(qweight) (+ bias) for decode (one activation row), 2/4/8 bits, HF
GPTQ layout (launcher and reference: ``triton_gptq_linear.py``). Nothing but ``@triton.jit`` functions here.

At M == 1 a GEMV on the H100 should be bound by HBM; the instructions it issues per weight are counted with
``benchmarks/sass_loop.py`` (the SASS main loop's instructions per weight):

* Dequant as a subnormal float, no shift and no subtraction per value: value j of a 16-bit half-word sits at bit
  j*BITS; masked in place, its bits read as an fp32 are the subnormal q * 2**(j*BITS - 149), exactly. x is scaled
  by 2**(X_EXP - j*BITS) (a power of two: exact) once per x value, so every product x' * f is x * q * 2**-85 in the
  normal range, and an FFMA chain sums them. The zero point leaves the loop: sum_k x*(q - z) = sum_k x*q - z *
  sum_k x, with sum_k x summed once per tile from the x values the thread already holds. Per weight: one LOP3 and
  one FFMA; one shift per word for its high half. (Session 4 or-ed an exponent into each value and subtracted
  2**e + z per weight: one FADD more; this build has 3.8 instead of 4.5 SASS instructions per weight and 96
  instead of 120 registers, with fp32 accuracy within 1.5x of the old one, both ~5x better than an fp32 reference
  that rounds dequantized weights.) Limits: |x| < 2**64 (x' overflows to inf past that).
* The half-word shift arrives as a run-time argument (``half_shift``): as a constant, LLVM turned the shifted
  masks into shift + bit-extract pairs.
* Layout: the lanes of a warp spread over columns only while the tile has at least 128 columns per warp (32 lanes
  x 4-word vectors; the launcher's 1 warp x 128 columns, or 2 warps x 256, keep every word row of a tile
  in-thread); warps left over split the rows, where ACC_ROWS keeps per-row sums until after the K loop. Either way
  the sum over K is an in-thread FFMA chain, never a per-tile shuffle or barrier, and every thread holds the tile's
  x values itself (all lanes of a warp load the same addresses) and reuses them across its columns.
* Register prefetch, not shared memory: the K loop loads tile i+1 (weights, scales, zeros, g_idx and x) into
  registers before it computes tile i, and the launcher compiles it with ``num_stages=1``, so there is no
  ``cp.async``, shared-memory round trip or barrier per tile. x comes in with the weights as 16-byte rows of int32
  pairs and is taken apart in registers (``_column``): 8 vector loads per tile instead of 32 scalar ones. The
  loads are predicated (the prefetch past a program's last tile reads nothing; ragged N masks columns).
  Session 7 (H100, RESULTS.md): a 7B layer's four GEMVs 64.1 -> 59.4 us with 1-warp programs, against the
  cp.async pipeline of session 5.
* The check that ``g_idx`` is ``k // group_size`` is one compare per row per tile, reduced once after the loop.
* Split-K without extra kernels: each split stores fp32 partial sums, the last split of a column tile to arrive
  (an atomic counter) adds them in split order, adds the bias, writes y in x's dtype and resets the counter. No
  zero fill, no cast kernel, and the sum is deterministic.
* RMSNorm before, residual after (``optgptq::gptq_linear_fused``, NORM / RESIDUAL): y = r * ((x * w) @ W) + bias
  + residual with r = rsqrt(mean(x**2) + eps). The norm weight w comes in with x (the same int32 pairs) and scales
  each x value; the sum of x**2 over a program's rows rides along with the zero-point sum, is stored next to the
  partials (one value per split and column tile) and summed by the last split, which then knows r for the whole
  row. So the Llama layer's "residual add + RMSNorm" kernels vanish into the GEMVs on either side of them.
* silu(gate) * up (SILU_MUL, ``act="silu_mul"``): the weight's columns are [gate | up], so column tile t (gate) and
  t + tiles / 2 (up) hold the two halves of the same outputs. Both count their splits on one counter; the last of
  the 2 x splits programs to arrive reduces both tiles' partial sums and writes y[t's columns] = silu(g) * u,
  rounding g, u and silu(g) to x's dtype as HF's MLP does. The loop is unchanged (weights stay in place); the
  launcher keeps the split-K path even for one split and needs N / 2 to be a multiple of BLOCK_N.
* Programmatic dependent launch (PDL, CUDA sm90+; ``triton_utils.pdl``): every program first releases the next
  kernel on the stream (``gdc_launch_dependents``), then loads its first weight tile -- weights depend on no earlier
  kernel -- and only then waits for the previous kernel to finish (``gdc_wait``) before it reads x or touches the
  split-K buffers and counters. So this GEMV's launch and first loads overlap the tail of the kernel before it (in a
  CUDA graph too). H100, session 10 (RESULTS.md): a 7B layer's four GEMVs back to back 63.0 -> 59.0 us.
"""

import triton
import triton.language as tl


@triton.jit
def _word_bits(ptr, bit, mask, BITS: tl.constexpr):
    """BITS bits at bit offset ``bit`` of a little-endian int32 word stream (2/4/8 bits never straddle words)."""
    return (tl.load(ptr + bit // 32, mask=mask, other=0) >> (bit % 32)) & ((1 << BITS) - 1)


@triton.jit
def _column(xw, C: tl.constexpr, W: tl.constexpr):
    """Column C of xw [R, W] (W a power of two), by splits of in-thread register pairs: no data moves."""
    if W == 2:
        a, b = tl.split(xw)
        r = a if C == 0 else b
    else:
        a, b = tl.split(xw.reshape(xw.shape[0], W // 2, 2))  # even and odd columns
        r = _column(a if C % 2 == 0 else b, C // 2, W // 2)
    return r


@triton.jit
def _x_pair(x_ptr, xw, rows, p, K, EVEN_K: tl.constexpr, X_PAIRS: tl.constexpr, PAIRS: tl.constexpr):
    """fp32 x values 2p and 2p + 1 of each word row [BKW]. With X_PAIRS (16-bit x, K a multiple of BLOCK_K) they
    come from xw, the tile's x as int32 pairs [BKW, PAIRS] loaded with the weights (one 16-byte load per row and
    thread, prefetched a tile ahead); otherwise two loads each."""
    if X_PAIRS:
        w = _column(xw, p, PAIRS)  # [BKW] two 16-bit values, little-endian
        dt = x_ptr.dtype.element_ty
        if dt == tl.bfloat16:  # a bf16 is the top half of its fp32: one shift or one mask each
            lo = (w << 16).to(tl.float32, bitcast=True)
            hi = (w & -65536).to(tl.float32, bitcast=True)
        else:
            lo = w.to(tl.int16).to(dt, bitcast=True).to(tl.float32)
            hi = (w >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
    else:
        k = rows * (2 * PAIRS) + 2 * p  # [BKW]
        if EVEN_K:
            lo = tl.load(x_ptr + k).to(tl.float32)
            hi = tl.load(x_ptr + k + 1).to(tl.float32)
        else:
            lo = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            hi = tl.load(x_ptr + k + 1, mask=k + 1 < K, other=0.0).to(tl.float32)
    return lo, hi


X_EXP = tl.constexpr(64)  # x is scaled by 2**(X_EXP - j*BITS): see _tile
UNSCALE = tl.constexpr(2.0 ** (149 - X_EXP.value))  # what the products x' * f are short of x * q


@triton.jit
def _tile(words, xw, ww, x_ptr, nw_ptr, rows, K, half_shift, EVEN_K: tl.constexpr, X_PAIRS: tl.constexpr,
          NORM: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr):
    """One tile (one group) without its zero point and scale: t [BKW, BN] fp32 with sum over rows of t equal to
    sum_k x[k] * q[k, n] / UNSCALE, xs [BKW] fp32, the sum of each row's x values (for the zero point), and sq
    [BKW], the sum of each row's x**2 (NORM; x is then x * w and xs sums those). words [BKW, BN] int32, rows [BKW]
    their word rows, xw / ww [BKW, PER // 2] their x / norm-weight pairs (X_PAIRS only)."""
    HALF: tl.constexpr = PER // 2  # values per 16-bit half-word (2, 4 or 8: even)
    MASK: tl.constexpr = (1 << BITS) - 1
    t = tl.zeros(words.shape, dtype=tl.float32)  # [BKW, BN]: one FFMA chain per element over the values j
    xs = tl.zeros((words.shape[0],), dtype=tl.float32)  # [BKW]
    sq = tl.zeros((words.shape[0],), dtype=tl.float32)  # [BKW] (NORM only)
    for half in tl.static_range(2):  # the low 16-bit half-word of every word, then the high one
        if half == 1:
            words = words >> half_shift  # in place: the low half is done (the sign bits are masked off below)
        for jj in tl.static_range(HALF // 2):  # values j = 2*jj and 2*jj + 1: one pair of x values
            p = half * (HALF // 2) + jj
            x_lo, x_hi = _x_pair(x_ptr, xw, rows, p, K, EVEN_K, X_PAIRS, PER // 2)  # [BKW]
            if NORM:  # the norm's statistics from x itself, the GEMV's input is x * w
                sq += x_lo * x_lo + x_hi * x_hi
                w_lo, w_hi = _x_pair(nw_ptr, ww, rows, p, K, EVEN_K, X_PAIRS, PER // 2)
                x_lo *= w_lo
                x_hi *= w_hi
            xs += x_lo + x_hi
            for i in tl.static_range(2):
                j = 2 * jj + i
                scale = tl.full((), (127 + X_EXP - j * BITS) << 23, tl.int32).to(tl.float32, bitcast=True)
                x = (x_lo if i == 0 else x_hi) * scale  # 2**(X_EXP - j*BITS): exact
                # value j masked in place is a subnormal float: q * 2**(j*BITS - 149), exactly
                f = (words & (MASK << (j * BITS))).to(tl.float32, bitcast=True)  # [BKW, BN]
                t += x[:, None] * f  # x * q * 2**(X_EXP - 149): an exact product
    return t, xs, sq


@triton.jit
def _load_weights(qw_ptr, qz_ptr, s_ptr, g_ptr, k0, k_end, offs_n, mask_n, N, ZW, BITS: tl.constexpr,
                  PER: tl.constexpr, BKW: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_TILES: tl.constexpr,
                  EVEN_N: tl.constexpr):
    """Tile k0's weights: words [BKW, BN], scales [BN] fp32, zeros [BN] and g_idx [BK]. Past k_end (the prefetch
    after a program's last tile) nothing is read."""
    offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
    rows = k0 // PER + tl.arange(0, BKW)  # [BKW]
    row_ok = rows < k_end // PER  # [BKW] (k_end is a multiple of PER: a whole number of words)
    g = 0 if GROUP_TILES == 0 else k0 // BLOCK_K // GROUP_TILES  # the tile's group
    live = (offs_n * 0 + k0) < k_end  # [BN] this tile exists (a vector: the interpreter masks only with tensors)
    if EVEN_N:
        col_ok = live
    else:
        col_ok = live & mask_n
    gk = tl.load(g_ptr + offs_k, mask=offs_k < k_end, other=0)  # [BK]
    words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0)  # [BKW, BN]
    s = tl.load(s_ptr + g * N + offs_n, mask=col_ok, other=0.0).to(tl.float32)  # [BN]
    z = _word_bits(qz_ptr + g * ZW, offs_n * BITS, col_ok, BITS)  # [BN]
    return words, s, z, gk


@triton.jit
def _load_x(x_ptr, nw_ptr, dummy, k0, k_end, PER: tl.constexpr, BKW: tl.constexpr, X_PAIRS: tl.constexpr,
            NORM: tl.constexpr):
    """Tile k0's x pairs [BKW, PER // 2] (X_PAIRS; else ``dummy``) and norm-weight pairs (X_PAIRS and NORM; else
    ``dummy``)."""
    if X_PAIRS:
        rows = k0 // PER + tl.arange(0, BKW)  # [BKW]
        row_ok = rows < k_end // PER  # [BKW]
        pair = tl.arange(0, PER // 2)  # [PER/2]
        xw = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (PER // 2) + pair[None, :],
                     mask=row_ok[:, None], other=0)  # [BKW, PER/2]: 2 x values per int32
        if NORM:
            ww = tl.load(nw_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (PER // 2) + pair[None, :],
                         mask=row_ok[:, None], other=0)  # [BKW, PER/2]: 2 norm weights per int32
        else:
            ww = xw
    else:
        xw = dummy
        ww = dummy
    return xw, ww


@triton.jit
def _load_tile(x_ptr, nw_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, k0, k_end, offs_n, mask_n, N, ZW, BITS: tl.constexpr,
               PER: tl.constexpr, BKW: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_TILES: tl.constexpr,
               EVEN_N: tl.constexpr, X_PAIRS: tl.constexpr, NORM: tl.constexpr):
    """Everything tile k0 needs from memory: ``_load_weights`` and ``_load_x`` (with g_idx as the dummy)."""
    words, s, z, gk = _load_weights(qw_ptr, qz_ptr, s_ptr, g_ptr, k0, k_end, offs_n, mask_n, N, ZW, BITS, PER, BKW,
                                    BLOCK_K, GROUP_TILES, EVEN_N)
    xw, ww = _load_x(x_ptr, nw_ptr, gk, k0, k_end, PER, BKW, X_PAIRS, NORM)
    return words, s, z, gk, xw, ww


@triton.jit
def _any_group_loop(x_ptr, nw_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, mask_n, N, K, ZW, k_start, k_end,
                    BITS: tl.constexpr, NORM: tl.constexpr):
    """The slow path, correct for any g_idx (unsorted act-order called directly): one input channel at a time, each
    with its own group's scale and zero. [BN] fp32, and the sum of x**2 over the rows (NORM; x is then x * w). Only
    [BN] vectors, so the registers it needs do not crowd the main loop's (ptxas allocates one register budget for
    the whole kernel)."""
    PER: tl.constexpr = 32 // BITS
    acc = tl.zeros(offs_n.shape, dtype=tl.float32)
    ss = tl.sum(acc, axis=0)  # 0.0 as an fp32 scalar
    for k in range(k_start, k_end):
        word = tl.load(qw_ptr + (k // PER) * N + offs_n, mask=mask_n, other=0)  # [BN]
        g = tl.load(g_ptr + k)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = _word_bits(qz_ptr + g * ZW, offs_n * BITS, mask_n, BITS)
        q = (word >> ((k % PER) * BITS)) & ((1 << BITS) - 1)
        xk = tl.load(x_ptr + k).to(tl.float32)
        if NORM:
            ss += xk * xk
            xk *= tl.load(nw_ptr + k).to(tl.float32)
        acc += xk * ((q - z).to(tl.float32) * s)
    return acc, ss


@triton.jit
def gptq_gemv_kernel(
    x_ptr,  # [K] one activation row
    qw_ptr,  # int32 [K*BITS/32, N]
    qz_ptr,  # int32 [G, ZW]
    s_ptr,  # [G, N]
    g_ptr,  # int32 [K]
    b_ptr,  # [N] (unused without HAS_BIAS)
    nw_ptr,  # [K] RMSNorm weight, x's dtype (NORM only)
    res_ptr,  # [N] residual, x's dtype (RESIDUAL only)
    y_ptr,  # [N], x's dtype
    part_ptr,  # fp32 [num K splits, N] partial sums (SPLIT only)
    ss_ptr,  # fp32 [num K splits, column tiles] partial sums of x**2 (SPLIT and NORM only)
    lock_ptr,  # int32 [>= cdiv(N, BLOCK_N)], all zero between launches (SPLIT only)
    N, K, ZW,
    k_per_split,  # K rows per program along grid axis 1, a multiple of BLOCK_K
    half_shift,  # 16 (a run-time value: see the module docstring)
    eps,  # RMSNorm epsilon (NORM only)
    BITS: tl.constexpr,  # 2, 4 or 8 (whole values per word)
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,  # x is RMSNorm(x) * w: scale by w per row, 1/rms per output (see the module docstring)
    RESIDUAL: tl.constexpr,  # y += residual
    SILU_MUL: tl.constexpr,  # y [N/2] = silu(gate) * up of the [gate | up] columns (needs SPLIT; see above)
    SPLIT: tl.constexpr,  # partial sums per program along K, the last program of a tile (or tile pair) reduces
    FAST_OK: tl.constexpr,  # BLOCK_K divides group_size (or one group): a tile is one group if g_idx is plain
    GROUP_TILES: tl.constexpr,  # group_size // BLOCK_K, 0 for one group (a constant: no integer division per tile)
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no column masks
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: x loads without masks
    X_PAIRS: tl.constexpr,  # x is 16-bit and EVEN_K: x rows of int32 pairs, prefetched with the weights
    ACC_ROWS: tl.constexpr,  # per-row sums until after the K loop (pays only where warps split the rows)
    BLOCK_N: tl.constexpr,  # a multiple of 128 * num_warps (see the module docstring)
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,  # software-pipelining depth of the K loop (1: the register prefetch alone)
    PDL: tl.constexpr,  # CUDA sm90+ launched with launch_pdl: programmatic dependent launch (module docstring)
    REDUCE_ROWS: tl.constexpr = 16,  # split-K: partial-sum rows the last program loads at once (a loop of one
    # row per load waited one L2 round trip per split: ~10 us of a 14 us 4096x4096 call on the H100)
):
    PER: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PER  # packed word rows per tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    if PDL:  # let the next kernel's programs start (they wait for this one before reading what it writes)
        tl.extra.cuda.gdc_launch_dependents()
        if not FAST_OK:
            tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_rows = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)  # ACC_ROWS only
    sq_rows = tl.zeros((BKW,), dtype=tl.float32)  # NORM only: per-row sums of x**2
    bad = tl.zeros((BLOCK_K,), dtype=tl.int32)  # per tile row: how often its g_idx was not k // group_size
    if not FAST_OK:
        bad += 1
    if FAST_OK:  # assume g_idx is k // group_size (sorted act-order weights are, too); the loop checks it
        # register prefetch: tile i+1's loads are issued before tile i's arithmetic (see the module docstring)
        # the first tile's weights depend on no earlier kernel: with PDL they load while that kernel finishes
        words, s, z, gk = _load_weights(qw_ptr, qz_ptr, s_ptr, g_ptr, k_start, k_end, offs_n, mask_n, N, ZW, BITS,
                                        PER, BKW, BLOCK_K, GROUP_TILES, EVEN_N)
        if PDL:
            tl.extra.cuda.gdc_wait()  # the earlier kernel is done: x, the buffers and the counters are ours now
        xw, ww = _load_x(x_ptr, nw_ptr, gk, k_start, k_end, PER, BKW, X_PAIRS, NORM)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            words_n, s_n, z_n, gk_n, xw_n, ww_n = _load_tile(x_ptr, nw_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr,
                                                             k0 + BLOCK_K, k_end, offs_n, mask_n, N, ZW, BITS, PER,
                                                             BKW, BLOCK_K, GROUP_TILES, EVEN_N, X_PAIRS, NORM)
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            rows = k0 // PER + tl.arange(0, BKW)  # [BKW]
            g = 0 if GROUP_TILES == 0 else k0 // BLOCK_K // GROUP_TILES  # the tile's group
            bad += ((gk != g) & (offs_k < K)).to(tl.int32)
            t, xs, sq = _tile(words, xw, ww, x_ptr, nw_ptr, rows, K, half_shift, EVEN_K, X_PAIRS, NORM, BITS,
                              PER)  # [BKW, BN], [BKW], [BKW]
            if NORM:
                sq_rows += sq
            zf = z.to(tl.float32)
            if ACC_ROWS:  # keep per-row sums, reduced (across warps, if they split the rows) after the loop
                acc_rows += t * (s * UNSCALE)[None, :]  # two FFMAs per element: the row's share of
                acc_rows -= xs[:, None] * (zf * s)[None, :]  # sum x*q*s and of z*s*sum x
            else:  # every row in-thread: reduce now (fewer registers than a second [BKW, BN] accumulator)
                acc += (tl.sum(t, axis=0) * UNSCALE - zf * tl.sum(xs, axis=0)) * s
            words, s, z, gk, xw, ww = words_n, s_n, z_n, gk_n, xw_n, ww_n
        if ACC_ROWS:
            acc = tl.sum(acc_rows, axis=0)
    ss = tl.sum(sq_rows, axis=0)  # this program's sum of x**2 (NORM)
    if tl.sum(bad, axis=0) != 0:  # g_idx is not k // group_size here: per-row groups
        acc, ss = _any_group_loop(x_ptr, nw_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, mask_n, N, K, ZW, k_start,
                                  k_end, BITS, NORM)

    tl.static_assert(SPLIT or not SILU_MUL, "SILU_MUL reduces the gate and up tiles through the split-K path")
    if SPLIT:
        tl.store(part_ptr + pid_k * N + offs_n, acc, mask=mask_n)
        if NORM:
            tl.store(ss_ptr + pid_k * tl.num_programs(0) + pid_n, ss)
        tl.debug_barrier()  # every thread's partial sums are stored before the release below
        splits = tl.num_programs(1)
        if SILU_MUL:  # gate tile t and up tile t + pairs share counter t
            pairs = tl.num_programs(0) // 2
            tile = pid_n % pairs
            arrivals = 2 * splits
        else:
            tile = pid_n
            arrivals = splits
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == arrivals - 1:  # the last split of this column tile (pair): reduce, in split order
            if NORM:  # the whole row's sum of x**2: every split's share, for column tile ``tile``
                one = tl.full((1,), 0, tl.int32)
                ss = tl.sum(_sum_splits(ss_ptr + tile, tl.num_programs(0), one, one == 0, splits, REDUCE_ROWS, 1),
                            axis=0)
            if SILU_MUL:
                offs_g = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] gate columns; up: + N // 2
                mask_g = offs_g < N // 2
                g = _scaled(_sum_splits(part_ptr, N, offs_g, mask_g, splits, REDUCE_ROWS, BLOCK_N), ss, eps, K,
                            b_ptr, offs_g, mask_g, HAS_BIAS, NORM)
                u = _scaled(_sum_splits(part_ptr, N, N // 2 + offs_g, mask_g, splits, REDUCE_ROWS, BLOCK_N), ss,
                            eps, K, b_ptr, N // 2 + offs_g, mask_g, HAS_BIAS, NORM)
                tl.store(y_ptr + offs_g, _silu_mul(g, u, y_ptr.dtype.element_ty), mask=mask_g)
            else:
                acc = _sum_splits(part_ptr, N, offs_n, mask_n, splits, REDUCE_ROWS, BLOCK_N)
                _epilogue(acc, ss, eps, K, b_ptr, res_ptr, y_ptr, offs_n, mask_n, HAS_BIAS, NORM, RESIDUAL)
            tl.atomic_xchg(lock_ptr + tile, 0)  # zero again for the next launch
    else:
        _epilogue(acc, ss, eps, K, b_ptr, res_ptr, y_ptr, offs_n, mask_n, HAS_BIAS, NORM, RESIDUAL)


@triton.jit
def _sum_splits(ptr, row_stride, offs, mask, splits, REDUCE_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """sum over i < splits of ptr[i * row_stride + offs] (fp32 [BLOCK], masked), in split order, REDUCE_ROWS rows
    per load: one L2 round trip each (a loop of one row per load waited one per split)."""
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, splits, REDUCE_ROWS):
        i = i0 + tl.arange(0, REDUCE_ROWS)  # [R]
        part = tl.load(ptr + i[:, None] * row_stride + offs[None, :], mask=(i < splits)[:, None] & mask[None, :],
                       other=0.0, cache_modifier=".cg")  # [R, BLOCK]; .cg: from L2, never a stale L1 line
        total += tl.sum(part, axis=0)
    return total


@triton.jit
def _scaled(acc, ss, eps, K, b_ptr, offs_n, mask_n, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    """acc / rms (NORM) + bias, fp32. acc [BN] over all of K, ss the row's sum of x**2 (NORM)."""
    if NORM:
        acc *= tl.rsqrt(ss / K + tl.cast(eps, tl.float32))  # eps: an fp64 scalar from Inductor's launcher
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _silu_mul(g, u, DT: tl.constexpr):
    """HF's act_fn(gate) * up on fp32 sums: gate and up rounded to DT (the projections' outputs), silu(gate) in fp32
    rounded to DT, the product rounded to DT."""
    g = g.to(DT).to(tl.float32)
    u = u.to(DT).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
    return (act * u).to(DT)


@triton.jit
def _epilogue(acc, ss, eps, K, b_ptr, res_ptr, y_ptr, offs_n, mask_n, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
              RESIDUAL: tl.constexpr):
    """y = acc / rms (NORM) + bias + residual, stored in y's dtype. acc [BN] fp32 over all of K, ss the row's sum of
    x**2 (NORM)."""
    acc = _scaled(acc, ss, eps, K, b_ptr, offs_n, mask_n, HAS_BIAS, NORM)
    if RESIDUAL:
        acc += tl.load(res_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
