"""How many bytes a model's weights take, counting what compiled graphs hold instead of released dense weights."""

from __future__ import annotations

import torch

from .quant import cache


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once; released dense weights count 0) plus the
    packed GPTQ tensors that compiled graphs hold for its parameters."""
    module = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps the module
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen or storage.nbytes() == 0:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total + cache.quantized_bytes(module.parameters())
