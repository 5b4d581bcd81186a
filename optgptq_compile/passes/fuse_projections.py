"""Fuse sibling ``gptq_linear`` calls on one input (q/k/v, gate/up) into one call over weights concatenated along N.

At decode (M = 1) every ``gptq_linear`` is a GEMV launch with fixed costs (a zeroed split-K buffer, a cast, a tail
of under-filled SMs); a Llama layer's 7 become 4, each wider (vLLM's QKVParallelLinear and
MergedColumnParallelLinear). Siblings fuse when they share the input node, bits, group size, bias-ness and
``g_idx`` (the act-order sort permutes ``x`` per call, so differently ordered weights cannot share one). The fused
tensors come from ``quant.cache.fuse``: built once per group of parameters and shared by every graph of the model,
whose per-parameter entries become views of them, so the model's quantized bytes do not grow.

The output is split back with ``aten.split_with_sizes`` (views: no copy in eager or in Inductor). A column slice is
not contiguous, so a ``view`` reached from it through view ops becomes ``reshape``: the same view wherever the
original view was possible on the slice, and a copy where it was not (e.g. a view merging the last dimension).
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from .. import stats
from ..context import PassContext
from ..quant import cache
from ..quant.format import GPTQWeight
from .quantize_linear import WEIGHT_META
from .utils import _is_impure, add_constant, finish_pass

NAME = "fuse_projections"
GPTQ = torch.ops.optgptq.gptq_linear.default
ARG_NAMES = ("x", "qweight", "qzeros", "scales", "g_idx", "bias", "bits", "group_size")
WEIGHT_NAMES = ("qweight", "qzeros", "scales", "g_idx")

# Ops whose result may alias their input's memory: a ``view`` after a chain of these still sees a column slice.
VIEW_METHODS = {"view", "view_as", "transpose", "permute", "unsqueeze", "squeeze", "expand", "expand_as", "narrow",
                "t", "__getitem__", "unflatten", "split", "chunk", "unbind", "select", "movedim", "swapaxes",
                "diagonal", "reshape", "flatten", "contiguous"}
VIEW_FUNCTIONS = {operator.getitem, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.narrow,
                  torch.split, torch.chunk, torch.unbind, torch.select, torch.movedim, torch.reshape, torch.flatten,
                  torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.transpose.int,
                  torch.ops.aten.permute.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.slice.Tensor,
                  torch.ops.aten.select.int, torch.ops.aten.expand.default, torch.ops.aten.split_with_sizes.default}


def _args(node: fx.Node) -> dict:
    """A gptq_linear call's arguments by name, whether passed positionally or by keyword."""
    return {**dict(zip(ARG_NAMES, node.args)), **node.kwargs}


