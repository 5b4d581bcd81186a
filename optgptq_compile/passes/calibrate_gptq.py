"""Run sequential GPTQ once per model on the ``calibration`` option, so ``quantize_linear`` finds calibrated weights.

The backend sees one FX graph and the real ``nn.Parameter`` objects, not the model. GPTQ needs the model (block
inputs come from running it), so this pass finds the module that owns every parameter of the graph at its path
(Dynamo records the paths), runs ``gptq_sequential`` on it with the original weights restored afterwards, and
stores each result in ``quant.cache`` under the config's ``quant_key``. Later graphs of the same model (decode
graphs of ``generate``) find the results there and do not calibrate again. The graph itself is not changed.
"""

from __future__ import annotations

import gc

import torch
import torch.fx as fx
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..context import PassContext
from ..log import log
from ..quant import cache
from ..quant.api import gptq_settings
from ..quant.sequential import DENSE_MODULES, gptq_sequential
from .quantize_linear import LINEAR_TARGETS, _linear_args

NAME = "calibrate_gptq"

_calibrated: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Parameter -> set of quant keys already calibrated
_warned: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Parameter -> True once the no-calibration warning was given


def _linear_weights(gm: fx.GraphModule, ctx: PassContext) -> dict[str, nn.Parameter]:
    """{fqn: Parameter} of the weights of this graph's linear calls that quantize_linear may quantize."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        weight = _linear_args(node)[1]
        param = ctx.parameter(weight)
        fqn = ctx.placeholder_fqns.get(getattr(weight, "name", ""), None)
        if param is None or fqn is None or param.dim() != 2:
            continue
        module_name = fqn.rsplit(".", 2)[-2] if fqn.count(".") else fqn
        if module_name in DENSE_MODULES:
            continue
        found[fqn] = param
    return found


def find_owner(params: dict[str, nn.Parameter]) -> nn.Module | None:
    """The live ``nn.Module`` holding every parameter of ``params`` at its path (the model being compiled)."""
    first_fqn, first = next(iter(params.items()))
    for obj in gc.get_objects():
        try:
            # type(), not isinstance(): some module-level objects warn when their __class__ is read
            if not issubclass(type(obj), nn.Module) or obj.get_parameter(first_fqn) is not first:
                continue
        except (AttributeError, TypeError):
            continue
        named = dict(obj.named_parameters(remove_duplicate=False))
        if all(named.get(fqn) is p for fqn, p in params.items()):
            return obj
    return None


def _run_gptq(root: nn.Module, calibration, config) -> dict:
    """Eager (wrapped in ``torch._dynamo.disable`` by the caller): the model runs on the calibration data while its
    own compile is in progress. ``type(root).forward`` bypasses a compiled ``model.forward`` attribute, which would
    otherwise re-enter this backend."""
    return gptq_sequential(root, calibration, gptq_settings(config), config.true_sequential, restore=True,
                           forward=type(root).forward)


def calibrate_gptq(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Calibrate the owning model with GPTQ (once per model and settings); results go to ``quant.cache``."""
    config = ctx.config
    if config.bits is None:
        return False
    weights = _linear_weights(gm, ctx)
    if not weights:
        return False
    key = config.quant_key()
    first = next(iter(weights.values()))
    if config.calibration is None:
        if first not in _warned:
            _warned[first] = True
            log.warning("optgptq: no calibration data, so linear weights are quantized by min-max round-to-nearest "
                        "(worse than GPTQ); pass options={'calibration': token_ids} (a LongTensor "
                        "[N, S] of real text) for GPTQ")
        return False
    pending = {fqn: p for fqn, p in weights.items()
               if cache.lookup(p, key) is None and key not in _calibrated.get(p, set())}
    if not pending:
        return False
    released = [fqn for fqn, p in pending.items() if cache.is_released(p)]
    if released:
        raise RuntimeError(f"{released[0]}: dense weight already released by an earlier optgptq compile with other "
                           "settings; reload the model (or pass keep_dense=True) to calibrate it again")
    root = find_owner(weights)
    if root is None:
        for fqn in pending:
            ctx.skipped(NAME, next(n for n in gm.graph.nodes if n.op == "placeholder"),
                        f"{fqn}: owning module not found; quantized without calibration")
        return False
    results = torch._dynamo.disable(_run_gptq)(root, config.calibration, config)
    for fqn, qw in results.items():
        cache.store(root.get_submodule(fqn).weight, key, qw)
    for p in root.parameters():
        _calibrated.setdefault(p, set()).add(key)
    for fqn in pending:
        if f"{fqn.rsplit('.', 1)[0]}" not in results:
            log.info("%s: %s is outside the decoder blocks; quantized without calibration", NAME, fqn)
    log.info("%s: %d linears calibrated with GPTQ", NAME, len(results))
    return False
