"""One quantized linear weight in the HF GPTQ tensor layout, and its conversions to and from integers.

Layout (K = in_features, N = out_features, G = number of groups = ceil(K / group_size)):
    qweight  int32 [K*bits/32, N]   packed along K
    qzeros   int32 [G, N*bits/32]   packed along N; holds the zero point itself (the ``gptq_v2`` convention;
                                    the old AutoGPTQ files store zero - 1, converted on load/save)
    scales   fp16/bf16/fp32 [G, N]
    g_idx    int32 [K]              group of each input channel (act-order permutes it)
Dequantized weight: W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].
"""

from __future__ import annotations

import dataclasses

import torch

from .packing import pack_cols, pack_rows, unpack_cols, unpack_rows


@dataclasses.dataclass
class GPTQWeight:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int  # -1 = one group over all of K

    @property
    def in_features(self) -> int:
        return self.g_idx.numel()

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> "GPTQWeight":
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense [N, K] tensor (the ``nn.Linear.weight`` orientation)."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits).t().to(dtype)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """Channel k belongs to group k // group_size (no act-order); group_size -1 puts all of K in group 0."""
    size = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // size).to(torch.int32)


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def concat_out_features(weights: list[GPTQWeight]) -> GPTQWeight:
    """Weights over the same input channels (equal ``g_idx``) side by side along N: one wider ``GPTQWeight`` whose
    output columns are those of ``weights[0]``, then ``weights[1]``, ... . ``qzeros`` packs along N, so every part's
    ``N * bits`` must fill whole int32 words for the parts to concatenate word by word."""
    first = weights[0]
    for w in weights[1:]:
        if (w.bits, w.group_size) != (first.bits, first.group_size) or not torch.equal(w.g_idx, first.g_idx):
            raise ValueError("concat_out_features: weights differ in bits, group_size or g_idx")
    for w in weights:
        if (w.out_features * w.bits) % 32:
            raise ValueError(f"concat_out_features: out_features={w.out_features} at {w.bits} bits does not fill "
                             "whole int32 words of qzeros")
    return GPTQWeight(
        qweight=torch.cat([w.qweight for w in weights], dim=1),  # [K*bits/32, sum N]
        qzeros=torch.cat([w.qzeros for w in weights], dim=1),  # [G, sum N*bits/32]
        scales=torch.cat([w.scales for w in weights], dim=1),  # [G, sum N]
        g_idx=first.g_idx,
        bits=first.bits,
        group_size=first.group_size,
    )


def slice_out_features(weight: GPTQWeight, start: int, end: int) -> GPTQWeight:
    """Output columns ``[start, end)`` of ``weight`` as views (no copy; not contiguous unless they are all of N).
    ``start`` and ``end`` times ``bits`` must be multiples of 32 (whole ``qzeros`` words)."""
    bits = weight.bits
    if (start * bits) % 32 or (end * bits) % 32:
        raise ValueError(f"slice_out_features: [{start}, {end}) at {bits} bits is not on qzeros word boundaries")
    return dataclasses.replace(
        weight,
        qweight=weight.qweight[:, start:end],
        qzeros=weight.qzeros[:, start * bits // 32:end * bits // 32],
        scales=weight.scales[:, start:end],
    )


def pack_weight(
    intweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int, group_size: int
) -> GPTQWeight:
    """intweight [N, K] ints in [0, 2**bits), zeros [G, N] ints, scales [G, N] -> packed ``GPTQWeight``."""
    n, k = intweight.shape
    if zeros.shape != scales.shape or scales.shape[1] != n:
        raise ValueError(f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be [G, {n}]")
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected [{k}]")
    return GPTQWeight(
        qweight=pack_rows(intweight.t().contiguous(), bits),
        qzeros=pack_cols(zeros.to(torch.int64), bits),
        scales=scales,
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
    )


def dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> torch.Tensor:
    """Packed GPTQ tensors -> dense fp32 weight [K, N] (the orientation ``x @ W`` needs)."""
    q = unpack_rows(qweight, bits)[: g_idx.numel()]  # [K, N]
    z = unpack_cols(qzeros, bits)[:, : scales.shape[1]]  # [G, N]
    g = g_idx.long()
    return (q - z[g]).to(torch.float32) * scales[g].to(torch.float32)
