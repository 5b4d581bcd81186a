"""The int4 baseline of the end-to-end benchmark: torch's int4 "tinygemm" matmul, as torchao's int4 weight-only
quantization and gpt-fast's ``WeightOnlyInt4Linear`` run it.

Weights are quantized asymmetrically by round-to-nearest (min-max per group of 128 input columns) in tinygemm's
convention: ``w = (q - 8) * scale + zero`` with ``q`` in [0, 16) and ``zero`` a float. The packed layout and the op
differ by device (torch >= 2.6):

- CUDA / ROCm: ``aten._convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)`` with the even column in the
  high nibble -> int32 [N/8, K/(inner_k_tiles*16), 32, inner_k_tiles/2]; ``aten._weight_int4pack_mm(x, w, group,
  scales_and_zeros)`` takes bf16 activations only (its CUDA kernel checks ``A.dtype() == kBFloat16``).
- CPU: ``aten._convert_weight_to_int4pack_for_cpu(int32 [N, K], inner_k_tiles)`` packs itself;
  ``aten._weight_int4pack_mm_for_cpu`` takes fp32 / fp16 / bf16.

``scales_and_zeros`` is [K/group, N, 2] (scale, zero) in the activation dtype on both.
"""

from __future__ import annotations

import torch
from torch import nn

INNER_K_TILES = 8  # what torchao and gpt-fast use: 16-byte loads of packed weights
GROUP_SIZES = (32, 64, 128, 256)  # the group sizes tinygemm's kernels are instantiated for


def quantize_tinygemm(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int32 [N, K] in [0, 16), scales [N, K/g], zeros [N, K/g]) in fp32, asymmetric min-max."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)  # [N, G, g]
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, G]
    scales = (hi - lo).clamp(min=1e-6) / 15  # a constant group keeps a finite scale
    zeros = lo + 8 * scales  # tinygemm's zero is the value of q = 8
    q = ((w - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scales, zeros


def dequantize_tinygemm(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The reference: q [N, K], scales/zeros [N, G] -> fp32 weight [N, K]."""
    n, k = q.shape
    g = k // scales.shape[1]
    w = (q.float().reshape(n, -1, g) - 8) * scales[..., None].float() + zeros[..., None].float()  # [N, G, g]
    return w.reshape(n, k)


def pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """q int32 [N, K] -> the packed weight ``_weight_int4pack_mm`` (CUDA) or its ``_for_cpu`` twin reads."""
    q = q.to(device)
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INNER_K_TILES)
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2]: even column in the high nibble
    return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), INNER_K_TILES)


class TinyGemmInt4Linear(nn.Module):
    """``nn.Linear`` with an int4 g128 weight run by tinygemm (no bias: Llama's linears have none)."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, out_features: int,
                 group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int4pack", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/g, N, 2]

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "TinyGemmInt4Linear":
        w = linear.weight
        n, k = w.shape
        check_shape(n, k, group_size, w.device, w.dtype, linear.bias is not None)
        q, scales, zeros = quantize_tinygemm(w.detach(), group_size)
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(w.dtype)  # [G, N, 2]
        return cls(pack_int4(q, w.device), sz, k, n, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()  # [M, K]: the ops take 2-D row-major activations
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight_int4pack, self.group_size,
                                                           self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(rows, self.weight_int4pack, self.group_size,
                                                   self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)  # [..., N]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def check_shape(n: int, k: int, group_size: int, device: torch.device, dtype: torch.dtype, bias: bool) -> None:
    """ValueError naming the constraint a weight breaks (the ops themselves fail with bare TORCH_CHECKs)."""
    if bias:
        raise ValueError("TinyGemmInt4Linear: linears with a bias are not supported (Llama has none)")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"tinygemm group_size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size or k % (INNER_K_TILES * 16) or n % 16:  # N: 16-row tiles on the CPU and ROCm (CUDA: 8)
        raise ValueError(f"tinygemm needs K % {group_size} == 0, K % {INNER_K_TILES * 16} == 0 and N % 16 == 0; "
                         f"got a weight of [N={n}, K={k}]")
    if device.type != "cpu" and dtype != torch.bfloat16:
        raise ValueError(f"tinygemm on {device.type} takes bf16 activations only; the model is {dtype}")


def replace_linears(root: nn.Module, group_size: int = 128) -> tuple[int, float]:
    """Swap every ``nn.Linear`` under ``root`` (pass the decoder layers, not the LM head) for a tinygemm module,
    dropping the dense weights as it goes (peak memory stays at the dense model's). The first swap is checked
    against its dequantized reference (ValueError past ``tolerance(dtype)``). Returns (count, that error)."""
    targets = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.Linear)]
    error = float("nan")
    for i, (name, linear) in enumerate(targets):
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        with torch.no_grad():
            module = TinyGemmInt4Linear.from_linear(linear, group_size)
            if i == 0:
                error = max_relative_error(module, linear.weight)
                if not error <= tolerance(linear.weight.dtype):
                    raise ValueError(f"tinygemm self-check failed on {name}: relative error {error:.3g} against "
                                     f"the dequantized weight (wrong packing or scale layout for this torch?)")
        setattr(parent, attr, module)
        linear.weight = None  # free the dense copy now, not when the loop ends
    return len(targets), error


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed between tinygemm and the fp32 matmul of its dequantized weight: the output is
    rounded to ``dtype`` (bf16: 8 mantissa bits) and the accumulation order differs."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def max_relative_error(module: TinyGemmInt4Linear, dense_weight: torch.Tensor, rows: int = 4) -> float:
    """|tinygemm(x) - x @ dequant(W)^T| / |x @ dequant(W)^T| (Frobenius) on random x: catches a wrong packing or
    scale layout, which runs without an error and only corrupts the numbers."""
    q, scales, zeros = quantize_tinygemm(dense_weight, module.group_size)
    ref_w = dequantize_tinygemm(q, scales.to(module.scales_and_zeros.dtype), zeros.to(module.scales_and_zeros.dtype))
    g = torch.Generator(device=dense_weight.device).manual_seed(0)
    x = torch.randn(rows, module.in_features, generator=g, device=dense_weight.device).to(dense_weight.dtype)
    ref = x.float() @ ref_w.t()
    out = module(x).float()
    return ((out - ref).norm() / ref.norm()).item()
