"""Rewrite ``linear(x, W, b)`` on a model weight into ``optgptq::gptq_linear`` over packed GPTQ tensors."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..context import PassContext
from ..quant import cache
from ..quant.api import quantize_data_free
from .utils import add_constant, finish_pass, replace_node

NAME = "quantize_linear"
WEIGHT_META = "optgptq_weight"  # node.meta key on each gptq_linear this pass adds: the weight placeholder's name

LINEAR_TARGETS = (torch._C._nn.linear, torch.ops.aten.linear.default)

# Output heads stay dense: they are tied to the input embedding in many models, and quantizing the logits layer
# costs far more quality per byte than any other layer (GPTQ/AutoGPTQ leave it dense for the same reason).
DENSE_MODULES = ("lm_head", "embed_out", "output_layer")


def _linear_args(node: fx.Node) -> tuple:
    """(x, weight, bias) of a linear call, whether passed positionally or by keyword."""
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return x, weight, bias


def _why_not(node: fx.Node, weight: fx.Node, param, ctx: PassContext) -> str | None:
    """The reason this linear is left dense, or None if it can be quantized."""
    bits = ctx.config.bits
    if param is None:
        return "weight is not a model parameter (computed in the graph or a plain tensor input)"
    fqn = ctx.placeholder_fqns.get(weight.name, weight.name)
    module_name = fqn.rsplit(".", 2)[-2] if fqn.count(".") else fqn
    if module_name in DENSE_MODULES:
        return f"{fqn}: output head stays dense by design"
    if param.dim() != 2 or not param.is_floating_point():
        return f"{fqn}: weight is {param.dim()}-D {param.dtype}, expected a 2-D floating-point matrix"
    others = [u for u in weight.users if u.target not in LINEAR_TARGETS or _linear_args(u)[1] is not weight]
    if others:
        return f"{fqn}: weight is also used by {others[0].target} (tied weights stay dense)"
    n, k = param.shape
    if (k * bits) % 32:
        return f"{fqn}: in_features={k} cannot be packed at {bits} bits (needs K*bits divisible by 32)"
    return None


def quantize_linear(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Replace eligible ``linear`` calls by ``gptq_linear`` over cached, packed GPTQ tensors."""
    config = ctx.config
    if config.bits is None:
        return False
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        x, weight, bias = _linear_args(node)
        param = ctx.parameter(weight)
        reason = _why_not(node, weight, param, ctx)
        if reason:
            ctx.skipped(NAME, node, reason)
            continue
        fqn = ctx.placeholder_fqns.get(weight.name, weight.name)
        # GPTQ results are already cached when the model was calibrated (calibrate_gptq); the rest is data-free
        qw = cache.get_or_quantize(param, config.quant_key(), lambda w: quantize_data_free(w, config))
        qw = qw.to(param.device)
        with gm.graph.inserting_before(node):
            tensors = [add_constant(gm, f"{fqn}.{name}", t) for name, t in qw.tensors().items()]
            new = gm.graph.call_function(
                torch.ops.optgptq.gptq_linear.default, (x, *tensors, bias, qw.bits, qw.group_size)
            )
        new.meta[WEIGHT_META] = weight.name  # the weight's placeholder: fuse_projections caches under its Parameter
        replace_node(node, new)
        gm.graph.erase_node(node)
        ctx.matched(NAME, new, f"{fqn}: {qw.bits}-bit g{qw.group_size} [{qw.out_features}x{qw.in_features}]",
                    counter="linear_rewritten")
        ctx.dense_to_release.append(param)  # freed by the backend once the whole pipeline has succeeded
        changed = True
    if changed:
        finish_pass(gm, NAME)
    return changed
