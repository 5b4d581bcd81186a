"""Rewrite HF Llama-family SDPA attention and BLOOM's eager ALiBi attention into ``optgptq::attention``."""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..context import PassContext
from .attention_semantics import alibi_semantics, concrete, mask_semantics, op_name, same
from .utils import add_constant, finish_pass, replace_node

PASS = "match_attention"
ATTENTION = torch.ops.optgptq.attention.default
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
RESHAPES = {"view", "reshape"}


def val(node: Any) -> Optional[torch.Tensor]:
    """The example (fake) tensor Dynamo recorded for ``node``."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def is_method(node: Any, names: set[str] | str) -> bool:
    names = {names} if isinstance(names, str) else names
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in names
    return node.op == "call_function" and any(node.target is getattr(torch, name, None) for name in names)


def only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def strip_repeat_kv(node: fx.Node) -> fx.Node:
    """HF ``repeat_kv``: ``x[:, :, None].expand(B, Hkv, rep, S, D).reshape(B, Hkv*rep, S, D)`` -> ``x``."""
    if not is_method(node, RESHAPES) or not is_method(node.args[0], "expand"):
        return node
    getitem = node.args[0].args[0]
    full = slice(None, None, None)
    if not (isinstance(getitem, fx.Node) and getitem.target is operator.getitem
            and getitem.args[1] == (full, full, None, full, full)):
        return node
    base, out = val(getitem.args[0]), val(node)
    if base is None or out is None or base.dim() != 4 or out.dim() != 4:
        return node
    return getitem.args[0]


def check_qkv(q: fx.Node, k: fx.Node, v: fx.Node) -> str | None:
    """A reason the three inputs do not fit the op's contract, or None."""
    vq, vk, vv = val(q), val(k), val(v)
    if vq is None or vk is None or vv is None:
        return "no example values for q/k/v"
    if vq.dim() != 4 or vk.dim() != 4 or vv.dim() != 4:
        return f"q/k/v are not 4-D: {tuple(vq.shape)}, {tuple(vk.shape)}, {tuple(vv.shape)}"
    if not (vq.dtype == vk.dtype == vv.dtype) or not vq.is_floating_point():
        return f"q/k/v dtypes differ or are not floating: {vq.dtype}, {vk.dtype}, {vv.dtype}"
    # sizes compared on this call's values: dynamic K and V lengths get separate symbols, and the op itself
    # raises a ValueError if they ever differ at run time
    if [concrete(x) for x in vk.shape] != [concrete(x) for x in vv.shape]:
        return "k and v shapes differ"
    if concrete(vq.shape[0]) != concrete(vk.shape[0]) or concrete(vq.shape[3]) != concrete(vk.shape[3]):
        return "batch or head_dim of q and k differ"
    hq, hkv = concrete(vq.shape[1]), concrete(vk.shape[1])
    if not isinstance(hq, int) or not isinstance(hkv, int) or hq % hkv:
        return f"query heads {hq} are not a multiple of KV heads {hkv}"
    return None


def concrete_sizes(q: fx.Node, k: fx.Node) -> tuple[int, int, int, int]:
    """B, Sq, Skv, D of this call (the hints of symbolic sizes)."""
    vq, vk = val(q), val(k)
    return concrete(vq.shape[0]), concrete(vq.shape[2]), concrete(vk.shape[2]), concrete(vq.shape[3])


def as_bool_padding(gm: fx.GraphModule, before: fx.Node, padding: Optional[fx.Node]) -> Optional[fx.Node]:
    if padding is None:
        return None
    with gm.graph.inserting_before(before):
        return gm.graph.call_method("bool", (padding,))


def rewrite_sdpa(gm: fx.GraphModule, ctx: PassContext, node: fx.Node) -> str | None:
    """Replace one SDPA call; returns a reason when it must stay as it is."""
    a = {**SDPA_DEFAULTS, **dict(zip(SDPA_ARGS, node.args)), **node.kwargs}
    if a["dropout_p"] != 0.0:
        return f"attention dropout p={a['dropout_p']} (training)"
    if a["scale"] is not None and not isinstance(a["scale"], (int, float)):
        return "scale is not a constant"
    q, k, v = a["query"], strip_repeat_kv(a["key"]), strip_repeat_kv(a["value"])
    reason = check_qkv(q, k, v)
    if reason:
        return reason
    if not a["enable_gqa"] and val(q).shape[1] != val(k).shape[1] and (k is a["key"] or v is a["value"]):
        return "query and KV head counts differ without enable_gqa or repeat_kv"
    b, sq, skv, d = concrete_sizes(q, k)
    scale = float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(d)
    padding = None
    if a["attn_mask"] is None:
        causal = bool(a["is_causal"])
        if causal and not same(val(q).shape[2], val(k).shape[2]):
            return "is_causal with Sq != Skv (SDPA aligns the causal mask top-left)"
    elif a["is_causal"]:
        return "both attn_mask and is_causal"
    else:
        found = mask_semantics(gm, ctx, a["attn_mask"], b, sq, skv)
        if isinstance(found, str):
            return found
        causal, padding = found
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(ATTENTION, (q, k, v, None, as_bool_padding(gm, node, padding), causal, scale))
    replace_node(node, new)
    ctx.matched(PASS, node, f"sdpa -> attention(Hq={val(q).shape[1]}, Hkv={val(k).shape[1]}, causal={causal}, "
                f"padding={padding is not None}, scale={scale:.6g})", counter="attention_rewritten")
    return None


