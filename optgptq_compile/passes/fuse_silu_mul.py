"""Fold a gated MLP's ``silu(gate) * up`` into the fused gate/up call: ``gptq_linear_fused(..., act="silu_mul")``.

After ``fuse_projections`` a Llama MLP's gate_proj and up_proj are one call over [gate | up] columns, split back
into halves for HF's ``act_fn(gate) * up``. That product is one more elementwise kernel and launch per decoder layer
at decode (~1.6 us of a ~78 us Llama-7B layer at batch 1 on the H100), reading and writing vectors the GEMV just
had in registers; the GEMV's epilogue can compute it instead and write N / 2 features.

Matched form (Dynamo's torch-level graph after ``fuse_projections`` and ``fuse_norm_residual``)::

    C = gptq_linear(...) | gptq_linear_fused(..., residual=None, act="none")
    parts = aten.split_with_sizes(C, [I, I], -1)   (also C.split(I, -1), C.chunk(2, -1): what a model's own
    out = F.silu(parts[0]) * parts[1]                fused gate_up_proj emits), either operand order of the mul

where C, the split, both halves and the silu have no other user. The call becomes gptq_linear_fused (norm weight
and eps kept from a fused call, none for a plain gptq_linear) with ``act="silu_mul"``, and ``out``'s users read it.
Left alone: BLOOM's gelu and any other activation, gate and up as separate calls (``fuse_projections`` off or
the siblings could not fuse), a call with a residual folded in, halves used elsewhere, [up | gate] order; a silu
times something on a gptq call's output that is left alone is reported with its reason.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..context import PassContext
from .fuse_norm_residual import FUSED, FUSED_ARGS, GPTQ, LINEAR_ARGS
from .utils import MUL as _MUL
from .utils import finish_pass
from .utils import node_value as _val

NAME = "fuse_silu_mul"

_SILU = {torch.nn.functional.silu, torch.ops.aten.silu.default}
_SPLIT_FUNCTIONS = {torch.ops.aten.split_with_sizes.default: "split", torch.ops.aten.split.Tensor: "split",
                    torch.split: "split", torch.chunk: "chunk", torch.ops.aten.chunk.default: "chunk"}


def _is_call(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (GPTQ, FUSED)


def _call_args(node: fx.Node) -> dict:
    """A gptq_linear / gptq_linear_fused call's arguments by name (positional or keyword), fused defaults filled."""
    names = LINEAR_ARGS if node.target is GPTQ else FUSED_ARGS
    a = {"norm_weight": None, "eps": 0.0, "bias": None, "residual": None, "act": "none"}
    a.update(zip(names, node.args))
    if node.target is FUSED and len(node.args) > len(FUSED_ARGS):
        a["act"] = node.args[len(FUSED_ARGS)]
    a.update(node.kwargs)
    return a


def _silu_input(node: fx.Node) -> fx.Node | None:
    """x if ``node`` is ``silu(x)`` (in place or not: with no other reader of x the two are the same), else None."""
    if node.op != "call_function" or node.target not in _SILU or not node.args:
        return None
    if set(node.kwargs) - {"inplace"} or len(node.args) > 2:
        return None
    x = node.args[0]
    return x if isinstance(x, fx.Node) else None


