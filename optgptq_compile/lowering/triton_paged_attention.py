"""Triton paged attention and KV write: ``optgptq::paged_attention_triton`` and ``optgptq::kv_write_triton``, the
same schemas as ``optgptq::paged_attention`` / ``optgptq::kv_write`` (``paged_attention.py``: contract and
references), for CUDA and ROCm.

Paged attention (kernels in ``triton_paged_attention_kernel.py``): one program per (sequence, KV head, query tile,
KV split); the query heads of a GQA group share the rows of one ``tl.dot`` tile, so K/V are read once per KV head.
Decode (Sq = 1) and small batches split the context (flash-decoding): each split writes an fp32 partial and a second
kernel combines them. Where a split is one K/V tile (``ONE_TILE``: decode at small batch) the program has no loop,
and with PDL it reads the context length, the block ids and keys older than the step's before it waits for the
kernel before it (``early_kv_ok``): only the step's new keys and q wait. Every choice is made from shapes only -- the longest context a step can have is
``block_tables.shape[1] * block_size`` -- so a decode step can be captured in a CUDA graph (splits that start past a
sequence's real context exit at once with a neutral partial).

KV write: one program per 16 tokens of one KV head; slot -1 (padding) is neither read nor stored.
Portability: no inline asm, no ``tl.extra.cuda``, dot tiles >= 16, no assumption on lanes per warp, tiles sized to
fit 64 KB of LDS on AMD.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton  # noqa: F401  (lowering/__init__ registers this module only where triton imports)
from torch.library import triton_op, wrap_triton

from .paged_attention import check_kv_write, check_paged_attention, torch_kv_write, torch_paged_attention  # noqa: F401
from .triton_rope_kv_write import _broadcast_stride, rope_kv_write_launch
from .triton_utils import (check_device, device_index, kernels, launch_options, num_sms, pdl, per_backend,
                           tracing_interpreted)

LOG2E = 1.4426950408889634
KERNELS = "triton_paged_attention_kernel"

# ----------------------------------------------------------------------------------------------------------------
# paged attention


def pick_config(batch: int, kv_heads: int, sq: int, group: int, head_dim: int, max_context: int,
                dtype: torch.dtype, num_sms: int = 132, hip: bool = False) -> dict:
    """Tiles, warps, stages and KV splits for one call, from shapes only (CUDA-graph safe). Rows of a query tile
    are (query, head-in-group) pairs: 16 rows hold a decode step of GQA up to 16. On CUDA three stages let the
    pipeliner fetch block ids two tiles ahead and K/V one tile ahead (cp.async, ~39 KB of shared memory at head
    128); ROCm builds get two stages (32 KB of the 64 KB LDS; prefill 40 KB). Decode with enough programs to fill
    the GPU unsplit (batch >= 17 at 8 KV heads) takes 128-key tiles and 8 warps on CUDA: H100 session 11
    (``paged_decode_probe.py --grid``, GQA 32/8, head 128) batch 64 x 2048 tokens 184.9 us against 207.5 with
    64-key tiles and 4 warps, batch 32 x 4096 184.3 against 192.9, batch 32 x 512 29.1 against 29.7; with splits
    (batch 1-8) the 64-key tiles stayed faster (600 tokens: 4.5 against 4.9 us at batch 1, 12.6 against 13.5 at 8)."""
    rows = sq * group
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    wide = dtype == torch.float32 or head_dim > 128
    cfg = dict(BLOCK_M=block_m, BLOCK_N=32 if wide else 64, num_warps=4, num_stages=2 if hip else 3)
    per_sequence = kv_heads * -(-rows // block_m)  # programs of one sequence, before splitting
    cfg["SPLITS"] = num_splits(batch * per_sequence, per_sequence, max_context, cfg["BLOCK_N"], num_sms)
    if rows <= 16 and not wide and not hip and batch * per_sequence >= num_sms:  # decode, whole contexts
        cfg.update(BLOCK_N=128, num_warps=8)
    return cfg


def num_splits(programs: int, per_sequence: int, max_context: int, block_n: int, num_sms: int,
               min_tiles: int = 1) -> int:
    """KV splits for a call of ``programs`` (query tiles x KV heads x sequences). With fewer programs than SMs
    (decode at small batch) the context is split as if the batch held one sequence: into one-tile splits where that
    is at most ~4 programs per SM for it (``ONE_TILE``: no loop, and with PDL the loads start before the wait), else
    into ~2 programs per SM, each split keeping at least ``min_tiles`` K/V tiles. A program's time is a chain of
    dependent loads (context length, block ids, K, V) per tile, so the shortest chains win. H100, GQA 32/8, head
    128, batch 1: session 7, 600 tokens in a 640-token table, 7.1 us with 10 one-tile splits against 8.8 with 5
    two-tile ones; session 11, 4096 tokens, 11.7 us with 64 one-tile splits against 14.1-14.2 with 32-33 two-tile
    ones; 8192 tokens, 20.0 us with 33 four-tile splits against 21.5 with 64 two-tile ones (128 one-tile ones
    18.3-18.7 us, not taken: this rule also splits batch 8, where more splits were slower). The batch enters
    through that one comparison only: under torch.compile with a dynamic batch it is a single guard (two compiled
    variants), not one per batch size."""
    if programs >= num_sms:
        return 1
    tiles = -(-max_context // block_n)
    per_sm2 = -(-2 * num_sms // per_sequence)  # splits for ~2 programs per SM
    if min_tiles == 1 and tiles <= 2 * per_sm2:
        return max(1, min(tiles, 128))
    return max(1, min(per_sm2, tiles // min_tiles, 128))


@triton_op("optgptq::paged_attention_triton", mutates_args=())
def paged_attention_triton(
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
    check_device(q, "paged_attention_triton")
    return paged_attention_fwd(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes, causal, scale)


def paged_attention_fwd(q, k_cache, v_cache, block_tables, context_lens, alibi_slopes, causal, scale,
                        config: Optional[dict] = None, rope: Optional[tuple] = None) -> torch.Tensor:
    """Launcher: out [B, Hq, Sq, D] (contiguous). ``config`` overrides ``pick_config`` (tests, benchmarks).
    ``rope`` = (k, v, cos, sin, slot_mapping) of ``optgptq::rope_paged_attention`` (prepared by its launcher): q
    is then before RoPE. At decode with one tile a program the kernel rotates q and the new key and stores the new
    k/v (``ROPE``); elsewhere ``rope_kv_write_kernel`` runs first (the kernel docstring says why)."""
    b, hq, sq, d = q.shape
    num_blocks, block_size, hkv, _ = k_cache.shape
    group = hq // hkv
    out = q.new_empty(b, hq, sq, d)  # [B, Hq, Sq, D]
    if out.numel() == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():  # pools are contiguous; anything else: copy
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    max_context = block_tables.shape[1] * block_size  # the longest context this call can see: a shape, not data
    if config is not None:
        cfg = dict(config)
    else:
        cfg = pick_config(b, hkv, sq, group, d, max_context, q.dtype, num_sms(device_index(q)),
                          hip=torch.version.hip is not None)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    splits, split_len = split_plan(max_context, cfg.pop("SPLITS"), block_n)
    if rope is not None and (sq != 1 or split_len != block_n):  # prefill or a K/V loop: RoPE + KV write first
        q = rope_kv_write_launch(q, rope[0], rope[1], rope[2], rope[3], k_cache, v_cache, rope[4])
        rope = None
    rows = sq * group
    split = splits > 1
    if split:  # fp32 partials, combined by the reduce kernel; every split writes all of its rows
        m_part = _scratch((b * hkv, rows, splits), q.device)
        l_part = _scratch((b * hkv, rows, splits), q.device)
        acc_part = _scratch((b * hkv, rows, splits, d), q.device)
    else:
        m_part = l_part = acc_part = q  # never dereferenced without SPLIT; read-only q keeps `out` a single argument
    if tracing_interpreted(q):
        return out
    mod = kernels(KERNELS)
    d_pad = triton.next_power_of_2(d)
    grid = (b * hkv, -(-rows // block_m), splits)
    use_pdl = pdl(q)
    if rope is not None:
        k_new, v_new, cos, sin, slot_mapping = rope  # k/v [B, Hkv, D], cos/sin [Bc, 1, 1, D], int64 [B]
        rope_strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
                        _broadcast_stride(cos, 0))
    else:  # never dereferenced without ROPE
        k_new = v_new = cos = sin = q
        slot_mapping = context_lens
        rope_strides = (0, 0, 0, 0, 0)
    # every constexpr passed explicitly: Inductor's launcher for wrap_triton kernels ignores Python defaults
    wrap_triton(mod.paged_attention_kernel)[grid](
        q, k_cache, v_cache, block_tables, context_lens, alibi_slopes if alibi_slopes is not None else context_lens,
        out, m_part, l_part, acc_part, k_new, v_new, cos, sin, slot_mapping, sq, hkv, splits, split_len,
        scale * LOG2E, q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), *rope_strides,
        GROUP=group, HEAD_DIM=d, D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=bool(causal), ALIBI=alibi_slopes is not None, SPLIT=split, IEEE=q.dtype == torch.float32,
        NUM_STAGES=cfg["num_stages"], PDL=use_pdl, ONE_TILE=split_len == block_n, EARLY_KV=early_kv_ok(),
        ROPE=rope is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(use_pdl))
    if split:
        wrap_triton(mod.paged_attention_reduce_kernel)[(b * hkv, rows)](
            m_part, l_part, acc_part, out, sq, splits, GROUP=group, HEAD_DIM=d, D_PAD=d_pad,
            SPLITS_PAD=triton.next_power_of_2(splits), PDL=use_pdl, num_warps=4, **launch_options(use_pdl))
    return out


def split_plan(max_context: int, splits: int, block_n: int) -> tuple[int, int]:
    """(splits, keys per split): whole K/V tiles per split, no split left empty by the rounding."""
    split_len = -(-max_context // (splits * block_n)) * block_n
    return max(1, -(-max_context // split_len)), split_len


def early_kv_ok() -> bool:
    """May a one-tile program read the context length, block table and older keys before ``gdc_wait``? Those are
    written by no kernel of ours (ours write activations, scratch and -- kv_write -- only the step's new keys), and
    a kernel that is not ours releases the next one only when it ends, so they are complete once a chain of our PDL
    kernels starts. Inductor's own PDL (``TORCHINDUCTOR_ENABLE_PDL=1``) releases its kernels early: then no.
    ``OPTGPTQ_EARLY_KV=0`` turns it off (for measuring what it is worth)."""
    from torch._inductor import config

    return os.environ.get("OPTGPTQ_EARLY_KV", "1") != "0" and not config.triton.enable_pdl


def _scratch(shape: tuple, device: torch.device) -> torch.Tensor:
    """Uninitialized fp32 split partials (a test fills them with NaN to prove every split writes its rows)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# KV write

KV_WRITE_BLOCK_T = 16  # tokens per program: 16 x 128 x 2 B = 4 KB of K and 4 KB of V per program at head 128


@triton_op("optgptq::kv_write_triton", mutates_args=("k_cache", "v_cache"))
def kv_write_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    check_kv_write(k, v, k_cache, v_cache, slot_mapping)
    check_device(k, "kv_write_triton")
    kv_write_launch(k, v, k_cache, v_cache, slot_mapping)


def kv_write_launch(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Launcher: k/v [T, Hkv, D] into the pools at ``slot_mapping`` (int64 [T], -1 skipped), in place."""
    t, hkv, d = k.shape
    block_size = k_cache.shape[1]
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError(f"kv_write_triton: k_cache strides {k_cache.stride()} and v_cache strides "
                         f"{v_cache.stride()} must be equal, head_dim contiguous (the pools are written in place)")
    # k and v keep their own strides: at decode v is a view of the fused qkv output, and a copy here was a
    # 2.3 us kernel per layer at batch 8 (session 9 profile)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if slot_mapping.stride(0) != 1:
        slot_mapping = slot_mapping.contiguous()
    if t == 0 or tracing_interpreted(k):
        return
    mod = kernels(KERNELS)
    grid = (-(-t // KV_WRITE_BLOCK_T), hkv)
    use_pdl = pdl(k)
    wrap_triton(mod.kv_write_kernel)[grid](
        k, v, k_cache, v_cache, slot_mapping, t, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), BLOCK_SIZE=block_size, BLOCK_T=KV_WRITE_BLOCK_T, PDL=use_pdl,
        num_warps=4, **launch_options(use_pdl))


VARIANTS = {
    torch.ops.optgptq.paged_attention.default: {
        "triton": torch.ops.optgptq.paged_attention_triton.default, "prepare": None},
    torch.ops.optgptq.kv_write.default: {"triton": torch.ops.optgptq.kv_write_triton.default, "prepare": None},
}


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compile specs (tests/lowering/test_aot_compile.py)


def _aligned(fn, sig: dict) -> dict:
    """ASTSource attrs as the GPU JIT infers them from real arguments: 16-divisible pointers and strides (the pools,
    q and the scratch are fresh allocations with head dims 64/80/128), so loads vectorize and pipeline."""
    names = fn.arg_names
    return {(names.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items()
            if ty != "constexpr" and (n.endswith("_ptr") or n.startswith("stride_") and n != "stride_btb"
                                      or n == "split_len")}


def aot_specs(dtype: str = "fp16") -> list[tuple]:
    """(label, kernel, signature, constexprs, options, extra) of what the launcher picks on CUDA (built for sm90) and
    on ROCm (built for gfx90a/gfx942, 64 KB LDS) for a 32-query-head model: decode (Sq=1) at batch 1 (split KV) for
    every head dim 64/80/128 x GQA 1/4/7 (32/32, 32/8, 28/4 heads), ALiBi alternating so each head dim and each
    group is built with and without it; decode at batch 1 in a 640-token table (one tile per split: ``ONE_TILE``);
    decode at batch 32 (no split); causal prefill (Sq=512); the split reduce and the KV write for each head dim. ``extra``: the JIT's divisibility attrs and the backend a config is for."""
    mod = kernels(KERNELS)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    attn_sig = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", bt_ptr="*i32", ctx_ptr="*i32",
                    slopes_ptr="*fp32", out_ptr=f"*{dtype}", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32",
                    Sq="i32", Hkv="i32", num_splits="i32", split_len="i32", qk_scale="fp32",
                    kn_ptr=f"*{dtype}", vn_ptr=f"*{dtype}", cos_ptr=f"*{dtype}", sin_ptr=f"*{dtype}",
                    slot_ptr="*i64", stride_qb="i32", stride_qh="i32", stride_qs="i32", stride_kb="i32",
                    stride_ks="i32", stride_kh="i32", stride_btb="i32", stride_knb="i32", stride_knh="i32",
                    stride_vnb="i32", stride_vnh="i32", stride_csb="i32")
    cases = []  # (label, batch, Sq, kv heads, group, head dim, alibi, longest context, rope)
    for i, (d, (hkv, group)) in enumerate((d, hg) for d in (64, 80, 128) for hg in ((32, 1), (8, 4), (4, 7))):
        alibi = i % 2 == 1
        cases.append((f"dot paged decode d{d} g{group}{' alibi' if alibi else ''}", 1, 1, hkv, group, d, alibi, 4096,
                      False))
    cases += [("dot paged decode 640 d128 g4 one-tile", 1, 1, 8, 4, 128, False, 640, False),  # e2e.py's batch-1 table
              ("dot paged decode 640 d80 g7 alibi one-tile", 1, 1, 4, 7, 80, True, 640, False),
              ("dot paged decode batch32 d128 g4 alibi", 32, 1, 8, 4, 128, True, 4096, False),
              ("dot paged prefill d128 g4", 4, 512, 8, 4, 128, False, 4096, False),
              ("dot paged prefill d80 g7 alibi", 4, 512, 4, 7, 80, True, 4096, False),
              # rope_paged_attention (one-tile decode only): e2e.py's 7B (MHA) batch-1 table, SmolLM2's heads, GQA 7
              ("rope paged decode 640 d128 g1 one-tile", 1, 1, 32, 1, 128, False, 640, True),
              ("rope paged decode 640 d64 g3 one-tile", 1, 1, 3, 3, 64, False, 640, True),
              ("rope paged decode 640 d80 g7 one-tile", 1, 1, 4, 7, 80, False, 640, True)]
    specs = []
    for hip in (False, True):
        backend = "hip" if hip else "cuda"
        for label, batch, sq, hkv, group, d, alibi, context, rope in cases:
            cfg = pick_config(batch, hkv, sq, group, d, context, torch_dtype, hip=hip)
            splits, split_len = split_plan(context, cfg["SPLITS"], cfg["BLOCK_N"])
            split = splits > 1
            const = dict(GROUP=group, HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), BLOCK_SIZE=16,
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], CAUSAL=True, ALIBI=alibi, SPLIT=split,
                         IEEE=dtype == "fp32", NUM_STAGES=cfg["num_stages"], PDL=not hip,
                         ONE_TILE=split_len == cfg["BLOCK_N"], EARLY_KV=True, ROPE=rope)
            sig = {**attn_sig, **{name: "constexpr" for name in const}}
            specs.append((f"{label} {backend}{' split' if split else ''}", mod.paged_attention_kernel, sig,
                          const, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
                          dict(attrs=_aligned(mod.paged_attention_kernel, sig), backends=(backend,))))
    for d in (64, 80, 128):  # the same build on every backend
        const = dict(GROUP=4, HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), SPLITS_PAD=64)
        sig = dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr=f"*{dtype}", Sq="i32", num_splits="i32",
                   **{name: "constexpr" for name in const})
        specs += per_backend((f"paged reduce d{d}", mod.paged_attention_reduce_kernel, sig, const,
                              dict(num_warps=4), dict(attrs=_aligned(mod.paged_attention_reduce_kernel, sig))))
        const = dict(HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), BLOCK_SIZE=16, BLOCK_T=KV_WRITE_BLOCK_T)
        sig = dict(k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", k_cache_ptr=f"*{dtype}", v_cache_ptr=f"*{dtype}",
                   slot_ptr="*i64", T="i32", stride_kt="i32", stride_kh="i32", stride_vt="i32", stride_vh="i32",
                   stride_cb="i32", stride_cs="i32", stride_ch="i32", **{name: "constexpr" for name in const})
        specs += per_backend((f"kv_write d{d}", mod.kv_write_kernel, sig, const, dict(num_warps=4),
                              dict(attrs=_aligned(mod.kv_write_kernel, sig))))
    return specs
