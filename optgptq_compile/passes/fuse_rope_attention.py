"""Fold a ``rope_kv_write`` into the paged attention that reads its rotated query: ``optgptq::rope_paged_attention``.

Matched form (after ``paged_kv`` and ``fuse_rope_kv_write``; the base ops, kernels are selected later)::

    q_embed = rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    out = paged_attention(q_embed, k_cache, v_cache, block_tables, context_lens, alibi_slopes, causal, scale)

where q_embed has no other reader and both ops use the same pool nodes. It becomes ``out = rope_paged_attention(q,
k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens, alibi_slopes, causal, scale)`` where
the attention was: the write moves down to it, so no node in between may read or write the pools (directly or
through a value computed from them) or write in place to one of the write's inputs.

Why (``lowering/rope_paged_attention.py``): at decode the attention kernel rotates its query and the new key
itself and stores the new key and value, so the kernel boundary between RoPE + KV write and attention disappears
from every layer's critical path. Left alone, with the reason in the report: a rotated query read by anything
else, attention over other pools than the ones written, attention that is not ``paged_attention`` (``paged_kv``
left the gather), and the hazards above. Layers without RoPE (BLOOM's ALiBi) have no ``rope_kv_write`` and are
not candidates. ``options={"fuse_rope_attention": False}`` turns the pass off.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..context import PassContext
from .utils import _is_impure, finish_pass, replace_node

NAME = "fuse_rope_attention"
ROPE_KV_WRITES = (torch.ops.optgptq.rope_kv_write, torch.ops.optgptq.rope_kv_write.default)  # packet: hand-written
PAGED_ATTENTIONS = (torch.ops.optgptq.paged_attention, torch.ops.optgptq.paged_attention.default)
ROPE_PAGED_ATTENTION = torch.ops.optgptq.rope_paged_attention.default
WRITE_ARGS = ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "slot_mapping")
ATTENTION_ARGS = ("q", "k_cache", "v_cache", "block_tables", "context_lens", "alibi_slopes", "causal", "scale")


def _args(node: fx.Node, names: tuple[str, ...]) -> dict:
    """The call's arguments by name, positional or keyword (neither op has defaults)."""
    return {**dict(zip(names, node.args)), **node.kwargs}


def _hazard(write: fx.Node, attention: fx.Node, w: dict, nodes: list[fx.Node]) -> str:
    """Why the write cannot move down to the attention ("" when it can): a node between them that reads or writes
    the pools (directly, or through a view or another value computed from them), or an in-place op there on one of
    the write's inputs (the write would read it after the change)."""
    pools = {w["k_cache"], w["v_cache"]}
    inputs = set(write.all_input_nodes)
    between = False
    for node in nodes:
        if node is attention:
            return ""
        if node is write:
            between = True
            continue
        touches_pool = any(i in pools for i in node.all_input_nodes)
        if touches_pool:
            pools.add(node)
        if between and touches_pool:
            return f"{node.name} between the write and the attention reads or writes the KV pools"
        if between and _is_impure(node) and inputs & set(node.all_input_nodes):
            return f"{node.name} between the write and the attention writes in place to an input of the write"
    return ""


def _why_not(write: fx.Node, nodes: list[fx.Node]) -> tuple[str, tuple | None]:
    """("", (attention, write args, attention args)) when the pair folds; (reason, None) when not."""
    readers = list(write.users)
    attention = [u for u in readers if u.op == "call_function" and u.target in PAGED_ATTENTIONS
                 and _args(u, ATTENTION_ARGS)["q"] is write]
    if not attention:
        names = ", ".join(u.name for u in readers) or "nothing"
        return f"its rotated query feeds no paged_attention (read by {names})", None
    if len(readers) != 1:
        return f"the rotated query has {len(readers) - 1} reader(s) besides the attention", None
    attention = attention[0]
    w, a = _args(write, WRITE_ARGS), _args(attention, ATTENTION_ARGS)
    if a["k_cache"] is not w["k_cache"] or a["v_cache"] is not w["v_cache"]:
        return (f"the attention reads other pools ({getattr(a['k_cache'], 'name', a['k_cache'])}, "
                f"{getattr(a['v_cache'], 'name', a['v_cache'])}) than the write stores into", None)
    reason = _hazard(write, attention, w, nodes)
    return (reason, None) if reason else ("", (attention, w, a))


def _rewrite(gm: fx.GraphModule, ctx: PassContext, write: fx.Node, plan: tuple) -> None:
    attention, w, a = plan
    with gm.graph.inserting_before(attention):  # every argument is defined by then: the write's come before it
        new = gm.graph.call_function(ROPE_PAGED_ATTENTION, tuple(w[n] for n in WRITE_ARGS) + tuple(
            a[n] for n in ATTENTION_ARGS[3:]))
    replace_node(attention, new)
    gm.graph.erase_node(attention)
    gm.graph.erase_node(write)
    ctx.matched(NAME, new, f"RoPE + KV write of {w['q'].name} folded into its paged attention",
                counter="rope_attention_fused")


def fuse_rope_attention(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Rewrite each ``rope_kv_write`` whose rotated query only ``paged_attention`` reads into one
    ``rope_paged_attention``."""
    if not ctx.config.fuse_rope_attention:
        return False
    changed = False
    for write in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ROPE_KV_WRITES]:
        reason, plan = _why_not(write, list(gm.graph.nodes))
        if reason:
            ctx.skipped(NAME, write, f"RoPE + KV write not folded into the attention: {reason}")
            continue
        _rewrite(gm, ctx, write, plan)
        changed = True
    if changed:
        finish_pass(gm, NAME)
    return changed
