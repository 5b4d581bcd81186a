"""Fold the RMSNorm before a ``gptq_linear`` and the residual add after it into the call:
``optgptq::gptq_linear_fused(x, norm_weight, eps, ..., residual)``.

A Llama decoder layer at decode is four GEMVs and, between them, two "residual add + RMSNorm" kernels that Inductor
makes of ``h = residual + o_proj(...)`` and ``norm(h)``: each ~3 us of a 4096-vector's latency on the H100 plus a
launch (benchmarks/profile_decode.py --cuda-graphs). The GEMV can do both: the residual is one more load in its
epilogue, and RMSNorm(x) @ W = rsqrt(mean(x**2) + eps) * ((x * w) @ W), where the sum of x**2 is summed over K with
the GEMV's own splits (``triton_gptq_gemv_kernel.py``). So o_proj / down_proj take the residual, and the q/k/v and
gate/up projections take the norm of their input.

Matched forms (Dynamo's torch-level graph of HF Llama / Mistral / Qwen2 ``*RMSNorm``):
``w * (x.to(f32) * rsqrt(x.to(f32).pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)`` feeding a call's x, with w
a [K] parameter of x's dtype; and ``a + b`` where one side is a call with no other user and the other has exactly
the call's shape and dtype. Anything else stays as it was (BLOOM's LayerNorm, a norm whose weight is not a
parameter, a broadcasting add); an add of a call's output that cannot take it is reported with its reason.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from ..context import PassContext
from .utils import finish_pass
from .utils import node_value as _val

NAME = "fuse_norm_residual"
GPTQ = torch.ops.optgptq.gptq_linear.default
FUSED = torch.ops.optgptq.gptq_linear_fused.default
LINEAR_ARGS = ("x", "qweight", "qzeros", "scales", "g_idx", "bias", "bits", "group_size")
FUSED_ARGS = ("x", "norm_weight", "eps", "qweight", "qzeros", "scales", "g_idx", "bias", "residual", "bits",
              "group_size")

_FUNCTIONS = {operator.mul: "mul", torch.mul: "mul", operator.add: "add", torch.add: "add", torch.rsqrt: "rsqrt",
              torch.pow: "pow", operator.pow: "pow", torch.mean: "mean"}


def _kind(node) -> str | None:
    """The op a torch-level call node performs, one name for its method and function forms."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    return None


def _strip_cast(node):
    """``x.to(dtype)`` / ``x.float()`` -> x; anything else unchanged."""
    if _kind(node) == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) and not node.kwargs:
        return node.args[0]
    if _kind(node) == "to" and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
        return node.args[0]
    if _kind(node) == "float" and len(node.args) == 1:
        return node.args[0]
    return node


def _mean_square_eps(r, h) -> float | None:
    """eps if ``r`` is ``rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)``, else None."""
    if _kind(r) != "rsqrt" or len(r.args) != 1:
        return None
    a = r.args[0]
    if _kind(a) != "add" or len(a.args) != 2 or a.kwargs:
        return None
    var, eps = a.args if isinstance(a.args[1], (int, float)) else a.args[::-1]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or _kind(var) != "mean":
        return None
    dims = var.args[1] if len(var.args) > 1 else var.kwargs.get("dim")
    keepdim = var.args[2] if len(var.args) > 2 else var.kwargs.get("keepdim", False)
    hv = _val(h)
    last = {-1, hv.dim() - 1} if hv is not None else {-1}
    if isinstance(dims, (list, tuple)) and len(dims) == 1:
        dims = dims[0]
    if dims not in last or keepdim is not True:
        return None
    p = var.args[0]
    if _kind(p) != "pow" or len(p.args) != 2 or p.args[0] is not h or p.args[1] not in (2, 2.0):
        return None
    return float(eps)


