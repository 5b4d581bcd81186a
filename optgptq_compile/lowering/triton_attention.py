"""Triton flash attention for ``optgptq::attention``: ``optgptq::attention_triton`` (same schema), CUDA and ROCm.

Kernel: ``triton_attention_kernel.py`` (online softmax in fp32 with exp2, GQA rows packed into the tile's M
dimension, causal tiles above the diagonal skipped, ALiBi computed from the slopes in the kernel, key-padding mask
loaded per KV tile). Reference and contract: ``attention.py`` (``torch_attention``).

Launch shapes, chosen by ``pick_config`` from the packed row count ``Sq * G`` (G = Hq // Hkv):
  * prefill (more than 64 rows): 128-row tiles, one program per (row tile, batch, KV head), heaviest causal
    tiles first;
  * decode / short chunks (<= 64 rows): one row tile of 16..64 rows per (batch, KV head); when those programs
    cannot fill the GPU the keys are split into chunks (flash-decoding): each chunk writes a normalized partial
    output and its row log-sum-exp, and ``attention_combine_kernel`` merges them.
ROCm (64 KB LDS per workgroup on MI200/MI300) gets narrower KV tiles and no multi-stage pipelining.
Inputs other than fp16/bf16/fp32, or head dims over 256, run the reference (same results, not fast).
Backward: the reference's (``attention._backward``), so the variant is a drop-in in graphs that need grads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton  # noqa: F401  (lowering/__init__ registers this module only where triton imports)
from torch.library import triton_op, wrap_triton

from . import attention as ref
from .attention import check_attention_shapes, torch_attention  # noqa: F401  (the reference: ground truth)
from .triton_utils import check_device, device_index, kernels, num_sms, tracing_interpreted

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
DECODE_MAX_ROWS = 64  # up to here one row tile holds every query of a (batch, KV head): the decode shape
MAX_SPLITS = 32


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (80 -> 128), at least 16 (the smallest dot tile)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def pick_config(rows: int, skv: int, head_dim: int, dtype: torch.dtype, programs: int, hip: bool = False,
                sms: int = 132) -> dict:
    """Tiles, warps, stages and KV splits for ``rows = Sq * G`` packed query rows per (batch, KV head) and
    ``programs = B * Hkv``. Every dot tile is >= 16 in each dimension; warp counts suit 64-lane AMD waves too.
    Shared memory (tests/lowering/test_aot_compile.py): H100 prefill d128 128 KB of 227 KB; ROCm <= 64 KB."""
    bd = block_d(head_dim)
    if rows > DECODE_MAX_ROWS:
        bm = 128
        if dtype == torch.float32:  # fp32 tiles are twice the bytes, and the IEEE dot is slow anyway
            bm, bn, warps, stages = 64, 32, 4, (1 if hip else 2)
        elif hip:
            bn, warps, stages = (64 if bd <= 64 else 32), 4, 1
        else:
            bn, warps, stages = 64, (8 if bd >= 128 else 4), 3
    else:
        bm = max(16, triton.next_power_of_2(rows))
        bn = 64 if bd <= 64 or not hip else 32
        warps, stages = 4, (1 if hip else 3)
        if dtype == torch.float32:
            bn, stages = 32, (1 if hip else 2)
    if bd > 128:  # 256-wide heads: halve the tiles so Q, K and V still fit shared memory
        bm, bn, warps, stages = min(bm, 64), 32, 4, (1 if hip else 2)
    splits = 1
    if rows <= DECODE_MAX_ROWS and programs < 2 * sms:  # decode: too few programs to keep HBM busy
        splits = min(MAX_SPLITS, -(-2 * sms // programs))
        if isinstance(skv, int):  # at least 4 KV tiles per split; a symbolic (dynamic) context length is left
            splits = max(1, min(splits, -(-skv // bn) // 4))  # alone: no guard, no recompile per decode step
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, SPLITS=splits)


@triton_op("optgptq::attention_triton", mutates_args=())
def attention_triton(
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
    check_device(q, "attention_triton")
    return flash_attention(q, k, v, alibi_slopes, key_padding_mask, causal, scale)


attention_triton.register_autograd(ref._backward, setup_context=ref._setup_context)


def flash_attention(q, k, v, alibi_slopes, key_padding_mask, causal, scale, config: Optional[dict] = None):
    """Launcher: out [B, Hq, Sq, D] (contiguous, q's dtype). ``config`` overrides ``pick_config`` (tests and
    benchmarks)."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if q.dtype not in KERNEL_DTYPES or d > MAX_HEAD_DIM:
        return torch_attention(q, k, v, alibi_slopes, key_padding_mask, causal, scale).contiguous()
    group = hq // hkv
    rows = sq * group  # packed (query, head-in-group) rows per (batch, KV head)
    out = q.new_empty(b, hq, sq, d)  # [B, Hq, Sq, D]
    if out.numel() == 0:
        return out
    hip = torch.version.hip is not None
    cfg = dict(config) if config is not None else pick_config(rows, skv, d, q.dtype, b * hkv, hip,
                                                              num_sms(device_index(q)))
    splits = cfg.pop("SPLITS")
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    kv_chunk = -(-skv // (splits * bn)) * bn  # whole KV tiles per split (a chunk past Skv is empty: -inf, no key)
    if isinstance(skv, int) and kv_chunk:
        splits = -(-skv // kv_chunk)  # drop the empty trailing chunks when the length is known
    split = splits > 1
    if split:
        part = torch.empty(splits, b * hkv * rows, d, device=q.device, dtype=torch.float32)  # [SPLITS, rows, D]
        lse = torch.empty(splits, b * hkv * rows, device=q.device, dtype=torch.float32)  # [SPLITS, rows]
    else:
        part, lse = out, out  # unused
    slopes = alibi_slopes.contiguous() if alibi_slopes is not None else q  # q: a dummy pointer
    pad = key_padding_mask if key_padding_mask is not None else q
    pad_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    grid = (b * hkv, -(-rows // bm), splits)
    if tracing_interpreted(q):  # fake tracing in the interpreter: everything above ran, the launch cannot
        return out
    # every constexpr passed explicitly: Inductor's launcher for wrap_triton kernels ignores Python defaults
    wrap_triton(kernels("triton_attention_kernel").attention_fwd_kernel)[grid](
        q, k, v, slopes, pad, part if split else out, lse,
        sq, skv, group, hkv,
        *q.stride(), *k.stride(), *v.stride(), *pad_strides, *out.stride()[:3],
        scale * math.log2(math.e), kv_chunk,
        CAUSAL=causal, HAS_ALIBI=alibi_slopes is not None, HAS_PAD=key_padding_mask is not None, SPLIT=split,
        IEEE=q.dtype == torch.float32, HEAD_D=d, BLOCK_D=block_d(d), **cfg)
    if split:
        wrap_triton(kernels("triton_attention_kernel").attention_combine_kernel)[(b * hkv * rows,)](
            part, lse, out, sq, group, hkv, splits, b * hkv * rows, *out.stride()[:3],
            HEAD_D=d, BLOCK_D=block_d(d), BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4, num_stages=1)
    return out


VARIANTS = {
    torch.ops.optgptq.attention.default: {
        "triton": torch.ops.optgptq.attention_triton.default,
        "prepare": None,
    }
}


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compile specs (tests/lowering/test_aot_compile.py)

_STRIDES = ("stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh",
            "stride_vn", "stride_pb", "stride_ob", "stride_oh", "stride_os")


def _fwd_spec(label, head_dim, rows, skv, causal, alibi, pad, hip, dtype="fp16"):
    """One attention_fwd_kernel build as the GPU JIT would specialize it: unit head-dim strides are constants,
    pointers and the other strides divisible by 16 (contiguous or [B, S, H, D]-transposed tensors)."""
    mod = kernels("triton_attention_kernel")
    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cfg = pick_config(rows, skv, head_dim, tdtype, programs=8, hip=hip)
    split = cfg.pop("SPLITS") > 1
    opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    const = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_pn=1, CAUSAL=causal, HAS_ALIBI=alibi, HAS_PAD=pad,
                 SPLIT=split, IEEE=dtype == "fp32", HEAD_D=head_dim, BLOCK_D=block_d(head_dim), **cfg)
    sig = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", slopes_ptr="*fp32", pad_ptr="*i1",
               out_ptr="*fp32" if split else f"*{dtype}", lse_ptr="*fp32")
    sig.update({name: "i32" for name in mod.attention_fwd_kernel.arg_names if name not in sig})
    sig.update(qk_scale="fp32", **{name: "constexpr" for name in const})
    names = mod.attention_fwd_kernel.arg_names
    aligned = [n for n in sig if n.endswith("_ptr") or n in _STRIDES]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    backend = "hip" if hip else "cuda"
    extra = dict(attrs=attrs, backends=(backend,))
    label = f"{label} {backend} {'split ' if split else ''}m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}"
    return label, mod.attention_fwd_kernel, sig, const, opts, extra


def aot_specs() -> list[tuple]:
    """(label, kernel, signature, constexprs, options, extra) for every configuration the launcher picks for head
    dims 64/80/128: prefill (causal or not, ALiBi on/off, padding mask) and split-KV decode, for CUDA (built for
    sm90) and ROCm (built for gfx90a/gfx942; must fit 64 KB LDS), plus the split combine kernel. ``extra`` holds
    the divisibility attributes the JIT would infer and the backends a config is meant for."""
    specs = []
    for hip in (False, True):
        specs += [
            _fwd_spec("dot attention d128 causal alibi pad", 128, 4 * 2048, 2048, True, True, True, hip),
            _fwd_spec("dot attention d128 causal", 128, 2048, 2048, True, False, False, hip),
            _fwd_spec("dot attention d80 alibi", 80, 1024, 1024, False, True, False, hip),
            _fwd_spec("dot attention d64 causal pad", 64, 3 * 1024, 1024, True, False, True, hip),
            _fwd_spec("dot attention decode d128 gqa4 alibi", 128, 4, 4096, True, True, False, hip),
            _fwd_spec("attention fp32 ieee d64 causal", 64, 512, 512, True, False, False, hip, dtype="fp32"),
        ]
    mod = kernels("triton_attention_kernel")
    const = dict(HEAD_D=128, BLOCK_D=128, BLOCK_S=16)
    sig = dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*fp16", Sq="i32", G="i32", HKV="i32", splits="i32",
               total_rows="i32", stride_ob="i32", stride_oh="i32", stride_os="i32",
               **{name: "constexpr" for name in const})
    specs.append(("attention split combine d128", mod.attention_combine_kernel, sig, const,
                  dict(num_warps=4, num_stages=1)))
    return specs
