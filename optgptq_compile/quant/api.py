"""``optgptq_compile.quantize(model, calibration, **options)``: sequential GPTQ, linears replaced by ``GPTQLinear``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import OptGPTQConfig, parse_options
from ..log import log
from .format import GPTQWeight, default_g_idx, num_groups, pack_weight
from .gptq import GPTQSettings, group_params
from .modules import GPTQLinear
from .rtn import quantize_rtn
from .sequential import gptq_sequential

QUANT_ATTR = "optgptq_quantization"  # model attribute: the settings save_quantized writes to quantization_config


def gptq_settings(config: OptGPTQConfig) -> GPTQSettings:
    return GPTQSettings(bits=config.bits, group_size=config.group_size, sym=config.sym, act_order=config.act_order,
                        static_groups=config.static_groups, damp_percent=config.damp_percent,
                        clip_search=config.clip_search)


def quantize_data_free(weight: torch.Tensor, config: OptGPTQConfig) -> GPTQWeight:
    """Round-to-nearest without calibration data; ranges from the clipping search when ``clip_search``."""
    if not config.clip_search:
        return quantize_rtn(weight, config.bits, config.group_size, config.sym)
    n, k = weight.shape
    size = k if config.group_size == -1 else config.group_size
    scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
    groups = num_groups(k, config.group_size)
    scales = torch.empty(groups, n, device=weight.device)  # [G, N]
    zeros = torch.empty(groups, n, device=weight.device)  # [G, N]
    intweight = torch.empty(n, k, dtype=torch.int32, device=weight.device)  # [N, K]
    for g in range(groups):
        cols = slice(g * size, min((g + 1) * size, k))
        w = weight[:, cols].float()
        scales[g], zeros[g] = group_params(w, config.bits, config.sym, True, None, scale_dtype)
        q = torch.round(w / scales[g][:, None]) + zeros[g][:, None]
        intweight[:, cols] = q.clamp(0, 2**config.bits - 1).to(torch.int32)
    g_idx = default_g_idx(k, config.group_size, weight.device)
    return pack_weight(intweight, zeros, scales.to(scale_dtype), g_idx, config.bits, config.group_size)


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
