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

# base op overload -> {"triton": the Triton-kernel op overload with the same schema}
KERNEL_VARIANTS: dict = {}


def use_triton(ctx: PassContext) -> bool:
    """Triton on CUDA/ROCm devices for kernels="auto"; "triton" forces it (the interpreter runs it on a CPU)."""
    choice = ctx.config.kernels
    if choice == "reference":
        return False
    if choice == "triton":
        return True
    return ctx.device().type == "cuda"  # ROCm builds of torch report "cuda" too


def select_kernels(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Point each custom-op call at its Triton variant when kernels are wanted and one is registered."""
    if not use_triton(ctx):
        return False
    changed = False
    for node in gm.graph.nodes:
        variant = KERNEL_VARIANTS.get(node.target, {}).get("triton")
        if node.op == "call_function" and variant is not None:
            node.target = variant
            changed = True
    if changed:
        gm.recompile()
    return changed