def _constant(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = operator.attrgetter(arg.target)(gm)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _weight_param(ctx: PassContext, node: fx.Node) -> torch.nn.Parameter | None:
    """The ``nn.Parameter`` a gptq_linear made by quantize_linear quantizes (its placeholder's name is in the meta)."""
    value = ctx.placeholder_values.get(node.meta.get(WEIGHT_META))
    return value if isinstance(value, torch.nn.Parameter) else None


def _module_name(fqn: str) -> str:
    parts = fqn.split(".")
    return parts[-2] if len(parts) >= 2 else fqn  # model.layers.0.mlp.up_proj.weight -> up_proj


def _weight(gm: fx.GraphModule, node: fx.Node) -> GPTQWeight:
    a = _args(node)
    return GPTQWeight(*(_constant(gm, a[name]) for name in WEIGHT_NAMES), bits=a["bits"], group_size=a["group_size"])


def _why_not(gm: fx.GraphModule, ctx: PassContext, node: fx.Node) -> str | None:
    """Why this call cannot join any fused group, or None."""
    a = _args(node)
    if any(_constant(gm, a[name]) is None for name in WEIGHT_NAMES):
        return "weights are graph inputs, not constants (e.g. a loaded checkpoint's buffers): nothing to concatenate"
    if _weight_param(ctx, node) is None:
        return "not made by quantize_linear: no parameter to cache the fused weights under"
    n = _constant(gm, a["scales"]).shape[-1]
    if (n * a["bits"]) % 32:
        return f"out_features={n} at {a['bits']} bits does not fill whole int32 words of qzeros (packed along N)"
    bias = a.get("bias")
    if bias is not None and ctx.parameter(bias) is None:
        return "bias is not a model parameter (computed in the graph)"
    return None


def _difference(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, other: fx.Node) -> str | None:
    """What keeps ``node`` and ``other`` (both eligible) out of one call, or None if they can share it."""
    a, b = _args(node), _args(other)
    if (a["bits"], a["group_size"]) != (b["bits"], b["group_size"]):
        return f"{a['bits']}-bit g{a['group_size']} while a sibling is {b['bits']}-bit g{b['group_size']}"
    if (a.get("bias") is None) != (b.get("bias") is None):
        return "a bias on some of the projections only"
    sa, sb = _constant(gm, a["scales"]), _constant(gm, b["scales"])
    if (sa.dtype, sa.device) != (sb.dtype, sb.device):
        return f"scales {sa.dtype} on {sa.device} while a sibling's are {sb.dtype} on {sb.device}"
    if a.get("bias") is not None and ctx.parameter(a["bias"]).dtype != ctx.parameter(b["bias"]).dtype:
        return "biases of different dtypes"
    ga, gb = _constant(gm, a["g_idx"]), _constant(gm, b["g_idx"])
    if ga is not gb and not torch.equal(ga, gb):
        return "different g_idx (act-order ordered their input channels differently; the sort permutes x per call)"
    if node.meta[WEIGHT_META] == other.meta[WEIGHT_META]:
        return "the same weight twice"
    return None


def _classes(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """Partition ``nodes`` into groups that can share one call (g_idx compared once per pair of representatives)."""
    classes: list[list[fx.Node]] = []
    for node in nodes:
        for group in classes:
            if _difference(gm, ctx, node, group[0]) is None:
                group.append(node)
                break
        else:
            classes.append([node])
    return classes


def _fake_values(first: fx.Node, sizes: list[int]):
    """Example values for the fused call and its pieces, from ``first``'s (shape and dtype for later passes)."""
    for key in ("val", "example_value"):
        val = first.meta.get(key)
        if isinstance(val, torch.Tensor):
            whole = val.new_empty(*val.shape[:-1], sum(sizes))
            return key, whole, list(torch.split(whole, sizes, dim=-1))
    return None, None, None


def _views_to_reshape(start: fx.Node) -> None:
    """Turn every ``view`` reachable from ``start`` through view ops into ``reshape`` (see the module docstring)."""
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            is_method = user.op == "call_method" and user.target in VIEW_METHODS
            if not (is_method or (user.op == "call_function" and user.target in VIEW_FUNCTIONS)):
                continue
            has_dtype = any(isinstance(a, torch.dtype) for a in (*user.args, *user.kwargs.values()))
            if user.op == "call_method" and user.target in ("view", "view_as") and not has_dtype:
                user.target = "reshape" if user.target == "view" else "reshape_as"
            elif user.target is torch.ops.aten.view.default:
                user.target = torch.ops.aten.reshape.default
            stack.append(user)


def _fuse(gm: fx.GraphModule, ctx: PassContext, group: list[fx.Node]) -> fx.Node:
    """Replace ``group`` (in graph order) by one gptq_linear and a split; returns the new call."""
    first, a = group[0], _args(group[0])
    params = [_weight_param(ctx, n) for n in group]
    parts = [_weight(gm, n) for n in group]
    fused = cache.fuse(params, ctx.config.quant_key(), parts)
    biases = [ctx.parameter(_args(n)["bias"]) for n in group] if a.get("bias") is not None else None
    fqns = [ctx.placeholder_fqns.get(n.meta[WEIGHT_META], n.meta[WEIGHT_META]) for n in group]
    hint = fqns[0].rsplit(".", 1)[0] + "+" + "+".join(_module_name(f) for f in fqns[1:])  # ...q_proj+k_proj+v_proj
    sizes = [p.out_features for p in parts]
    with gm.graph.inserting_before(first):
        tensors = [add_constant(gm, f"{hint}.{name}", t) for name, t in fused.tensors().items()]
        bias = add_constant(gm, f"{hint}.bias", cache.fused_bias(biases)) if biases else None
        call = gm.graph.call_function(GPTQ, (a["x"], *tensors, bias, fused.bits, fused.group_size))
    with gm.graph.inserting_after(call):
        split = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (call, sizes, -1))
    key, whole, pieces = _fake_values(first, sizes)
    for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if k in first.meta:
            call.meta[k] = split.meta[k] = first.meta[k]
    if key is not None:
        call.meta[key], split.meta[key] = whole, tuple(pieces)
    previous = split
    for i, node in enumerate(group):
        with gm.graph.inserting_after(previous):
            piece = gm.graph.call_function(operator.getitem, (split, i))
        piece.meta.update({k: v for k, v in node.meta.items() if k != WEIGHT_META})
        if key is not None:
            piece.meta[key] = pieces[i]
        node.replace_all_uses_with(piece)
        old_constants = [arg for arg in node.all_input_nodes if arg.op == "get_attr"]
        gm.graph.erase_node(node)
        for constant in old_constants:
            if not constant.users:  # erase it here, without its tensor: the graph's namespace keeps erased nodes
                constant.meta.pop("val", None)
                gm.graph.erase_node(constant)
        _views_to_reshape(piece)
        previous = piece
    ctx.matched(NAME, call, f"{' + '.join(fqns)}: {len(group)} projections -> one gptq_linear "
                            f"[{fused.out_features}x{fused.in_features}]")
    stats.bump("projections_fused", len(group))
    return call


def _mutation_between(group: list[fx.Node], order: dict[fx.Node, int], nodes: list[fx.Node]) -> bool:
    """An in-place op between the first and the last call: moving the later calls up could change what they read."""
    lo, hi = order[group[0]], order[group[-1]]
    return any(_is_impure(n) for n in nodes[lo + 1:hi] if n.op in ("call_function", "call_method"))


def _contiguous_weights(gm: fx.GraphModule) -> bool:
    """Copy any column-slice view a gptq_linear still uses into a contiguous tensor (kernels assume contiguous
    weights). Only happens when a graph leaves unfused a weight that an earlier graph fused (fusion turned off, or
    a different grouping): the cache then hands out views of the fused tensors."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not GPTQ:
            continue
        a = _args(node)
        for name in WEIGHT_NAMES:
            value = _constant(gm, a[name])
            if value is not None and not value.is_contiguous():
                setattr(gm, a[name].target, value.contiguous())
                a[name].meta["val"] = getattr(gm, a[name].target)
                changed = True
    return changed


def _drop_unused_constants(gm: fx.GraphModule) -> None:
    """Delete our buffers that no get_attr reads any more (the members' separate weights), so they can be freed."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [b for b in gm._buffers if b.startswith("_optgptq_") and b not in used]:
        delattr(gm, name)


def fuse_projections(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Replace groups of gptq_linear calls on one input by one call over their concatenated weights plus a split."""
    if not ctx.config.fuse_projections:
        return _contiguous_weights(gm)
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_input: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        if node.op == "call_function" and node.target is GPTQ and isinstance(_args(node)["x"], fx.Node):
            by_input[_args(node)["x"]].append(node)
    changed = False
    for siblings in by_input.values():
        if len(siblings) < 2:
            continue
        eligible = []
        for node in siblings:
            reason = _why_not(gm, ctx, node)
            if reason:
                ctx.skipped(NAME, node, f"not fused with its siblings: {reason}")
            else:
                eligible.append(node)
        classes = sorted(_classes(gm, ctx, eligible), key=len, reverse=True)
        for group in classes:  # reasons first: fusing erases the nodes they compare against
            if len(group) == 1:
                other = next((g[0] for g in classes if g is not group), None)
                reason = _difference(gm, ctx, group[0], other) if other is not None else "its siblings are skipped"
            elif _mutation_between(group, order, nodes):
                reason = "an in-place op runs between these projections of one input"
            else:
                continue
            for node in group:
                ctx.skipped(NAME, node, f"not fused with its siblings: {reason}")
        for group in classes:
            if len(group) >= 2 and not _mutation_between(group, order, nodes):
                _fuse(gm, ctx, group)
                changed = True
    changed |= _contiguous_weights(gm)
    if changed:
        finish_pass(gm, NAME)
        _drop_unused_constants(gm)
    return changed
