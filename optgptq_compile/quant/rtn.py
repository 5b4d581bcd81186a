"""Round-to-nearest quantization with min-max scales per group: the baseline GPTQ is measured against."""

from __future__ import annotations

import torch

from .format import GPTQWeight, default_g_idx, num_groups, pack_weight


def minmax_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, g] (one group of columns per row) -> scale [N], zero [N] (zero an integer in [0, 2**bits))."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)  # the range always contains 0, so zeros stay exact
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    degenerate = (xmax - xmin) == 0  # an all-zero group: any scale works, use 1 to avoid 0/0
    xmin = torch.where(degenerate, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(degenerate, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w [N, g], scale/zero [N] -> ints [N, g] in [0, 2**bits)."""
    return torch.clamp(torch.round(w.float() / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> GPTQWeight:
    """weight [N, K] (``nn.Linear`` orientation) -> ``GPTQWeight`` with min-max round-to-nearest per group."""
    n, k = weight.shape
    size = k if group_size == -1 else group_size
    groups = num_groups(k, group_size)
    scales = torch.empty(groups, n, dtype=torch.float32, device=weight.device)
    zeros = torch.empty(groups, n, dtype=torch.float32, device=weight.device)
    intweight = torch.empty(n, k, dtype=torch.int32, device=weight.device)
    for g in range(groups):
        cols = slice(g * size, min((g + 1) * size, k))  # the last group may be partial (K=576, g128)
        scale, zero = minmax_params(weight[:, cols], bits, sym)
        scales[g], zeros[g] = scale, zero
        intweight[:, cols] = quantize_to_int(weight[:, cols], scale, zero, bits).to(torch.int32)
    scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
    return pack_weight(intweight, zeros, scales.to(scale_dtype), default_g_idx(k, group_size, weight.device), bits, group_size)
