"""Rewrite attention over gathered paged K/V (``kv_gather`` -> ``attention``) into ``paged_attention`` (no gather).

``PagedKVCache.update`` writes new tokens with ``optgptq::kv_write`` and returns ``optgptq::kv_gather`` views, so
HF attention code (and ``match_attention``) sees ordinary [B, Hkv, L, D] tensors. Once ``match_attention`` has
turned that attention into ``optgptq::attention(q, gather(k_cache), gather(v_cache), alibi, padding, causal,
scale)``, this pass replaces it with ``optgptq::paged_attention(q, k_cache, v_cache, block_tables, context_lens,
alibi, causal, scale)``; the gathers then die. Both ops place query i of sequence b at its context length - Sq + i
(the gather is left-padded to L, attention's queries sit at L - Sq + i), so they agree wherever the padding mask
equals "positions outside context_lens" -- which the gather's ``lengths_are_mask`` flag certifies (the runtime
sets it; HF generate, whose cache holds left-pad tokens, does not). Without that flag only a graph with no
padding mask is rewritten.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..context import PassContext
from .utils import finish_pass, replace_node
from .utils import node_value as _val

PASS = "paged_kv"
ATTENTION = torch.ops.optgptq.attention.default
GATHERS = (torch.ops.optgptq.kv_gather, torch.ops.optgptq.kv_gather.default)  # Dynamo records the packet
PAGED_ATTENTION = torch.ops.optgptq.paged_attention.default
ATTENTION_ARGS = ("q", "k", "v", "alibi_slopes", "key_padding_mask", "causal", "scale")


def _through_noops(node):
    """Follow ``.to``/``.contiguous``/``.clone`` that keep shape and dtype back to the tensor they copy."""
    while (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "contiguous", "clone")
           and _val(node) is not None and _val(node.args[0]) is not None
           and _val(node).dtype == _val(node.args[0]).dtype and _val(node).shape == _val(node.args[0]).shape):
        node = node.args[0]
    return node


def _gather_args(node) -> dict | None:
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in GATHERS):
        return None
    names = ("cache", "block_tables", "context_lens", "out_len", "lengths_are_mask")
    return {**dict(zip(names, node.args)), **node.kwargs}


def _rewrite(gm: fx.GraphModule, ctx: PassContext, node: fx.Node) -> str | None:
    """Replace one attention node; return a reason to leave it, or "" when it does not read a paged cache."""
    a = {**dict(zip(ATTENTION_ARGS, node.args)), **node.kwargs}
    gk, gv = _gather_args(_through_noops(a["k"])), _gather_args(_through_noops(a["v"]))
    if gk is None and gv is None:
        return ""  # not paged: nothing to do, nothing to report
    if gk is None or gv is None:
        return "only one of K and V comes from kv_gather"
    if gk["block_tables"] is not gv["block_tables"] or gk["context_lens"] is not gv["context_lens"]:
        return "K and V gathers use different block tables or context lengths"
    if a["key_padding_mask"] is not None and not gk["lengths_are_mask"]:
        return "a padding mask the cache does not vouch for (HF generate with padded prompts)"
    vq, vk = _val(a["q"]), _val(gk["cache"])
    if vq is None or vk is None or vq.dtype != vk.dtype:
        return f"query dtype {getattr(vq, 'dtype', None)} != cache dtype {getattr(vk, 'dtype', None)}"
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(PAGED_ATTENTION, (
            a["q"], gk["cache"], gv["cache"], gk["block_tables"], gk["context_lens"], a["alibi_slopes"], a["causal"],
            a["scale"]))
    replace_node(node, new)
    gm.graph.erase_node(node)
    ctx.matched(PASS, new, "attention(kv_gather) -> paged_attention", counter="paged_attention_rewritten")
    return None


def paged_kv(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Point attention over gathered paged K/V at the blocks themselves."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not ATTENTION:
            continue
        reason = _rewrite(gm, ctx, node)
        if reason:
            ctx.skipped(PASS, node, reason)
        changed |= reason is None
    if changed:
        finish_pass(gm, PASS)
    return changed