def match_rms_norm(ctx: PassContext, y) -> tuple[fx.Node, fx.Node, float] | None:
    """(x, weight placeholder, eps) if ``y`` is HF's RMSNorm of x (module docstring), else None."""
    if _kind(y) != "mul" or len(y.args) != 2 or y.kwargs:
        return None
    for w, t in (y.args, y.args[::-1]):
        weight = ctx.parameter(w)
        normed = _strip_cast(t)
        if weight is None or weight.dim() != 1 or _kind(normed) != "mul" or len(normed.args) != 2:
            continue
        for h32, r in (normed.args, normed.args[::-1]):
            eps = _mean_square_eps(r, h32)
            if eps is None:
                continue
            x = _strip_cast(h32)
            xv, yv, tv = _val(x), _val(y), _val(t)
            if xv is None or yv is None or tv is None:
                return None
            # the normalized x is cast back to x's dtype before the weight, which is x's dtype too
            if not (weight.dtype == xv.dtype == yv.dtype == tv.dtype and weight.shape[0] == xv.shape[-1]):
                return None
            return x, w, eps
    return None


def _as_fused(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``node`` itself if it is a gptq_linear_fused call, else a new one with the same linear (no norm, residual)."""
    if node.target is FUSED:
        return node
    a = {**dict(zip(LINEAR_ARGS, node.args)), **node.kwargs}
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(FUSED, (a["x"], None, 0.0, a["qweight"], a["qzeros"], a["scales"],
                                               a["g_idx"], a.get("bias"), None, a["bits"], a["group_size"]))
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    gm.graph.erase_node(node)
    return fused


def _set_arg(node: fx.Node, name: str, value) -> None:
    args = list(node.args)
    args[FUSED_ARGS.index(name)] = value
    node.args = tuple(args)


def _residual_of(ctx: PassContext, call: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(the add, the residual) if the call's only user adds a tensor of exactly its shape and dtype to it."""
    if len(call.users) != 1:
        return None
    (add,) = call.users
    if _kind(add) != "add" or len(add.args) != 2 or add.kwargs or add.args[0] is add.args[1]:
        return None
    other = add.args[1] if add.args[0] is call else add.args[0]
    if not isinstance(other, fx.Node):
        return None
    cv, ov, av = _val(call), _val(other), _val(add)
    if cv is None or ov is None or av is None:
        ctx.skipped(NAME, add, "no example values to check the residual's shape and dtype")
        return None
    if cv.dtype != ov.dtype or av.dtype != cv.dtype:
        ctx.skipped(NAME, add, f"residual {ov.dtype} added to a {cv.dtype} output: a type promotion")
        return None
    if cv.dim() != ov.dim() or not statically_known_true(sym_eq(tuple(cv.shape), tuple(ov.shape))):
        ctx.skipped(NAME, add, f"residual {tuple(ov.shape)} is not the output's shape {tuple(cv.shape)} (broadcast)")
        return None
    return add, other


def _order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def fuse_norm_residual(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Rewrite each gptq_linear with an RMSNorm-ed input or a residual add on its output into gptq_linear_fused."""
    if not ctx.config.fuse_norm_residual:
        return False
    changed = False
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (GPTQ, FUSED)]:
        x = node.args[0]
        norm = match_rms_norm(ctx, x) if node.target is GPTQ or node.args[1] is None else None
        residual = _residual_of(ctx, node) if node.target is GPTQ or node.args[8] is None else None
        if residual is not None:
            order = _order(gm)  # the residual must exist where the call runs (it always does in HF's layers)
            if order[residual[1]] > order[node]:
                ctx.skipped(NAME, residual[0], "the residual is computed after the linear")
                residual = None
        if norm is None and residual is None:
            continue
        call = _as_fused(gm, node)
        if norm is not None:
            source, weight, eps = norm
            _set_arg(call, "x", source)
            _set_arg(call, "norm_weight", weight)
            _set_arg(call, "eps", eps)
            fqn = ctx.placeholder_fqns.get(weight.name, weight.name)
            ctx.matched(NAME, call, f"RMSNorm ({fqn}, eps {eps:g}) folded into the linear",
                        counter="norms_fused")
        if residual is not None:
            add, other = residual
            _set_arg(call, "residual", other)
            for key in ("example_value", "val"):
                if key in add.meta:
                    call.meta[key] = add.meta[key]
            add.replace_all_uses_with(call)
            gm.graph.erase_node(add)
            ctx.matched(NAME, call, f"residual add {add.name} folded into the linear", counter="residuals_fused")
        changed = True
    if changed:
        finish_pass(gm, NAME)
    return changed
