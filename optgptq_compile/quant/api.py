"""``optgptq_compile.quantize(model, calibration, **options)``: sequential GPTQ, linears replaced by ``GPTQLinear``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import OptGPTQConfig, parse_options
from ..log import log
from .format import GPTQWeight
from .gptq import GPTQSettings
from .modules import GPTQLinear
from .rtn import quantize_rtn
from .sequential import gptq_sequential

QUANT_ATTR = "optgptq_quantization"  # model attribute: the settings save_quantized writes to quantization_config


def gptq_settings(config: OptGPTQConfig) -> GPTQSettings:
    return GPTQSettings(bits=config.bits, group_size=config.group_size, sym=config.sym, act_order=config.act_order,
                        static_groups=config.static_groups, damp_percent=config.damp_percent,
                        clip_search=config.clip_search)


def quantize_data_free(weight: torch.Tensor, config: OptGPTQConfig) -> GPTQWeight:
    """The default without calibration data: min-max round-to-nearest.

    Chosen by measurement on SmolLM2 4-bit g128 (benchmarks/RESULTS.md, Quality): min-max RTN 28.24 perplexity,
    RTN with an (unweighted) clipping search 30.66: without a Hessian to say which inputs matter, clipping
    trades large-magnitude weights, which matter most, for a smaller average error. ``clip_search`` therefore
    applies to GPTQ only, where the search is weighted by the Hessian diagonal.
    """
    return quantize_rtn(weight, config.bits, config.group_size, config.sym)


def quant_settings_dict(config: OptGPTQConfig) -> dict:
    """What ``quantization_config`` records about how the weights were made."""
    return {"bits": config.bits, "group_size": config.group_size, "desc_act": config.act_order, "sym": config.sym,
            "damp_percent": config.damp_percent, "static_groups": config.static_groups,
            "true_sequential": config.true_sequential}


def replace_linears(model: nn.Module, weights: dict[str, GPTQWeight]) -> nn.Module:
    """Swap each named ``nn.Linear`` of ``model`` for a ``GPTQLinear`` holding its packed weight (same device)."""
    for fqn, qw in weights.items():
        linear = model.get_submodule(fqn)
        bias = linear.bias.detach() if linear.bias is not None else None
        model.set_submodule(fqn, GPTQLinear(qw.to(linear.weight.device), bias))
    return model


def quantize(model: nn.Module, calibration: Any, batch_size: int = 8, **options) -> nn.Module:
    """GPTQ the decoder-block linears of a HF causal LM in place and return it.

    ``calibration``: a LongTensor [N, S] of token ids (or an iterable of such). ``options`` are the backend's
    quantization options (``bits``, ``group_size``, ``act_order``, ``sym``, ``damp_percent``, ``static_groups``,
    ``true_sequential``, ``clip_search``), validated the same way. Linears become ``GPTQLinear`` modules, so a
    later ``torch.compile(model, backend="optgptq")`` keeps them and ``save_quantized`` writes them.
    """
    if "calibration" in options:
        raise ValueError("pass calibration as the second argument of quantize(), not as an option")
    config = parse_options(options)
    if config.bits is None:
        raise ValueError("quantize(): bits=None means dense; choose bits from 2, 3, 4, 8")
    if calibration is None:
        raise ValueError("quantize() needs calibration token ids, a LongTensor [N, S]")
    weights = gptq_sequential(model, calibration, gptq_settings(config), config.true_sequential, batch_size,
                              restore=False)
    replace_linears(model, weights)
    setattr(model, QUANT_ATTR, quant_settings_dict(config))
    log.info("quantize: %d linears replaced by GPTQLinear (%d-bit, group %d)", len(weights), config.bits,
             config.group_size)
    return model