def _is_mul(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "mul" and len(node.args) == 2 and not node.kwargs
    return node.op == "call_function" and node.target in _MUL and len(node.args) == 2 and not node.kwargs


def _split_kind(node) -> str | None:
    """"split" or "chunk" if ``node`` splits a tensor into a tuple of pieces, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in ("split", "split_with_sizes", "chunk"):
        return "chunk" if node.target == "chunk" else "split"
    if node.op == "call_function":
        return _SPLIT_FUNCTIONS.get(node.target)
    return None


def _piece(node) -> tuple[fx.Node, fx.Node, int] | None:
    """(gptq call, split, index) if ``node`` is ``split(call, ...)[index]``, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    split, index = node.args
    if _split_kind(split) is None or not split.args or not isinstance(index, int) or not _is_call(split.args[0]):
        return None
    return split.args[0], split, index


def _split_spec(split: fx.Node) -> tuple:
    """(sizes or chunks, dim) of a split / chunk node, keyword or positional."""
    names = ("self", "chunks", "dim") if _split_kind(split) == "chunk" else ("self", "split_size", "dim")
    a = {"dim": 0, **dict(zip(names, split.args)), **split.kwargs}
    sizes = a.get("chunks", a.get("split_size", a.get("split_sizes", a.get("split_size_or_sections"))))
    return sizes, a["dim"]


def _halves(split: fx.Node, n: int, ndim: int) -> str | None:
    """Why ``split`` is not [N/2, N/2] along the last dim of an [..., n] tensor, or None if it is."""
    sizes, dim = _split_spec(split)
    if dim not in (-1, ndim - 1):
        return f"the split is along dim {dim}, not the last (the call's output features)"
    if _split_kind(split) == "chunk":
        ok = sizes == 2 and n % 2 == 0
    elif isinstance(sizes, int):
        ok = 2 * sizes == n
    else:
        ok = isinstance(sizes, (list, tuple)) and len(sizes) == 2 and sizes[0] == sizes[1] and 2 * sizes[0] == n
    return None if ok else f"the split {sizes} is not two equal halves of the call's {n} columns"


def _why_not(silu: fx.Node, mul: fx.Node) -> str | None:
    """Why ``mul(silu(gate), up)`` cannot become the gate call's epilogue, or None if it can."""
    gate = _silu_input(silu)
    up = mul.args[1] if mul.args[0] is silu else mul.args[0]
    if up is silu:
        return "silu(gate) * silu(gate): there is no up projection"
    if len(silu.users) != 1:
        return f"the silu output has other users ({', '.join(u.name for u in silu.users if u is not mul)})"
    piece = _piece(gate)
    if piece is None:  # silu of a whole call's output
        if _is_call(up) or _piece(up) is not None:
            return ("gate and up are separate gptq calls (fuse_projections is off, or it could not fuse them: see "
                    "its report); the epilogue needs both in one call's columns")
        return "the gate is a whole gptq output and the up operand is not a gptq output"
    call, split, index = piece
    up_piece = _piece(up)
    if up_piece is None or up_piece[1] is not split:
        return "the up operand is not the other half of the gate's gptq call"
    if index != 0 or up_piece[2] != 1:
        return f"gate is piece {index} and up piece {up_piece[2]}: the op takes the gate from the first half"
    a = _call_args(call)
    if a["residual"] is not None:
        return "the gate/up call has a residual folded in"
    if a["act"] != "none":
        return f"the gate/up call already has act={a['act']!r}"
    cv = _val(call)
    if cv is None:
        return "no example value of the call to check the split against its columns"
    n = cv.shape[-1]
    if not isinstance(n, int):
        return f"the call's output features {n} are not static"
    reason = _halves(split, n, cv.dim())
    if reason:
        return reason
    for node, only in ((call, split), (gate, silu), (up, mul)):
        if set(node.users) != {only}:
            others = ", ".join(u.name for u in node.users if u is not only)
            return f"{node.name} has other users ({others}): it must stay in the graph"
    if set(split.users) != {gate, up}:
        return f"the split's pieces have other users ({', '.join(u.name for u in split.users)})"
    return None


def _rewrite(gm: fx.GraphModule, ctx: PassContext, silu: fx.Node, mul: fx.Node) -> fx.Node:
    """Replace call -> split -> silu * up by one gptq_linear_fused(..., act="silu_mul"); returns the new call."""
    gate = _silu_input(silu)
    up = mul.args[1] if mul.args[0] is silu else mul.args[0]
    call, split, _ = _piece(gate)
    a = _call_args(call)
    with gm.graph.inserting_before(call):
        new = gm.graph.call_function(FUSED, (a["x"], a["norm_weight"], a["eps"], a["qweight"], a["qzeros"],
                                             a["scales"], a["g_idx"], a["bias"], None, a["bits"], a["group_size"]),
                                     {"act": "silu_mul"})
    new.meta.update(call.meta)
    for key in ("example_value", "val"):  # what the fake op returns: [..., N / 2] in the call's dtype
        value = call.meta.get(key)
        if isinstance(value, torch.Tensor):
            new.meta[key] = value.new_empty(*value.shape[:-1], value.shape[-1] // 2)
    mul.replace_all_uses_with(new)
    for node in (mul, silu, gate, up, split, call):  # users before what they use
        gm.graph.erase_node(node)
    ctx.matched(NAME, new, f"silu(gate) * up ({mul.name}) folded into the gate/up linear", counter="silu_mul_fused")
    return new


def fuse_silu_mul(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Rewrite each ``silu(C[:I]) * C[I:]`` of a fused gate/up gptq call C into the call with act="silu_mul"."""
    if not ctx.config.fuse_silu_mul:
        return False
    changed = False
    for silu in [n for n in gm.graph.nodes if _silu_input(n) is not None]:
        gate = _silu_input(silu)
        muls = [u for u in silu.users if _is_mul(u)]
        if not muls or not (_is_call(gate) or _piece(gate) is not None):
            continue  # no silu * something on a gptq output: not a candidate (BLOOM's gelu never gets here)
        reason = _why_not(silu, muls[0])
        if reason:
            ctx.skipped(NAME, muls[0], f"silu * up not folded into the linear: {reason}")
            continue
        _rewrite(gm, ctx, silu, muls[0])
        changed = True
    if changed:
        finish_pass(gm, NAME)
    return changed