def bloom_chain(node: fx.Node) -> dict | str:
    """From ``alibi.baddbmm(q, k^T)`` follow view -> + mask -> softmax(fp32) -> [to] -> [dropout] -> view -> bmm."""
    args = {**dict(zip(("input", "batch1", "batch2"), node.args)), **node.kwargs}  # method: args[0] is self
    if args.get("beta", 1.0) != 1.0 or not isinstance(args.get("alpha", 1.0), (int, float)):
        return f"baddbmm with beta={args.get('beta')} alpha={args.get('alpha')}"
    q3, kt = args.get("batch1"), args.get("batch2")
    if not is_method(q3, RESHAPES) or not is_method(kt, "transpose") or not is_method(kt.args[0], RESHAPES):
        return "baddbmm operands are not reshaped q and transposed k"
    if sorted(d % 3 for d in kt.args[1:3]) != [1, 2]:  # transpose(-1, -2) or (1, 2) of a 3-D tensor
        return f"k is transposed over dims {kt.args[1:3]}"
    chain = {"alibi": args["input"], "q": q3.args[0], "k": kt.args[0].args[0], "scale": float(args.get("alpha", 1.0))}
    n = only_user(node)
    if not is_method(n, RESHAPES):
        return "attention scores are not reshaped to [B, H, Sq, Skv] (used elsewhere?)"
    add = only_user(n)
    if add is None or op_name(add) not in ("add", "__add__") or len(add.args) != 2:
        return "no mask added to the attention scores"
    chain["mask"] = add.args[1] if add.args[0] is n else add.args[0]
    sm = only_user(add)
    if sm is None or op_name(sm) != "softmax":
        return "scores + mask do not go to softmax"
    dim = sm.kwargs.get("dim", sm.args[1] if len(sm.args) > 1 else None)
    if dim not in (-1, 3) or sm.kwargs.get("dtype", torch.float32) != torch.float32:
        return f"softmax over dim {dim} in {sm.kwargs.get('dtype')} (expected dim -1 in float32)"
    n = only_user(sm)
    while n is not None and (is_method(n, {"to", "type", "float"}) or n.target is F.dropout):
        if n.target is F.dropout:
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
            training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
            if p != 0.0 and training:
                return f"attention dropout p={p} (training)"
        n = only_user(n)
    if not is_method(n, RESHAPES):
        return "probabilities are not reshaped back to [B*H, Sq, Skv] (used elsewhere?)"
    bmm = only_user(n)
    if bmm is None or op_name(bmm) != "bmm" or bmm.args[0] is not n or not is_method(bmm.args[1], RESHAPES):
        return "probabilities do not meet V in a bmm"
    chain.update(v=bmm.args[1].args[0], bmm=bmm)
    return chain


def left_padding_guard(gm: fx.GraphModule, before: fx.Node, padding: fx.Node, guards: dict) -> None:
    """BLOOM counts ALiBi positions over the mask (cumsum); that equals key_position + c only for masks without
    holes. Assert at run time that every row is left-padded (non-decreasing) rather than be silently wrong."""
    if padding in guards:
        return
    g = gm.graph
    with g.inserting_before(before):
        tail = g.call_function(operator.getitem, (padding, (slice(None), slice(1, None))))
        head = g.call_function(operator.getitem, (padding, (slice(None), slice(None, -1))))
        ok = g.call_function(torch.all, (g.call_function(operator.ge, (tail, head)),))
        guards[padding] = g.call_function(torch._assert_async, (
            ok, "optgptq: the rewritten BLOOM attention needs a left-padded attention_mask (no holes)"))


def rewrite_bloom(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, guards: dict) -> str | None:
    chain = bloom_chain(node)
    if isinstance(chain, str):
        return chain
    q, k, v = chain["q"], chain["k"], chain["v"]
    reason = check_qkv(q, k, v)
    if reason:
        return reason
    if val(q).shape[1] != val(k).shape[1]:
        return "BLOOM attention with different query and KV head counts"
    b, sq, skv, _ = concrete_sizes(q, k)
    heads = concrete(val(q).shape[1])
    found = mask_semantics(gm, ctx, chain["mask"], b, sq, skv)
    if isinstance(found, str):
        return found
    causal, padding = found
    alibi = alibi_semantics(gm, ctx, chain["alibi"], b, heads, skv)
    if isinstance(alibi, str):
        return alibi
    slopes, alibi_padding = alibi
    if alibi_padding is not None and alibi_padding is not padding:
        return "ALiBi reads a padding input the mask does not"
    bmm = chain["bmm"]
    with gm.graph.inserting_before(bmm):
        slopes_node = add_constant(gm, "alibi_slopes", slopes.to(val(q).device))
        out = gm.graph.call_function(
            ATTENTION, (q, k, v, slopes_node, as_bool_padding(gm, bmm, padding), causal, chain["scale"]))
        flat = gm.graph.call_method("flatten", (out, 0, 1))  # [B*H, Sq, D], what bmm returned
    if alibi_padding is not None:
        left_padding_guard(gm, bmm, alibi_padding, guards)
    replace_node(bmm, flat)
    ctx.matched(PASS, node, f"BLOOM baddbmm/softmax/bmm -> attention(H={heads}, ALiBi, causal={causal}, "
                f"padding={padding is not None}, scale={chain['scale']:.6g})", counter="attention_rewritten")
    return None


def match_attention(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Rewrite every attention whose shapes, dtypes, scale, mask and bias we can prove equal to the op's."""
    changed, guards = False, {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            reason = rewrite_sdpa(gm, ctx, node)
        elif is_method(node, "baddbmm"):
            reason = rewrite_bloom(gm, ctx, node, guards)
        else:
            continue
        if reason:
            ctx.skipped(PASS, node, reason)
        else:
            changed = True
    if changed:
        finish_pass(gm, PASS)
    return changed
