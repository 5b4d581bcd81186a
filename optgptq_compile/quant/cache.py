"""Quantized tensors cached per parameter object, so the several graphs of one model quantize each weight once.

``generate`` compiles about three graphs (prefill, first decode, dynamic decode); each one sees the same
``nn.Parameter`` objects. The cache is keyed by the parameter's identity (weakly: it never keeps a model alive) and
by the settings that determine the result (``OptGPTQConfig.quant_key``). GPTQ (calibrated) results are put here by
``quantize`` / the one-call path before the ``quantize_linear`` pass looks them up.

Fused groups (``fuse``: sibling projections such as q/k/v concatenated along N by the ``fuse_projections`` pass)
are cached per tuple of parameters, built once and shared by every graph of the model; the per-parameter entries
then become views into the fused tensors, so no weight is held twice.
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .format import GPTQWeight, concat_out_features, slice_out_features

_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Parameter -> {quant_key: GPTQWeight}
_released: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Parameter -> number of bytes freed
# first Parameter of a group -> {(what, key, ids of the group's Parameters): (weakrefs to them, value)}
_groups: WeakIdKeyDictionary = WeakIdKeyDictionary()


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


def _group_get(params: Sequence[torch.Tensor], what: tuple):
    found = _groups.get(params[0], {}).get((*what, tuple(id(p) for p in params)))
    if found is None:
        return None
    refs, value = found
    # ids can be reused by new objects once the old ones are gone: the weak references say whether they are
    return value if all(r() is p for r, p in zip(refs, params)) else None


def _group_put(params: Sequence[torch.Tensor], what: tuple, value) -> None:
    entry = (tuple(weakref.ref(p) for p in params), value)
    _groups.setdefault(params[0], {})[(*what, tuple(id(p) for p in params))] = entry


def lookup_fused(params: Sequence[torch.Tensor], key: tuple) -> GPTQWeight | None:
    return _group_get(params, ("weight", key))


def fuse(params: Sequence[torch.Tensor], key: tuple, parts: Sequence[GPTQWeight]) -> GPTQWeight:
    """The quantized weights of ``params`` side by side along N, as one ``GPTQWeight``, built once per (params, key).

    ``parts`` are their quantized forms under ``key`` (``lookup``'s, moved to the device the graph runs on), in the
    order of ``params``; they are read only the first time. Each parameter's own entry then becomes a view of its
    columns of the fused tensors, so the separate copies are freed as soon as no graph holds them, and graphs
    compiled later (which look weights up per parameter) add no bytes.
    """
    found = lookup_fused(params, key)
    if found is not None:
        return found
    fused = concat_out_features(list(parts))
    start = 0
    for param, part in zip(params, parts):  # not ``store``: no new quantization, the same values as views
        _cache.setdefault(param, {})[key] = slice_out_features(fused, start, start + part.out_features)
        start += part.out_features
    _group_put(params, ("weight", key), fused)
    return fused


def fused_bias(biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(biases)``, built once per tuple of bias parameters. A snapshot, like the quantized weights: a bias
    changed in place after the first compile is not seen by graphs that use the fused copy."""
    found = _group_get(biases, ("bias",))
    if found is None:
        with torch.no_grad():
            found = torch.cat([b.detach() for b in biases])
        _group_put(biases, ("bias",), found)
    return found


def quantized_bytes(params) -> int:
    """Bytes of the storages that hold the packed tensors cached for ``params``, each storage counted once (a fused
    group's storage once, however many parameters hold views of it)."""
    seen, total = set(), 0
    for p in params:
        for qw in _cache.get(p, {}).values():
            for t in qw.tensors().values():
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total
