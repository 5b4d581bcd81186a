"""``optgptq::gptq_linear``: y = x @ dequant(W) + bias over HF GPTQ tensors; the reference and fake implementations.

The reference (``torch_gptq_linear``) is the ground truth for every kernel and the CPU path. GPU kernels register
as separate ops and are chosen by ``lowering.select_kernels``; this op's own implementation stays plain PyTorch.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant.format import dequantize
from ..quant.packing import SUPPORTED_BITS


def check_gptq_shapes(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
) -> None:
    """Raise a ValueError naming the tensor whose shape or dtype does not fit the GPTQ layout."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"gptq_linear: unsupported bits={bits}; supported {SUPPORTED_BITS}")
    k, n = x.shape[-1], scales.shape[-1]
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if t.dtype != torch.int32:
            raise ValueError(f"gptq_linear: {name} must be int32, got {t.dtype}")
    if qweight.shape != (k * bits // 32, n) or (k * bits) % 32:
        raise ValueError(f"gptq_linear: qweight {tuple(qweight.shape)} does not fit x[..., {k}] and scales [G, {n}]")
    if g_idx.shape != (k,):
        raise ValueError(f"gptq_linear: g_idx {tuple(g_idx.shape)} must be [{k}]")
    if qzeros.shape != (scales.shape[0], -(-n * bits // 32)):
        raise ValueError(f"gptq_linear: qzeros {tuple(qzeros.shape)} does not fit scales {tuple(scales.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"gptq_linear: bias {tuple(bias.shape)} must be [{n}]")


def torch_gptq_linear(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # int32 [K*bits/32, N]
    qzeros: torch.Tensor,  # int32 [G, N*bits/32]
    scales: torch.Tensor,  # [G, N]
    g_idx: torch.Tensor,  # int32 [K]
    bias: Optional[torch.Tensor],  # [N]
    bits: int,
) -> torch.Tensor:  # [..., N]
    """Reference: dequantize the whole weight in fp32, then one matmul in the activation dtype."""
    w = dequantize(qweight, qzeros, scales, g_idx, bits).to(x.dtype)  # [K, N]
    y = x @ w
    return y + bias.to(y.dtype) if bias is not None else y


@torch.library.custom_op("optgptq::gptq_linear", mutates_args=())
def gptq_linear(
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
    # contiguous: the fake returns a fresh contiguous tensor, and Inductor asserts the real strides match it
    return (torch_gptq_linear(x, qweight, qzeros, scales, g_idx, bias, bits)).contiguous()


@gptq_linear.register_fake
def _gptq_linear_fake(x, qweight, qzeros, scales, g_idx, bias, bits, group_size):
    check_gptq_shapes(x, qweight, qzeros, scales, g_idx, bias, bits)
    return x.new_empty(*x.shape[:-1], scales.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# optgptq::gptq_linear_fused: the linear with the RMSNorm before it and the residual add after it (passes/
# fuse_norm_residual.py). At decode a Llama layer's two "residual add + RMSNorm" kernels then disappear into the
# GEMVs around them: the norm's sum of squares is summed with the GEMV's K splits, its 1/rms scales the outputs.
# ``act="silu_mul"`` (passes/fuse_silu_mul.py) takes the gate/up projection's output apart in the epilogue: the
# first half of the columns is the gate, the second the up projection, and the op returns silu(gate) * up (N / 2).

ACTS = ("none", "silu_mul")


def check_fused_extras(x: torch.Tensor, norm_weight: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                       n: int, act: str = "none") -> None:
    """Raise a ValueError naming the norm weight, residual or activation that does not fit x [..., K] -> y [..., N]
    (N the weight's columns; the output has N / 2 with ``act="silu_mul"``)."""
    k = x.shape[-1]
    if act not in ACTS:
        raise ValueError(f"gptq_linear_fused: unknown act {act!r}; expected one of {ACTS}")
    if act == "silu_mul" and (n % 2 or residual is not None):
        raise ValueError(f"gptq_linear_fused: act='silu_mul' needs an even number of columns (gate then up), got "
                         f"{n}, and no residual, got {None if residual is None else tuple(residual.shape)}")
    if norm_weight is not None and (norm_weight.shape != (k,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"gptq_linear_fused: norm_weight {tuple(norm_weight.shape)} {norm_weight.dtype} must be "
                         f"[{k}] {x.dtype} (x's features and dtype)")
    if residual is not None and (residual.shape != (*x.shape[:-1], n) or residual.dtype != x.dtype):
        raise ValueError(f"gptq_linear_fused: residual {tuple(residual.shape)} {residual.dtype} must be "
                         f"{(*x.shape[:-1], n)} {x.dtype} (the output's shape and x's dtype)")


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm`` exactly (fp32 statistics, normalized x rounded to x's dtype, then the weight)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def torch_silu_mul(y: torch.Tensor) -> torch.Tensor:
    """HF's ``act_fn(gate) * up`` for y = [gate | up] along the last dim, in y's dtype as HF rounds it."""
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def torch_gptq_linear_fused(x, norm_weight, eps, qweight, qzeros, scales, g_idx, bias, residual, bits,
                            act: str = "none"):
    """Reference: ``rms_norm(x)`` (when ``norm_weight`` is given), the gptq_linear reference, then
    ``silu(gate) * up`` (act="silu_mul") or ``+ residual``."""
    if norm_weight is not None:
        x = torch_rms_norm(x, norm_weight, eps)
    y = torch_gptq_linear(x, qweight, qzeros, scales, g_idx, bias, bits)
    if act == "silu_mul":
        y = torch_silu_mul(y)
    return y + residual if residual is not None else y


def fused_out_features(n: int, act: str) -> int:
    """The fused op's output features for a weight of ``n`` columns."""
    return n // 2 if act == "silu_mul" else n


@torch.library.custom_op("optgptq::gptq_linear_fused", mutates_args=())
def gptq_linear_fused(
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
    return torch_gptq_linear_fused(x, norm_weight, eps, qweight, qzeros, scales, g_idx, bias, residual, bits,
                                   act).contiguous()


@gptq_linear_fused.register_fake
def _gptq_linear_fused_fake(x, norm_weight, eps, qweight, qzeros, scales, g_idx, bias, residual, bits, group_size,
                            act="none"):
    check_gptq_shapes(x, qweight, qzeros, scales, g_idx, bias, bits)
    check_fused_extras(x, norm_weight, residual, scales.shape[-1], act)
    return x.new_empty(*x.shape[:-1], fused_out_features(scales.shape[-1], act))
