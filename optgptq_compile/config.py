"""The backend's options: one validated, hashable config object built from ``torch.compile(options=...)``."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
KERNEL_CHOICES = ("auto", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class OptGPTQConfig:
    """Every option of ``backend="optgptq"``; see README "Options" for what each one does."""

    bits: int | None = 4  # None keeps dense weights (attention is still rewritten)
    group_size: int = 128  # -1 = one group per output channel (per-channel quantization)
    act_order: bool = True  # GPTQ: quantize columns in order of decreasing Hessian diagonal
    sym: bool = True
    # None, a LongTensor [N, S] of token ids, or an iterable of such (not compared: tensors have no bool ==)
    calibration: Any = dataclasses.field(default=None, compare=False)
    kv_heads: int | None = None  # None keeps the model's KV heads; an int merges them (Opt-GQA)
    block_size: int = 16  # tokens per paged-KV block
    kernels: str = "auto"  # "auto": Triton on CUDA/ROCm, reference on CPU
    dump_dir: str | None = None  # also settable with OPTGPTQ_DUMP_DIR
    keep_dense: bool = False  # keep the dense copies of quantized weights (eager use of the model stays possible)
    strict: bool = False  # raise instead of falling back when a pass fails (for debugging the compiler)
    damp_percent: float = 0.01  # GPTQ Hessian dampening, fraction of the mean diagonal
    static_groups: bool = False  # GPTQ: group ranges fixed before act-order (g_idx stays k // group_size)
    true_sequential: bool = True  # GPTQ: calibrate a block's later linears on its already-quantized earlier ones
    clip_search: bool = True  # GPTQ: scale/zero from a Hessian-weighted clipping search instead of min-max
    fuse_projections: bool = True  # one gptq_linear for sibling projections of one input (q/k/v, gate/up)
    fuse_norm_residual: bool = True  # RMSNorm before / residual add after a gptq_linear folded into the call
    fuse_silu_mul: bool = True  # silu(gate) * up of a fused gate/up gptq_linear computed in the call's epilogue
    fuse_rope_kv_write: bool = True  # RoPE of q and k computed by the paged KV write (one rope_kv_write op)
    fuse_rope_attention: bool = True  # that rope_kv_write folded into the paged attention (rope_paged_attention)

    def quant_key(self) -> tuple:
        """The settings that determine a quantized weight; quantized tensors are cached under this key."""
        return (self.bits, self.group_size, self.act_order, self.sym, self.damp_percent, self.static_groups,
                self.true_sequential, self.clip_search, self.calibration is not None)


_ACCEPTED = {
    "bits": "one of 2, 3, 4, 8 or None",
    "group_size": "-1 or a positive int (typically 32, 64, 128)",
    "act_order": "True or False",
    "sym": "True or False",
    "calibration": "None, a LongTensor [N, S] of token ids, or an iterable of such",
    "kv_heads": "None or a positive int",
    "block_size": "a positive power of two",
    "kernels": "one of 'auto', 'triton', 'reference'",
    "dump_dir": "None or a directory path",
    "keep_dense": "True or False",
    "strict": "True or False",
    "damp_percent": "a float in (0, 1]",
    "static_groups": "True or False",
    "true_sequential": "True or False",
    "clip_search": "True or False",
    "fuse_projections": "True or False",
    "fuse_norm_residual": "True or False",
    "fuse_silu_mul": "True or False",
    "fuse_rope_kv_write": "True or False",
    "fuse_rope_attention": "True or False",
}


def _bad(key: str, value: Any) -> ValueError:
    return ValueError(f"optgptq option {key!r}={value!r} is invalid: expected {_ACCEPTED[key]}")


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_calibration(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int64, torch.int32) or value.dim() != 2 or value.numel() == 0:
            raise _bad("calibration", f"Tensor(dtype={value.dtype}, shape={tuple(value.shape)})")
        return
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise _bad("calibration", value)


def parse_options(options: dict | None) -> OptGPTQConfig:
    """Validate ``options`` and return the config; unknown keys and bad values raise ``ValueError``."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_ACCEPTED))
    if unknown:
        raise ValueError(f"unknown optgptq option(s) {unknown}; accepted keys are {sorted(_ACCEPTED)}")
    checks = {
        "bits": lambda v: v is None or (_is_int(v) and v in SUPPORTED_BITS),
        "group_size": lambda v: _is_int(v) and (v == -1 or v > 0),
        "act_order": _is_bool,
        "sym": _is_bool,
        "kv_heads": lambda v: v is None or (_is_int(v) and v > 0),
        "block_size": lambda v: _is_int(v) and v > 0 and (v & (v - 1)) == 0,
        "kernels": lambda v: v in KERNEL_CHOICES,
        "dump_dir": lambda v: v is None or isinstance(v, (str, os.PathLike)),
        "keep_dense": _is_bool,
        "strict": _is_bool,
        "damp_percent": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
        "static_groups": _is_bool,
        "true_sequential": _is_bool,
        "clip_search": _is_bool,
        "fuse_projections": _is_bool,
        "fuse_norm_residual": _is_bool,
        "fuse_silu_mul": _is_bool,
        "fuse_rope_kv_write": _is_bool,
        "fuse_rope_attention": _is_bool,
    }
    for key, value in options.items():
        if key == "calibration":
            _check_calibration(value)
        elif not checks[key](value):
            raise _bad(key, value)
    if options.get("dump_dir") is None and os.environ.get("OPTGPTQ_DUMP_DIR"):
        options["dump_dir"] = os.environ["OPTGPTQ_DUMP_DIR"]
    if options.get("dump_dir") is not None:
        options["dump_dir"] = os.fspath(options["dump_dir"])
    return OptGPTQConfig(**options)
