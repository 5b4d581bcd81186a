"""Greedy decoding's argmax over the vocabulary as a Triton kernel (``triton_argmax_kernel.py``), for CUDA and
ROCm; ``torch.argmax`` is the reference and the path everywhere else and for vocabularies past ``MAX_VOCAB``
(``runtime/sampling.greedy_tokens``).

Not a custom op: the runtime calls it on a decode step's logits, outside the compiled model.
Portability: no inline asm, no ``tl.extra.cuda``, no assumption on lanes per warp.
"""

from __future__ import annotations

import torch
import triton
from torch.library import wrap_triton

from .triton_utils import kernels

KERNELS = "triton_argmax_kernel"
BLOCK = 16384  # values per pass: 32 a lane with 16 warps of 32 lanes (16 with AMD's 64)
NUM_WARPS = 16
# one program a row pays where a row is short: H100 session 14 (benchmarks/bench_argmax.py, fp16, us, ours / aten):
# 32000 entries 3.2 / 9.6 at batch 1, 4.1 / 10.1 at 64; 49152 4.5 / 13.0 and 5.3 / 13.7; but BLOOM's 250880 15.5 /
# 9.8 at batch 1 (one SM streams the whole row) and 22.7 / 31.4 at 64. Longer rows stay with torch.argmax.
MAX_VOCAB = 65536

VARIANTS: dict = {}  # no op to swap in a graph (lowering/__init__ reads every kernel module's VARIANTS)


def torch_argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The reference: [B] int64, the first index of each row's maximum."""
    return logits.argmax(-1)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Launcher: logits [B, V] (fp16, bf16 or fp32; rows any stride, last dim contiguous) -> [B] int64."""
    if logits.dim() != 2:
        raise ValueError(f"argmax_rows: logits must be [B, V], got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    b, v = logits.shape
    if v == 0:
        raise ValueError("argmax_rows: an empty vocabulary has no argmax")
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b:
        block = min(BLOCK, triton.next_power_of_2(v))
        wrap_triton(kernels(KERNELS).argmax_rows_kernel)[(b,)](
            logits, out, v, logits.stride(0), BLOCK=block, num_warps=NUM_WARPS if block >= 4096 else 4)
    return out


def aot_specs(dtype: str = "fp16") -> list[tuple]:
    """(label, kernel, signature, constexprs, options, extra): the launcher's build for a 32000-entry vocabulary
    (BLOCK 16384, 16 warps), the same build for CUDA and ROCm (no PDL)."""
    mod = kernels(KERNELS)
    sig = dict(x_ptr=f"*{dtype}", out_ptr="*i64", V="i32", stride_x="i32", BLOCK="constexpr")
    names = mod.argmax_rows_kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("x_ptr", "out_ptr", "stride_x")}
    return [(f"argmax rows {dtype}", mod.argmax_rows_kernel, sig, dict(BLOCK=BLOCK), dict(num_warps=NUM_WARPS),
             dict(attrs=attrs))]
