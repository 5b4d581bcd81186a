"""``GPTQLinear``: an ``nn.Linear`` replacement holding packed GPTQ tensors; its forward is ``optgptq::gptq_linear``.

Compiling a model that holds these keeps the op in the graph (the ``quantize_linear`` pass only rewrites plain
``linear`` calls, so nothing is quantized twice), and ``save_quantized`` writes its buffers as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from .format import GPTQWeight


class GPTQLinear(nn.Module):
    def __init__(self, qweight: GPTQWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.group_size = qweight.bits, qweight.group_size
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.register_buffer("qweight", qweight.qweight)  # int32 [K*bits/32, N]
        self.register_buffer("qzeros", qweight.qzeros)  # int32 [G, N*bits/32] (real zero points)
        self.register_buffer("scales", qweight.scales)  # [G, N]
        self.register_buffer("g_idx", qweight.g_idx)  # int32 [K]
        self.register_buffer("bias", None if bias is None else bias.detach().clone())  # [N]

    def weight_tensors(self) -> GPTQWeight:
        return GPTQWeight(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        return torch.ops.optgptq.gptq_linear(
            x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bias, self.bits, self.group_size
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}"
