"""GPTQ (Frantar et al., arXiv 2210.17323) for one linear layer: the streamed Hessian and the column-wise quantizer.

Each column is rounded in turn and its rounding error is spread over the not-yet-quantized columns through the
upper Cholesky factor of H^-1, so the layer's output error ||XW^T - XQ^T||^2 (H = 2 X^T X / n) stays small.
Beyond the textbook algorithm: group scales/zeros come from a Hessian-weighted clipping search (``clip_search``)
instead of min-max, and groups never straddle a lazy block, so each group's range is taken from the columns
already updated by the errors of earlier columns (the reference code reads stale values for groups < 128).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..log import log
from .format import GPTQWeight, num_groups, pack_weight
from .rtn import minmax_params

BLOCKSIZE = 128  # lazy-batch width: columns updated together before the trailing matrix is touched


class Hessian:
    """H = 2/n * sum_t x_t x_t^T over every token row seen so far (fp32), accumulated batch by batch."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [K, K]
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """x [..., K]: every leading index is one sample (a token)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.matrix.device, torch.float32)  # [T, K]
        t = x.shape[0]
        if t == 0:
            return
        self.matrix *= self.count / (self.count + t)  # rescale the running mean to the new count
        self.count += t
        x = x * math.sqrt(2.0 / self.count)
        self.matrix.addmm_(x.t(), x)


@dataclasses.dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    group_size: int = 128  # -1: one group over all of K
    sym: bool = True
    act_order: bool = True  # columns in order of decreasing H diagonal
    static_groups: bool = False  # group ranges fixed from the original weight (g_idx stays k // group_size)
    damp_percent: float = 0.01
    clip_search: bool = True  # Hessian-weighted search over shrunk ranges instead of min-max


CLIP_GRID = torch.linspace(1.0, 0.55, 19).tolist()  # range shrink factors tried (1.0 = min-max)


def group_params(
    w: torch.Tensor, bits: int, sym: bool, clip_search: bool, importance: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, g] -> scale [N], zero [N] for one group of columns.

    With ``clip_search``, each row takes the shrunk min-max range whose rounding error, weighted per column by
    ``importance`` [g] (the Hessian diagonal: how much that input's error reaches the output), is smallest.
    Scales are rounded to ``scale_dtype`` here, so the error GPTQ compensates is the one the stored file has.
    """
    maxq = 2**bits - 1
    w = w.float()
    best_scale = best_zero = None
    best_err = None
    weight = importance.float().clamp_min(1e-12)[None, :] if importance is not None else 1.0
    for shrink in CLIP_GRID if clip_search else [1.0]:
        scale, zero = minmax_params(w * shrink, bits, sym)
        scale = scale.to(scale_dtype).float().clamp_min(torch.finfo(scale_dtype).tiny)
        if best_scale is None:
            best_scale, best_zero = scale, zero
            if not clip_search:
                break
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
        err = (((q - zero[:, None]) * scale[:, None] - w).pow(2) * weight).sum(dim=1)  # [N]
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1; the damping grows tenfold until H is positive definite."""
    damp = damp_percent * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        log.warning("GPTQ: Hessian not positive definite with damping %.3g; retrying with 10x", float(damp))
        damp = damp * 10
    raise ValueError("GPTQ: the Hessian stays singular even with heavy damping (calibration data degenerate?)")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, settings: GPTQSettings) -> tuple[GPTQWeight, float]:
    """weight [N, K] (``nn.Linear`` orientation), hessian [K, K] -> (packed ``GPTQWeight``, proxy output loss).

    The loss is GPTQ's sum of err^2 / d^2 / 2 over columns (comparable between settings on one layer).
    """
    bits, sym = settings.bits, settings.sym
    maxq = 2**bits - 1
    n, k = weight.shape
    scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
    w = weight.detach().float().clone()  # [N, K]
    h = hessian.detach().float().clone()  # [K, K]
    dead = torch.diag(h) == 0  # inputs that were always zero: any value works, zero the column
    h[dead, dead] = 1
    w[:, dead] = 0
    diag = torch.diag(h).clone()  # [K] before damping: importance of each input for the clip search

    size = k if settings.group_size == -1 else settings.group_size
    groups = num_groups(k, settings.group_size)
    static = settings.static_groups or settings.group_size == -1
    scales = torch.zeros(groups, n, dtype=torch.float32, device=w.device)  # [G, N]
    zeros = torch.zeros(groups, n, dtype=torch.float32, device=w.device)  # [G, N]
    if static:  # ranges from the original weight, in natural column order
        for g in range(groups):
            cols = slice(g * size, min((g + 1) * size, k))
            scales[g], zeros[g] = group_params(w[:, cols], bits, sym, settings.clip_search, diag[cols], scale_dtype)

    perm = torch.argsort(diag, descending=True) if settings.act_order else torch.arange(k, device=w.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    diag_perm = diag[perm]
    # group of each (permuted) column: natural groups when static, consecutive runs of the permuted order if not
    group_of = (perm // size) if static else (torch.arange(k, device=w.device) // size)
    hinv = _inverse_cholesky(h, settings.damp_percent)  # [K, K] upper

    # groups must not straddle a lazy block, so a group's range is read from fully updated columns
    blocksize = BLOCKSIZE if static else (max(1, BLOCKSIZE // size) * size)
    qint = torch.zeros(n, k, dtype=torch.int32, device=w.device)
    loss = torch.zeros(n, device=w.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()  # [N, B]
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % size == 0:
                end = min(i + size, i2 - i1)
                g = col // size
                scales[g], zeros[g] = group_params(
                    w1[:, i:end], bits, sym, settings.clip_search, diag_perm[col:i1 + end], scale_dtype
                )
            g = int(group_of[col])
            scale, zero = scales[g], zeros[g]
            col_w = w1[:, i]
            q = torch.clamp(torch.round(col_w / scale) + zero, 0, maxq)
            qint[:, col] = q.to(torch.int32)
            deq = (q - zero) * scale
            d = hinv1[i, i]
            err = (col_w - deq) / d
            loss += (col_w - deq).pow(2) / d**2 / 2
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    g_idx = group_of[invperm].to(torch.int32)  # [K] group of each original input channel
    packed = pack_weight(qint[:, invperm], zeros, scales.to(scale_dtype), g_idx, bits, settings.group_size)
    return packed, float(loss.sum())
