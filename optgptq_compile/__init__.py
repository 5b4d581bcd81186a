"""optgptq_compile: a torch.compile backend for HF causal LMs with GPTQ linears, GQA/ALiBi attention, paged KV.

    import torch, optgptq_compile
    model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": 4})

Importing the package registers the ``"optgptq"`` backend and the ``optgptq::*`` custom ops.
"""

from __future__ import annotations

from . import lowering  # noqa: F401  (registers the custom ops)
from .backend import optgptq_backend, register
from .config import OptGPTQConfig, parse_options
from .stats import reset_stats, stats

register()

# Public functions whose modules are heavy or optional are imported on first use.
_LAZY = {
    "quantize": "optgptq_compile.quant.api",
    "save_quantized": "optgptq_compile.quant.checkpoint",
    "load_quantized": "optgptq_compile.quant.checkpoint",
    "generate": "optgptq_compile.runtime.generate",
    "perplexity": "optgptq_compile.eval",
    "export_mlir": "optgptq_compile.mlir",
    "convert_gqa": "optgptq_compile.gqa",
    "weight_bytes": "optgptq_compile.memory",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optgptq_compile' has no attribute {name!r}")


__all__ = ["OptGPTQConfig", "optgptq_backend", "parse_options", "reset_stats", "stats", *_LAZY]
__version__ = "0.1.0"
