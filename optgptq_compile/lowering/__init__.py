"""Custom ops (reference + fake implementations) and the choice of kernel for each op in a finished graph.

Every op ``optgptq::<op>`` is defined with its plain-PyTorch reference; GPU kernels are registered as separate ops
in ``KERNEL_VARIANTS`` (filled by the Triton modules when triton can run) and swapped in by ``select_kernels``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..context import PassContext
from . import gptq_linear  # noqa: F401  (registers optgptq::gptq_linear)
from . import attention  # noqa: F401  (registers optgptq::attention)
from . import paged_attention  # noqa: F401  (registers optgptq::kv_write, paged_attention, kv_gather)
from . import rope_kv_write  # noqa: F401  (registers optgptq::rope_kv_write)
from . import rope_paged_attention  # noqa: F401  (registers optgptq::rope_paged_attention)

# base op overload -> {"triton": the Triton-kernel op overload with the same schema,
#                       "prepare": optional fn(gm, node) run on the real graph before the swap (e.g. act-order sort)}
KERNEL_VARIANTS: dict = {}

# Triton kernel modules: each defines VARIANTS (base op -> its kernel entry) and aot_specs() (ahead-of-time compile
# specs, tests/lowering/test_aot_compile.py). Add a new kernel module here.
TRITON_MODULES = ("triton_gptq_linear", "triton_attention", "triton_paged_attention", "triton_rope_kv_write",
                  "triton_rope_paged_attention", "triton_argmax")

try:  # the Triton kernels register only where triton imports; the package must import without it (or a GPU)
    import triton  # noqa: F401
except ImportError as _exc:  # pragma: no cover - triton is a dependency, but keep the CPU path alive without it
    TRITON_IMPORT_ERROR: Exception | None = _exc
else:
    TRITON_IMPORT_ERROR = None
    import importlib

    for _name in TRITON_MODULES:
        KERNEL_VARIANTS.update(importlib.import_module(f"{__name__}.{_name}").VARIANTS)


def triton_runnable(device: torch.device) -> bool:
    """Triton kernels can run here: triton imported and a CUDA/ROCm device (or the interpreter for CPU tensors)."""
    import os

    if TRITON_IMPORT_ERROR is not None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(ctx: PassContext) -> bool:
    """Triton on CUDA/ROCm devices for kernels="auto"; "triton" forces it (the interpreter runs it on a CPU)."""
    choice = ctx.config.kernels
    if choice == "reference":
        return False
    if choice == "triton":
        if not triton_runnable(ctx.device()):
            why = f"triton failed to import: {TRITON_IMPORT_ERROR}" if TRITON_IMPORT_ERROR else (
                "no CUDA/ROCm device; TRITON_INTERPRET=1 runs them on a CPU, slowly")
            raise ValueError(f"options kernels='triton': Triton kernels cannot run on {ctx.device()} ({why}); "
                             "use kernels='auto' or 'reference'")
        return True
    return ctx.device().type == "cuda"  # ROCm builds of torch report "cuda" too


def select_kernels(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Point each custom-op call at its Triton variant when kernels are wanted and one is registered."""
    if not use_triton(ctx):
        return False
    changed = False
    for node in list(gm.graph.nodes):  # prepare() may insert nodes
        entry = KERNEL_VARIANTS.get(node.target, {}) if node.op == "call_function" else {}
        if entry.get("triton") is not None:
            if entry.get("prepare") is not None:
                entry["prepare"](gm, node)
            node.target = entry["triton"]
            changed = True
    if changed:
        gm.recompile()
    return changed
