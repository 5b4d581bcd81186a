"""Helpers every pass shares: a node's example value, the mul targets, adding constants to a graph and the common
ending of a mutating pass."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..log import log


def _is_impure(node: fx.Node) -> bool:
    """FX treats every ``call_method`` as pure; an in-place method (``x.copy_(y)``, ``cache.index_put_``) is not."""
    if node.op in ("call_method", "call_function"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
    return node.is_impure()


MUL = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}  # a * b as Dynamo or aten records it


def node_value(node) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo or an earlier pass recorded for ``node`` (None for anything else)."""
    for key in ("example_value", "val"):
        value = node.meta.get(key) if isinstance(node, fx.Node) else None
        if isinstance(value, torch.Tensor):
            return value
    return None


def add_constant(gm: fx.GraphModule, name_hint: str, value: torch.Tensor) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` (a unique name from ``name_hint``) and return a ``get_attr`` node.

    The caller sets the insertion point. Buffers, not parameters: they must not require grad or be trained.
    """
    base = "_optgptq_" + "".join(c if c.isalnum() else "_" for c in name_hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value)
    node = gm.graph.get_attr(name)
    node.meta["val"] = value  # so later passes and Inductor see shape and dtype without running the graph
    return node


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new`` and carry the metadata (stack trace, example value) over."""
    for key, value in old.meta.items():
        new.meta.setdefault(key, value)
    old.replace_all_uses_with(new)


def finish_pass(gm: fx.GraphModule, pass_name: str) -> None:
    """How every mutating pass ends: dead-code elimination, lint, recompile, and the graph at debug level."""
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    log.debug("graph after %s:\n%s", pass_name, gm.code)
