"""Quantized tensors cached per parameter object, so the several graphs of one model quantize each weight once.

``generate`` compiles about three graphs (prefill, first decode, dynamic decode); each one sees the same
``nn.Parameter`` objects. The cache is keyed by the parameter's identity (weakly: it never keeps a model alive) and
by the settings that determine the result (``OptGPTQConfig.quant_key``). GPTQ (calibrated) results are put here by
``quantize`` / the one-call path before the ``quantize_linear`` pass looks them up.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .format import GPTQWeight

_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Parameter -> {quant_key: GPTQWeight}
_released: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Parameter -> number of bytes freed


def lookup(param: torch.Tensor, key: tuple) -> GPTQWeight | None:
    return _cache.get(param, {}).get(key)


def store(param: torch.Tensor, key: tuple, qweight: GPTQWeight) -> None:
    _cache.setdefault(param, {})[key] = qweight


def get_or_quantize(param: torch.Tensor, key: tuple, quantize: Callable[[torch.Tensor], GPTQWeight]) -> GPTQWeight:
    """The cached quantized form of ``param`` under ``key``, quantizing (once) if needed."""
    found = lookup(param, key)
    if found is not None:
        return found
    if is_released(param):
        raise RuntimeError(
            "this weight's dense values were released by an earlier optgptq compile with other quantization "
            "settings; reload the model (or pass options={'keep_dense': True}) to compile it with new settings"
        )
    with torch.no_grad():
        qweight = quantize(param.detach())
    store(param, key, qweight)
    return qweight


def release_dense(param: torch.Tensor) -> int:
    """Free the dense storage of ``param`` (shape and dtype stay, so Dynamo's guards still hold). Returns bytes freed.

    After this, only compiled graphs that use the quantized copy can run; eager use of the layer raises.
    """
    if is_released(param):
        return 0
    storage = param.untyped_storage()
    freed = storage.nbytes()
    if not storage.resizable():  # e.g. memory-mapped safetensors: move to an ordinary storage that can be freed
        param.data = param.data.clone()
        storage = param.untyped_storage()
    storage.resize_(0)
    _released[param] = freed
    return freed


def is_released(param: torch.Tensor) -> bool:
    return param in _released


def quantized_bytes(params) -> int:
    """Bytes of the packed tensors cached for ``params`` (each distinct tensor counted once)."""
    seen, total = set(), 0
    for p in params:
        for qw in _cache.get(p, {}).values():
            for t in qw.tensors().values():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total
