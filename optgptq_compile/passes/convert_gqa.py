"""Merge the KV heads of every matched attention into ``kv_heads`` groups (Opt-GQA, mean pooling) in the graph.

Why the weights change in place and the graph only slices: a graph cannot change the head count of what HF's
cache holds, because the next graph (decode) is traced by Dynamo from the unchanged Python code against that
cache. So the pass rewrites the K/V projection *parameters* in place with the group means re-expanded to the
original head count (same shapes: every later graph, the eager model and the fallback graph stay consistent,
and the idempotent merge is marked so it is done once), then hands ``optgptq::attention`` one head per group
(``k[:, ::g]``). The result is exactly the GQA model with ``kv_heads`` heads. For the data-aware merge and a
smaller HF cache, convert the module first: ``optgptq_compile.convert_gqa(model, n, calibration)``; the pass
then finds ``kv_heads`` heads already and does nothing.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..context import PassContext
from ..gqa import expand_heads, mean_merge
from .match_attention import ATTENTION, val
from .utils import finish_pass

PASS = "convert_gqa"
_MERGED = "_optgptq_gqa_kv_heads"  # attribute on a parameter whose heads are already merged in place


def projection(node: fx.Node, limit: int = 64) -> fx.Node | None:
    """The one ``linear`` that produces ``node`` (through reshapes, RoPE and the cache ``cat``), or None."""
    seen, stack, found = set(), [node], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is F.linear:
            found.add(n)
        elif n.op != "placeholder":
            stack.extend(n.all_input_nodes)
    return found.pop() if len(found) == 1 and not stack else None


def _merge_in_place(ctx: PassContext, lin: fx.Node, heads: int, n: int, d: int, fused: bool) -> str | None:
    weight = ctx.parameter(lin.args[1])
    bias = ctx.parameter(lin.args[2]) if len(lin.args) > 2 else None
    if weight is None or (len(lin.args) > 2 and lin.args[2] is not None and bias is None):
        return "K/V projection weights are not parameters"
    rows = heads * (3 if fused else 1) * d
    if weight.shape[0] != rows:
        return f"K/V projection has {weight.shape[0]} rows, expected {rows}"
    if getattr(weight, _MERGED, None) == n:
        return None
    if getattr(weight, _MERGED, None) is not None:
        return f"heads were already merged to {getattr(weight, _MERGED)}"
    g = heads // n
    with torch.no_grad():
        for p in (weight, bias):
            if p is None:
                continue
            if fused:  # BLOOM: rows interleaved as [H, q/k/v, D]
                view = p.data.view(heads, 3, d, *p.shape[1:])
                for slot in (1, 2):
                    merged = expand_heads(mean_merge(view[:, slot].reshape(heads * d, *p.shape[1:]), n, d), g, d)
                    view[:, slot] = merged.reshape(heads, d, *p.shape[1:])
            else:
                p.data.copy_(expand_heads(mean_merge(p.data, n, d), g, d))
            setattr(p, _MERGED, n)
    return None


def _convert(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, n: int) -> str | None:
    q, k, v = node.args[:3]
    hq, hkv, d = val(q).shape[1], val(k).shape[1], val(k).shape[3]
    if hkv == n:
        return None
    if hkv % n or hq % n:
        return f"kv_heads={n} does not divide the {hkv} KV heads"
    lk, lv = projection(k), projection(v)
    if lk is None or lv is None:
        return "could not trace K/V back to one projection each"
    fused = lk is lv  # BLOOM's query_key_value
    for lin in {lk, lv}:
        reason = _merge_in_place(ctx, lin, hkv, n, d, fused)
        if reason:
            return reason
    g = hkv // n
    with gm.graph.inserting_before(node):
        pick = (slice(None), slice(None, None, g))  # one head per group: the group's heads are now identical
        ks = gm.graph.call_function(operator.getitem, (k, pick))
        vs = gm.graph.call_function(operator.getitem, (v, pick))
    for new, old in ((ks, k), (vs, v)):  # shapes for later passes (the paged-KV rewrite reads them)
        fake = val(old)
        with getattr(fake, "fake_mode", None) or contextlib.nullcontext():
            new.meta["val"] = new.meta["example_value"] = fake[pick]
    node.args = (q, ks, vs, *node.args[3:])
    ctx.matched(PASS, node, f"KV heads {hkv} -> {n} (mean pooling)", counter="gqa_converted")
    return ""


def convert_gqa(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """With ``kv_heads`` set, give every ``optgptq::attention`` that many KV heads by mean-pooling K/V heads."""
    n = ctx.config.kv_heads
    if n is None:
        return False
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is ATTENTION:
            reason = _convert(gm, ctx, node, n)
            if reason:
                ctx.skipped(PASS, node, reason)
            changed |= reason == ""
    if changed:
        finish_pass(gm, PASS)
    return changed
