"""Triton GPTQ matmul for ``optgptq::gptq_linear``: ``optgptq::gptq_linear_triton`` (same schema), CUDA and ROCm.

Three paths, chosen by M in ``pick_config`` (tuned on the H100; numbers in benchmarks/RESULTS.md):
  * gemv (M == 1, 2/4/8 bits; ``triton_gptq_gemv_kernel.py``): split-K over enough programs to keep HBM busy, the
    last program of each column tile adds the splits' fp32 partial sums (no zero fill, no cast kernel); each value
    dequantized as a subnormal float (one LOP3 + one FFMA per weight, the zero point once per tile).
  * wdot (M = 2..64, 2/4/8 bits; ``gptq_dot_kernel``): the weight tile is the dot's 64-row side, dequantized in the
    K loop as pairs of 16-bit half-words (one shift and one and-or per word) straight into the tensor-core operand
    registers (bf16 2/4 bits, fp16 2/4/8 bits; ``half_word_magic``) or else as words through shared memory, split-K
    reduced by the last program; 3 bits use
    ``gptq_matmul_kernel`` (16-row dots).
  * dequant (M >= DEQUANT_MIN_M, prefill): a Triton pass writes the dense weight, then ``torch.mm`` (cuBLAS /
    hipBLASLt); faster here than the fused dot kernels at these sizes. For long prompts (M >= CHUNK_MIN_M) in
    chunks of columns through one buffer small enough to stay in the L2.
``optgptq::gptq_linear_fused_triton`` (an RMSNorm before, a residual or silu(gate) * up after:
passes/fuse_norm_residual.py, fuse_silu_mul.py) runs the same launcher: the gemv folds all three in, the wdot kernel
the residual and silu * mul after ``rms_norm_kernel``; elsewhere they are torch ops around the matmul.
The kernels assume ``g_idx`` is plain ``k // group_size``, so each BLOCK_K tile is one group (one row of
scales/zeros), and check it while they stream the weights; a program where it is not redoes its rows with a loop
where every row gathers its own group (correct for any ``g_idx``, slower). Act-order weights are sorted once, at
compile time, by ``prepare_node`` (rows of ``qweight`` permuted, ``x[..., perm]`` in the graph), so the hot loop of
a compiled model never gathers.
Portability: no inline asm, dot tiles >= 16, no assumption on lanes per warp; ``tl.extra.cuda`` only for
programmatic dependent launch behind the PDL constexpr, which only CUDA sm90+ launches set (``triton_utils.pdl``).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import triton  # lowering/__init__ registers this module only where triton imports
from torch.library import triton_op, wrap_triton
from torch.utils.weak import WeakIdKeyDictionary

from ..quant.packing import pack_rows, unpack_rows
from .gptq_linear import check_fused_extras, check_gptq_shapes, torch_gptq_linear  # noqa: F401  (the reference)
from .gptq_linear import torch_silu_mul
from .triton_utils import (check_device, device_index, kernels, launch_options, num_sms, pdl, per_backend,
                           tracing_interpreted)

# ----------------------------------------------------------------------------------------------------------------
# launcher


DEQUANT_MIN_M = 65  # from here on: dequantize once + cuBLAS (prefill); below, the fused wdot kernel
# From here on the dequantized weight goes through cuBLAS in chunks of CHUNK_N columns: each chunk's GEMM still fills
# the GPU (2048 x 2048 outputs: 128 tiles of 128 x 256), and a chunk (16 MB at K = 4096) is written and read back in
# the L2 instead of HBM. H100, session 13 (RESULTS.md): M=2048, 11008x4096 326.3 -> 305.7 us, 4096x11008 303.7 ->
# 291.5, 4096x4096 a tie (111.3 / 111.5); M=1024 a tie; M=256 chunks lost (88.0 -> 113.7 us at 11008x4096: 16
# output tiles a GEMM).
CHUNK_MIN_M, CHUNK_N = 2048, 2048


# One-warp M=1 GEMV programs an H100 SM holds at once (65536 registers / (32 x registers a thread)), by whether the
# RMSNorm is folded in (NORM). sm90 ptxas, session 16: 243 registers with it (the norm weights ride with x, a tile
# ahead), 168 without; benchmarks/sass_loop.py ``registers`` shows them. The launcher splits K into as many programs
# as fit at once (``_split_k``'s ``one_wave``). Measured on the H100 only: ROCm builds take the same counts per CU.
GEMV_RESIDENT = {True: 8, False: 12}


def pick_config(m: int, n: int, k: int, bits: int, group_size: int, num_sms: int = 132, norm: bool = False) -> dict:
    """Kernel, block sizes, warps, stages and split-K for one GEMM shape, set from the H100 sweep
    (benchmarks/bench_gptq_matmul.py --sweep, 7B MLP shapes); tiles >= 16 for every dot and warp counts that fit
    64-lane AMD waves. ``norm``: the RMSNorm is folded into the M=1 GEMV (a bigger build: fewer programs fit)."""
    gs = k if group_size == -1 else group_size
    if m >= DEQUANT_MIN_M:
        return dict(KERNEL="dequant", BLOCK_K=32 if bits == 3 else 128, BLOCK_N=64, num_warps=4, num_stages=1,
                    CHUNK_N=CHUNK_N if m >= CHUNK_MIN_M and n > CHUNK_N else 0)
    if m == 1 and bits != 3:  # lanes spread over columns only, every row of a tile in-thread
        # H100, session 7 (RESULTS.md, 7B shapes): the register-prefetch loop without cp.async (num_stages=1), 1-warp
        # programs of 128 columns: a 7B layer's four GEMVs 59.4 us, against 64.1 for session 5's pipelined 2-warp
        # config and 60.4 for the best 2-warp one. Session 16: as many programs as the SMs hold at once (PER_SM)
        cfg = dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=128, BLOCK_K=64, num_warps=1, num_stages=1, ACC_ROWS=False,
                   PER_SM=GEMV_RESIDENT[norm])
    elif bits != 3:  # 2..64 rows: gptq_dot_kernel (weights as the dot's 64-row side), split-K for parallelism
        # H100 sweeps, 11008x4096 (RESULTS.md): M=16 with words 40.3 us with 16x256x64 tiles (49.6 with
        # 16x128x128); M=2..16 with half-words ~28 us with 16x128x64, 3 stages (31 with 16x128x128; session 6);
        # M=64 44.9 us with 64x64x128 (53.8 with 64x128x128; dequant + cuBLAS 87 us; half-words 65 us)
        if m <= 16 and bits in (2, 4):  # half-word dequant (MAGIC16). Session 18 (H100, 7B shapes, RESULTS.md):
            # 128 x 128 tiles, 3 stages (64-deep tiles +1-3 us, 256 columns +4-10, 4 stages +1-2, 8 warps 2.4-4x
            # slower); the build holds 3 programs an SM (154 registers) and runs best with one wave of them (~4 an
            # SM, 1.3-1.5 waves: M=16 up 21.3 -> 25.7 us, gate/up 37.1 -> 47.6)
            cfg = dict(KERNEL="wdot", BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, PER_SM=3,
                       ONE_WAVE=True)
        elif m <= 16:
            cfg = dict(KERNEL="wdot", BLOCK_M=16, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=4)
        else:
            cfg = dict(KERNEL="wdot", BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    else:  # 3 bits: gptq_matmul_kernel, one 16-row tensor-core tile per program
        cfg = dict(KERNEL="dot", BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    if bits == 3:  # two gathered word tiles per weight tile: keep them small enough to pipeline in shared memory
        cfg.update(BLOCK_N=128, BLOCK_K=min(cfg["BLOCK_K"], 64), num_stages=2)
    while cfg["BLOCK_K"] > 16 and gs % cfg["BLOCK_K"] and gs < k:  # a tile must not straddle two groups
        cfg["BLOCK_K"] //= 2
    cfg["SPLIT_K"] = _split_k(m, n, k, cfg, num_sms, per_sm=cfg.get("PER_SM", 4),
                              one_wave=cfg["KERNEL"] == "gemv" or cfg.get("ONE_WAVE", False))
    return cfg


def _split_k(m: int, n: int, k: int, cfg: dict, num_sms: int, per_sm: int = 4, one_wave: bool = False) -> int:
    """Enough programs for ~``per_sm`` per SM when the output tiles alone are too few (decode); with ``one_wave``
    (the M=1 GEMV, ``per_sm`` = the programs an SM holds at once) the most that fit at once, never one more. H100
    session 16 (RESULTS.md): the fused gate/up GEMV of a 7B layer (172 column tiles, 243 registers: 8 programs an
    SM) took 7 splits = 1204 programs for 1056 places, 148 of them a second wave; 6 splits (1032) took the layer's
    GEMV chain 59.0 -> 56.3 us. The 168-register builds (12 an SM) had been held to ~8 an SM: filling their 12 took
    the chain to 53.7 us (down 4096x11008 alone 14.0 -> 12.6 us, up 11008x4096 12.7 -> 11.8), e2e batch 1 443.9 ->
    476.0 tok/s. Rounding the splits to whole tiles can only lower their count, so the launch stays within the wave.
    Capping the norm builds' registers to fit more programs lost (spills, or 10 an SM: chain 60.5-61.9 us)."""
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    k_iters = -(-k // cfg["BLOCK_K"])
    if m > 64 or tiles >= 2 * num_sms:
        return 1
    slots = per_sm * num_sms
    return max(1, min(k_iters // 2, slots // tiles if one_wave else -(-slots // tiles)))


@triton_op("optgptq::gptq_linear_triton", mutates_args=())
def gptq_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
) -> torch.Tensor:
    check_gptq_shapes(x, qweight, qzeros, scales, g_idx, bias, bits)
    check_device(x, "gptq_linear_triton")
    return gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, bits, group_size)


@triton_op("optgptq::gptq_linear_fused_triton", mutates_args=())
def gptq_linear_fused_triton(
    x: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    eps: float,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    act: str = "none",
) -> torch.Tensor:
    check_gptq_shapes(x, qweight, qzeros, scales, g_idx, bias, bits)
    check_fused_extras(x, norm_weight, residual, scales.shape[-1], act)
    check_device(x, "gptq_linear_fused_triton")
    return gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, norm_weight=norm_weight, eps=eps,
                       residual=residual, act=act)


def gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, config: Optional[dict] = None,
                norm_weight=None, eps: float = 0.0, residual=None, act: str = "none"):
    """Launcher: y[..., N] = x[..., K] @ dequant(W) (+ bias), or with ``norm_weight`` / ``residual`` / ``act``
    (``optgptq::gptq_linear_fused``) rms_norm(x) first and + residual or silu(gate) * up last. ``config`` overrides
    ``pick_config`` (benchmarks). The gemv fuses the norm, the residual and silu * mul, the decode-batch dot kernel
    the residual and silu * mul (where N / 2 is a multiple of its column tile); otherwise the norm is
    ``rms_norm_kernel`` before the matmul and the rest torch ops after it."""
    k, n = x.shape[-1], scales.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = dict(config) if config is not None else pick_config(m, n, k, bits, group_size, num_sms(device_index(x)),
                                                              norm=norm_weight is not None)
    kind = cfg.pop("KERNEL")
    if norm_weight is not None and kind != "gemv":  # only the gemv folds the norm in
        x2 = rms_norm(x2, norm_weight, eps)
        norm_weight = None
    mod = kernels("triton_gptq_linear_kernel")
    launch = not tracing_interpreted(x)
    gs = k if group_size == -1 else group_size
    silu = act == "silu_mul"
    if kind == "gemv":
        if residual is not None:
            residual = residual.reshape(n).contiguous()
        in_kernel = silu and (n // 2) % cfg["BLOCK_N"] == 0  # whole column tiles per half: tiles pair up
        y = _gemv(x2, qweight, qzeros, scales, g_idx, bias, bits, gs, cfg, launch, norm_weight, eps, residual,
                  silu_mul=in_kernel)
        return _silu_mul_after(y, silu and not in_kernel).reshape(*x.shape[:-1], -1)
    if kind == "dequant":  # prefill: dequantize to a dense weight, then cuBLAS/hipBLASLt
        y = _dequant_mm(x2, qweight, qzeros, scales, g_idx, bits, gs, cfg, launch)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return _add_residual(_silu_mul_after(y, silu).reshape(*x.shape[:-1], -1), residual)
    if kind == "wdot":
        if _wdot_ok(x, bits, gs, k, cfg["BLOCK_K"]):
            if residual is not None:
                residual = residual.reshape(m, n).contiguous()  # y's strides
            in_kernel = silu and (n // 2) % cfg["BLOCK_N"] == 0
            y = _wdot(x2, qweight, qzeros, scales, g_idx, bias, bits, gs, cfg, launch, residual, silu_mul=in_kernel)
            return _silu_mul_after(y, silu and not in_kernel).reshape(*x.shape[:-1], -1)
        # fp32 activations (exact IEEE dot), or a group size no tile divides: gptq_matmul_kernel
        cfg = dict(BLOCK_M=16, BLOCK_N=min(cfg["BLOCK_N"], 256), BLOCK_K=cfg["BLOCK_K"], GROUP_M=1,
                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], SPLIT_K=cfg["SPLIT_K"])
        kind = "dot"
    cfg.setdefault("UNPACK_RESHAPE", bits != 3)
    split = cfg.pop("SPLIT_K")
    bk = cfg["BLOCK_K"]
    k_per_split = -(-k // (split * bk)) * bk  # whole tiles per split
    split = -(-k // k_per_split)
    atomic = split > 1
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if atomic else x.new_empty(m, n)  # [M, N]
    fast_ok = gs > 0 and (gs % bk == 0 or gs >= k)
    cfg.setdefault("INTERLEAVE", kind == "dot" and bits != 3 and bk * bits // 32 >= 16)
    args = (x2, qweight, qzeros, scales, g_idx, bias if bias is not None else scales, y,
            m, n, k, qzeros.shape[1], x2.stride(0), y.stride(0), k_per_split, max(gs, 1))
    if launch:
        grid = (-(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"]), split)
        wrap_triton(mod.gptq_matmul_kernel)[grid](*args, BITS=bits, HAS_BIAS=bias is not None, ATOMIC=atomic,
                                                  FAST_OK=fast_ok, USE_DOT=cfg["BLOCK_M"] >= 16,
                                                  IEEE=x.dtype == torch.float32, NUM_STAGES=cfg["num_stages"],
                                                  **cfg)
    if atomic:
        y = y.to(x.dtype)
    return _add_residual(_silu_mul_after(y, silu).reshape(*x.shape[:-1], -1), residual)


def _dequant_mm(x2, qweight, qzeros, scales, g_idx, bits, gs, cfg, launch):
    """x2 [M, K] @ dequant(W) [K, N] -> [M, N]: ``gptq_dequant_kernel`` writes the dense weight, ``torch.mm`` reads
    it. With ``CHUNK_N`` in cfg, CHUNK_N columns at a time through one reused buffer, each chunk's GEMM writing its
    columns of y in place (cuBLAS takes the row stride): a chunk small enough to stay in the L2 is written and read
    there instead of through HBM."""
    m, k = x2.shape
    n = scales.shape[-1]
    chunk = min(-(-(cfg.get("CHUNK_N") or n) // cfg["BLOCK_N"]) * cfg["BLOCK_N"], n)  # whole column tiles
    w = x2.new_empty(k, chunk)  # [K, CHUNK_N]
    if chunk == n:
        if launch:
            dequant_columns(w, qweight, qzeros, scales, g_idx, bits, gs, 0, cfg)
        return torch.mm(x2, w)
    y = x2.new_empty(m, n)  # [M, N]
    for n0 in range(0, n, chunk):
        wc = w[:, :min(chunk, n - n0)]  # [K, nc], row stride CHUNK_N
        if launch:
            dequant_columns(wc, qweight, qzeros, scales, g_idx, bits, gs, n0, cfg)
        torch.mm(x2, wc, out=y[:, n0:n0 + wc.shape[1]])
    return y


def dequant_columns(w, qweight, qzeros, scales, g_idx, bits, gs, n0, cfg):
    """Launch ``gptq_dequant_kernel``: columns n0 .. n0 + w.shape[1] of the weight into w [K, nc] (last dimension
    contiguous, any row stride), with cfg's BLOCK_K, BLOCK_N and num_warps."""
    k, nc = w.shape
    bk, bn = cfg["BLOCK_K"], cfg["BLOCK_N"]
    wrap_triton(kernels("triton_gptq_linear_kernel").gptq_dequant_kernel)[(-(-k // bk), -(-nc // bn))](
        qweight, qzeros, scales, g_idx, w, scales.shape[-1], k, qzeros.shape[1], n0, nc, w.stride(0), BITS=bits,
        BLOCK_K=bk, BLOCK_N=bn, GROUP_TILES=_group_tiles(gs, k, bk), num_warps=cfg["num_warps"], num_stages=1)


def _group_tiles(gs: int, k: int, bk: int) -> int:
    """gptq_dequant_kernel's GROUP_TILES: tiles per group where every BLOCK_K tile lies in one group (0: one group
    for all of K), -1 where tiles may straddle groups."""
    if gs >= k:
        return 0
    return gs // bk if gs > 0 and gs % bk == 0 else -1


def _silu_mul_after(y: torch.Tensor, apply: bool) -> torch.Tensor:
    """silu(gate) * up as torch ops, for the kernels without it in their epilogue (or a tile that splits a half)."""
    return torch_silu_mul(y) if apply else y


RMS_NORM_BLOCK = 4096  # one chunk per pass at a 7B hidden size; 4 warps hold 32 values a thread


def rms_norm(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Launcher: HF RMSNorm of each row of x2 [M, K] (last dim contiguous) -> new [M, K], one program a row."""
    m, k = x2.shape
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    if m and not tracing_interpreted(x2):
        block = min(RMS_NORM_BLOCK, triton.next_power_of_2(k))
        use_pdl = pdl(x2)
        wrap_triton(kernels("triton_rms_norm_kernel").rms_norm_kernel)[(m,)](
            x2, weight, out, k, x2.stride(0), float(eps), BLOCK=block, PDL=use_pdl,
            num_warps=4 if block >= 1024 else 1, **launch_options(use_pdl))
    return out


def _add_residual(y: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """y + residual for the kernels without a residual epilogue (prefill's dequant + matmul, the 3-bit dot)."""
    return y if residual is None else y.add_(residual)


def half_word_magic(dtype: torch.dtype, bits: int, bk: int) -> int:
    """gptq_dot_kernel's MAGIC16: the 16-bit pattern whose value has a unit last mantissa bit (bf16 128.0, fp16
    1024.0), so or-ing a value q into its low bits gives magic + q exactly; 0 where the tile cannot be dequantized by
    half-words (q wider than the mantissa, or fewer than 16 half-words per column, the smallest dot). The launcher
    uses it for 16-row blocks only: with 64-row blocks (M = 17..64) half-words ran 1.4x slower than words on the
    H100 (65 vs 45 us at 11008x4096, session 6)."""
    if 2 * (bk * bits // 32) < 16:
        return 0
    if dtype == torch.bfloat16 and bits in (2, 4):  # 7 mantissa bits
        return 0x4300
    if dtype == torch.float16 and bits in (2, 4, 8):  # 10 mantissa bits
        return 0x6400
    return 0


def _wdot_ok(x, bits, gs, k, bk) -> bool:
    """gptq_dot_kernel's domain: whole values per word, fp16/bf16 activations, every tile within one group."""
    return bits in (2, 4, 8) and x.dtype in (torch.float16, torch.bfloat16) and gs > 0 and (gs % bk == 0 or gs >= k)


def _wdot(x2, qweight, qzeros, scales, g_idx, bias, bits, gs, cfg, launch, residual=None, silu_mul=False):
    """M = 2..64: ``gptq_dot_kernel`` over (row blocks, column tiles, K splits) programs. y [M, N] in x's dtype
    (+ ``residual`` [M, N], contiguous), or with ``silu_mul`` y [M, N / 2] = silu(gate) * up (N / 2 a multiple of
    BLOCK_N; the split-K path even for one split: the gate and up tiles meet there)."""
    m, k = x2.shape
    n = scales.shape[-1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    split = cfg["SPLIT_K"] or _split_k(m, n, k, cfg, num_sms(device_index(x2)), per_sm=cfg.get("PER_SM", 4),
                                       one_wave=cfg.get("ONE_WAVE", False))
    k_per_split = -(-k // (split * bk)) * bk  # whole tiles per split
    split = -(-k // k_per_split)
    grid = (-(-m // bm), -(-n // bn), split)
    y = x2.new_empty(m, n // 2 if silu_mul else n)  # [M, N] (N / 2 with silu_mul)
    reduce = split > 1 or silu_mul
    part = x2.new_empty(split, m, n, dtype=torch.float32) if reduce else y  # [splits, M, N] partial sums
    locks = _split_locks(x2, grid[0] * grid[1]) if reduce else g_idx
    if launch:
        use_pdl = pdl(x2) and cfg.get("PDL", True)  # programmatic dependent launch (triton_utils.pdl)
        # every constexpr passed explicitly: Inductor's launcher for wrap_triton kernels ignores Python defaults
        wrap_triton(kernels("triton_gptq_linear_kernel").gptq_dot_kernel)[grid](
            x2, qweight, qzeros, scales, g_idx, bias if bias is not None else scales,
            residual if residual is not None else scales, y, part, locks,
            m, n, k, qzeros.shape[1], x2.stride(0), y.stride(0), k_per_split, 0x4B000000, 16,
            BITS=bits, HAS_BIAS=bias is not None, RESIDUAL=residual is not None, SILU_MUL=silu_mul, SPLIT=reduce,
            GROUP_TILES=0 if gs >= k else gs // bk,
            EVEN_N=n % bn == 0, EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["num_stages"],
            MAGIC16=cfg.get("MAGIC16", half_word_magic(x2.dtype, bits, bk) if bm == 16 else 0), PDL=use_pdl,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(use_pdl))
    return y


def _gemv(x2, qweight, qzeros, scales, g_idx, bias, bits, gs, cfg, launch, norm_weight=None, eps=0.0,
          residual=None, silu_mul=False):
    """M == 1: ``gptq_gemv_kernel`` over (column tiles, K splits) programs. y [1, N] in x's dtype; with
    ``norm_weight`` [K] x is RMSNorm-ed first, with ``residual`` [N] it is added last, with ``silu_mul`` y [1, N / 2]
    is silu(gate) * up (N / 2 a multiple of BLOCK_N; the split-K path even for one split)."""
    k, n = x2.shape[1], scales.shape[-1]
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    split = cfg["SPLIT_K"] or _split_k(1, n, k, dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk), num_sms(device_index(x2)),
                                       per_sm=cfg.get("PER_SM", 4), one_wave=True)
    k_per_split = -(-k // (split * bk)) * bk  # whole tiles per split
    split = -(-k // k_per_split)
    tiles = -(-n // bn)
    y = x2.new_empty(1, n // 2 if silu_mul else n)  # [1, N] (N / 2 with silu_mul)
    reduce = split > 1 or silu_mul
    part = x2.new_empty(split, n, dtype=torch.float32) if reduce else y  # [splits, N] partial sums
    norm = norm_weight is not None
    if norm:
        norm_weight = norm_weight.contiguous()  # read as int32 pairs, like x
    ss = x2.new_empty(split, tiles, dtype=torch.float32) if reduce and norm else y  # [splits, tiles] sums of x**2
    locks = _split_locks(x2, tiles) if reduce else g_idx
    fast_ok = gs > 0 and (gs % bk == 0 or gs >= k)
    use_pdl = pdl(x2) and cfg.get("PDL", True)  # programmatic dependent launch (triton_utils.pdl)
    if launch:
        # every constexpr passed explicitly: Inductor's launcher for wrap_triton kernels ignores Python defaults
        wrap_triton(kernels("triton_gptq_gemv_kernel").gptq_gemv_kernel)[(tiles, split)](
            x2, qweight, qzeros, scales, g_idx, bias if bias is not None else scales,
            norm_weight if norm else scales, residual if residual is not None else scales, y, part, ss, locks,
            n, k, qzeros.shape[1], k_per_split, 16, float(eps),
            BITS=bits, HAS_BIAS=bias is not None, NORM=norm, RESIDUAL=residual is not None, SILU_MUL=silu_mul,
            SPLIT=reduce,
            FAST_OK=fast_ok,
            GROUP_TILES=0 if gs >= k else gs // bk, EVEN_N=n % bn == 0, EVEN_K=k % bk == 0, BLOCK_N=bn, BLOCK_K=bk,
            X_PAIRS=k % bk == 0 and x2.element_size() == 2, ACC_ROWS=cfg.get("ACC_ROWS", False),
            STAGES=cfg["num_stages"], REDUCE_ROWS=cfg.get("REDUCE_ROWS", 16), PDL=use_pdl, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **launch_options(use_pdl))
    return y


# device -> int32 counters, zero between launches: the gemv's last-split detection. Every gemv launch on a device
# uses the same counters and leaves them zero, so launches must not run concurrently on two streams of one device
# (the runtime and Inductor issue them on one stream).
_locks: dict = {}


def _split_locks(x: torch.Tensor, tiles: int) -> torch.Tensor:
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(x):  # traced into a graph (Inductor inlining the kernel): a fresh zeroed buffer per call
        return torch.zeros(tiles, device=x.device, dtype=torch.int32)
    locks = _locks.get(x.device)
    if locks is None or locks.numel() < tiles:
        locks = _locks[x.device] = torch.zeros(max(tiles, 4096), device=x.device, dtype=torch.int32)
    return locks


# ----------------------------------------------------------------------------------------------------------------
# compile-time preparation of act-order weights (called by lowering.select_kernels on the real graph)


# qweight tensor -> (g_idx it was sorted with, its sort): the graphs of one model (prefill, decode, ...) share one
# sorted copy instead of one each (weakly keyed: it never keeps a weight alive)
_sorted: WeakIdKeyDictionary = WeakIdKeyDictionary()


def sort_act_order(qweight, qzeros, scales, g_idx, bits):
    """Permute K so that g_idx is non-decreasing: returns (perm int64 [K], qweight', g_idx') with
    ``x[..., perm] @ dequant(qweight', g_idx') == x @ dequant(qweight, g_idx)``; perm None when already sorted.
    Computed once per (qweight, g_idx) pair of tensors."""
    found = _sorted.get(qweight)
    if found is not None and found[0] is g_idx:
        return found[1]
    result = _sort_act_order(qweight, g_idx, bits)
    _sorted[qweight] = (g_idx, result)
    return result


def _sort_act_order(qweight, g_idx, bits):
    k = g_idx.numel()
    if k < 2 or bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None, qweight, g_idx
    perm = torch.argsort(g_idx.long(), stable=True)  # [K]
    q = unpack_rows(qweight, bits)[:k]  # [K, N]
    return perm, pack_rows(q[perm], bits), g_idx[perm].contiguous()


def prepare_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """Rewrite one gptq_linear call whose ``g_idx`` is act-order into sorted weights + ``x.index_select(-1, perm)``."""
    _sort_inputs(gm, node, 0, 1, (), 6)


def prepare_fused_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """``prepare_node`` for gptq_linear_fused: its norm weight is permuted along with x (the sum of x**2 is not)."""
    _sort_inputs(gm, node, 0, 3, (1,), 9)


def _sort_inputs(gm: fx.GraphModule, node: fx.Node, x_pos: int, qw_pos: int, also: tuple, bits_pos: int) -> None:
    """Sort the act-order weights at ``node.args[qw_pos:qw_pos + 4]`` and permute x (and the args at ``also``, the
    same length as x's last dimension) to match. Positional args: the passes build these calls that way."""
    from ..passes.utils import add_constant

    qw, qz, sc, gi = node.args[qw_pos:qw_pos + 4]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (qw, gi)):
        return  # weights are run-time inputs: the kernel's per-row group path stays correct
    bits = node.args[bits_pos] if len(node.args) > bits_pos else node.kwargs["bits"]
    get = operator.attrgetter
    perm, qweight, g_idx = sort_act_order(get(qw.target)(gm), None, None, get(gi.target)(gm), bits)
    if perm is None:
        return
    args = list(node.args)
    with gm.graph.inserting_before(node):
        perm_node = add_constant(gm, f"{qw.target}_perm", perm.to(get(qw.target)(gm).device))
        args[qw_pos] = add_constant(gm, f"{qw.target}_sorted", qweight)
        args[qw_pos + 3] = add_constant(gm, f"{gi.target}_sorted", g_idx)
        for pos in (x_pos, *also):
            if args[pos] is None:
                continue
            permuted = gm.graph.call_function(torch.ops.aten.index_select.default, (args[pos], -1, perm_node))
            if "val" in getattr(args[pos], "meta", {}):
                permuted.meta["val"] = args[pos].meta["val"]
            args[pos] = permuted
    node.args = tuple(args)


VARIANTS = {
    torch.ops.optgptq.gptq_linear.default: {
        "triton": torch.ops.optgptq.gptq_linear_triton.default,
        "prepare": prepare_node,
    },
    torch.ops.optgptq.gptq_linear_fused.default: {
        "triton": torch.ops.optgptq.gptq_linear_fused_triton.default,
        "prepare": prepare_fused_node,
    },
}


def aot_specs(dtype: str = "bf16") -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, options) for ahead-of-time compiles of every kernel variant the launcher
    picks for the Llama-7B up projection (11008x4096): gemv (M=1), the dot kernel's interleaved (4 and 8 bits, g128),
    reshape (g32) and 3-bit paths, the prefill dequant kernel, and the RMSNorm kernel of the fused op at M > 1. Used
    by tests/lowering/test_aot_compile.py."""
    mod = kernels("triton_gptq_linear_kernel")
    specs = []
    n, k = 11008, 4096
    for m, bits, group in ((1, 4, 128), (16, 4, 128), (64, 4, 128), (4, 8, 128), (4, 4, 32), (16, 3, 128),
                           (2048, 4, 128)):
        cfg = pick_config(m, n, k, bits, group)
        kind = cfg.pop("KERNEL")
        label = f"{kind} m{m} {bits}bit g{group}"
        if kind == "wdot":
            specs += per_backend(wdot_aot_spec(m, n, k, bits, group, cfg, dtype))
            if m == 16 and bits == 4:  # the gate/up form of a decode batch
                specs += per_backend(wdot_aot_spec(m, n, k, bits, group, cfg, dtype, silu_mul=True))
            continue
        opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        ptrs = dict(x_ptr=f"*{dtype}", qw_ptr="*i32", qz_ptr="*i32", s_ptr=f"*{dtype}", g_ptr="*i32",
                    b_ptr=f"*{dtype}", y_ptr="*fp32")
        ints = {name: "i32" for name in ("M", "N", "K", "ZW", "stride_xm", "stride_ym", "k_per_split", "group_size")}
        if kind == "dequant":
            fn = mod.gptq_dequant_kernel
            sig = dict(qw_ptr="*i32", qz_ptr="*i32", s_ptr=f"*{dtype}", g_ptr="*i32", w_ptr=f"*{dtype}", N="i32",
                       K="i32", ZW="i32", n0="i32", NC="i32", stride_w="i32")
            const = dict(BITS=bits, BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"],
                         GROUP_TILES=_group_tiles(k if group == -1 else group, k, cfg["BLOCK_K"]))
        elif kind == "gemv":
            specs += per_backend(gemv_aot_spec(n, k, bits, group, {**cfg, **opts}, dtype))
            if bits == 4:  # the decode layer's forms: RMSNorm and residual folded in; RMSNorm and silu * mul
                specs += per_backend(gemv_aot_spec(n, k, bits, group, {**cfg, **opts}, dtype, fused=True))
                specs += per_backend(gemv_aot_spec(n, k, bits, group, {**cfg, **opts}, dtype, silu_mul=True))
            continue
        else:
            fn = mod.gptq_matmul_kernel
            sig = {**ptrs, **ints}
            const = dict(BITS=bits, HAS_BIAS=False, ATOMIC=cfg["SPLIT_K"] > 1, FAST_OK=True, USE_DOT=True,
                         UNPACK_RESHAPE=bits != 3, IEEE=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                         BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                         INTERLEAVE=bits != 3 and cfg["BLOCK_K"] * bits // 32 >= 16, NUM_STAGES=opts["num_stages"])
        sig.update({name: "constexpr" for name in const})
        specs.append((label, fn, sig, const, opts))
    block = min(RMS_NORM_BLOCK, triton.next_power_of_2(k))  # the fused op's norm at M > 1
    specs += per_backend((f"rms_norm k{k}", kernels("triton_rms_norm_kernel").rms_norm_kernel,
                          dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", out_ptr=f"*{dtype}", K="i32", stride_xm="i32",
                               eps="fp32", BLOCK="constexpr"), dict(BLOCK=block), dict(num_warps=4)))
    return specs


def wdot_aot_spec(m: int, n: int, k: int, bits: int, group: int, cfg: dict, dtype: str = "bf16",
                  silu_mul: bool = False):
    """The ahead-of-time compile spec of ``gptq_dot_kernel`` for one shape and config (label "dot ..." so the AOT
    test asserts tensor-core instructions), with the divisibility attributes the JIT infers from 16-byte aligned
    tensors and sizes, so the build is the one the GPU runs (vectorized, pipelined loads). ``silu_mul``: the gate/up
    form (``act="silu_mul"``)."""
    gs = k if group == -1 else group
    split = cfg.get("SPLIT_K") or _split_k(m, n, k, cfg, 132)
    sig = dict(x_ptr=f"*{dtype}", qw_ptr="*i32", qz_ptr="*i32", s_ptr=f"*{dtype}", g_ptr="*i32", b_ptr=f"*{dtype}",
               res_ptr=f"*{dtype}", y_ptr=f"*{dtype}", part_ptr="*fp32", lock_ptr="*i32", M="i32", N="i32", K="i32",
               ZW="i32", stride_xm="i32", stride_ym="i32", k_per_split="i32", magic="i32", half_shift="i32")
    const = dict(BITS=bits, HAS_BIAS=False, RESIDUAL=False, SILU_MUL=silu_mul, SPLIT=split > 1 or silu_mul,
                 GROUP_TILES=0 if gs >= k else gs // cfg["BLOCK_K"],
                 EVEN_N=n % cfg["BLOCK_N"] == 0, EVEN_K=k % cfg["BLOCK_K"] == 0, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], STAGES=cfg["num_stages"],
                 MAGIC16=half_word_magic(dict(bf16=torch.bfloat16, fp16=torch.float16).get(dtype), bits,
                                         cfg["BLOCK_K"]) if cfg["BLOCK_M"] == 16 else 0,
                 PDL=bool(cfg.get("PDL", False)))
    names = list(sig)
    k_per_split = -(-k // (split * cfg["BLOCK_K"])) * cfg["BLOCK_K"]
    aligned = names[:10] + [name for name, v in (("N", n), ("K", k), ("ZW", n * bits // 32), ("stride_xm", k),
                                                ("stride_ym", n), ("k_per_split", k_per_split),
                                                ("magic", 0x4B000000), ("half_shift", 16)) if v % 16 == 0]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    sig.update({name: "constexpr" for name in const})
    label = (f"dot wdot m{m} {bits}bit g{group} bm{cfg['BLOCK_M']} bn{cfg['BLOCK_N']} bk{cfg['BLOCK_K']} "
             f"w{cfg['num_warps']} s{cfg['num_stages']}{' half-words' if const['MAGIC16'] else ''}"
             f"{' silu_mul' if silu_mul else ''}")
    return (label, kernels("triton_gptq_linear_kernel").gptq_dot_kernel, sig, const,
            dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), dict(attrs=attrs))


def gemv_aot_spec(n: int, k: int, bits: int, group: int, cfg: dict, dtype: str = "bf16", fused: bool = False,
                  silu_mul: bool = False):
    """The ahead-of-time compile spec of ``gptq_gemv_kernel`` for one shape and config (also used by
    benchmarks/sass_loop.py), with the divisibility attributes the JIT infers from 16-byte aligned tensors and
    sizes, so the build is the one the GPU runs (vectorized, pipelined loads). ``fused``: with the RMSNorm and the
    residual folded in (``gptq_linear_fused``); ``silu_mul``: the gate/up form, the RMSNorm and silu(gate) * up."""
    gs = k if group == -1 else group
    split = cfg.get("SPLIT_K") or _split_k(1, n, k, dict(BLOCK_M=1, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"]),
                                           132, per_sm=cfg.get("PER_SM", 4), one_wave=True)
    sig = dict(x_ptr=f"*{dtype}", qw_ptr="*i32", qz_ptr="*i32", s_ptr=f"*{dtype}", g_ptr="*i32", b_ptr=f"*{dtype}",
               nw_ptr=f"*{dtype}", res_ptr=f"*{dtype}", y_ptr=f"*{dtype}", part_ptr="*fp32", ss_ptr="*fp32",
               lock_ptr="*i32", N="i32", K="i32", ZW="i32", k_per_split="i32", half_shift="i32", eps="fp32")
    const = dict(BITS=bits, HAS_BIAS=False, NORM=fused or silu_mul, RESIDUAL=fused and not silu_mul,
                 SILU_MUL=silu_mul, SPLIT=split > 1 or silu_mul, FAST_OK=gs % cfg["BLOCK_K"] == 0 or gs >= k,
                 GROUP_TILES=0 if gs >= k else gs // cfg["BLOCK_K"],
                 EVEN_N=n % cfg["BLOCK_N"] == 0, EVEN_K=k % cfg["BLOCK_K"] == 0, BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_K=cfg["BLOCK_K"], X_PAIRS=k % cfg["BLOCK_K"] == 0 and dtype in ("bf16", "fp16"),
                 ACC_ROWS=cfg.get("ACC_ROWS", False), STAGES=cfg["num_stages"], REDUCE_ROWS=cfg.get("REDUCE_ROWS", 16),
                 PDL=bool(cfg.get("PDL", False)))
    names = list(sig)
    aligned = [name for name in names[:12]] + [name for name, v in (("N", n), ("K", k), ("ZW", n * bits // 32),
                                                                    ("half_shift", 16)) if v % 16 == 0]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    sig.update({name: "constexpr" for name in const})
    label = (f"gemv m1 {bits}bit g{group} bn{cfg['BLOCK_N']} bk{cfg['BLOCK_K']} w{cfg['num_warps']}"
             f"{' norm+silu_mul' if silu_mul else ' norm+residual' if fused else ''}")
    return (label, kernels("triton_gptq_gemv_kernel").gptq_gemv_kernel, sig, const,
            dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), dict(attrs=attrs))
