"""Fold a Llama-family layer's rotary embedding into its paged KV write: ``optgptq::rope_kv_write``.

Matched form (Dynamo's torch-level graph; HF ``apply_rotary_pos_emb`` then ``PagedKVCache.update``)::

    q_embed = q * cos + rotate_half(q) * sin       rotate_half(x) = cat((-x[..., H:], x[..., :H]), dim=-1),
    k_embed = k * cos + rotate_half(k) * sin       H = head_dim / 2; either operand order of each * and +
    kv_write(k_embed.transpose(1, 2).reshape(T, Hkv, D), v, k_cache, v_cache, slot_mapping)

where q and k share cos and sin ([B or 1, 1, Sq or 1, D], q's dtype), k_embed feeds nothing but that write, and
every reader of q_embed comes after it. It becomes ``q_embed = rope_kv_write(q, k.transpose(1, 2).reshape(T, Hkv,
D), v, cos, sin, k_cache, v_cache, slot_mapping)``: the transpose and reshape now read the projection output
directly (a view at decode and prefill alike), and the RoPE arithmetic dies.

Why (``lowering/rope_kv_write.py``): on the GPU two kernels per layer become one, which takes part in programmatic
dependent launch where Inductor's RoPE kernel did not. Left alone, with the reason in the report: a RoPE
whose keys are also used elsewhere, q and k rotated with different cos/sin, no (or more than one) rotated query,
readers of q_embed before the write, partial or interleaved rotary forms (they do not match rotate_half). Layers
without RoPE (BLOOM's ALiBi) are not candidates. ``options={"fuse_rope_kv_write": False}`` turns the pass off.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..context import PassContext
from .utils import MUL as _MUL
from .utils import finish_pass
from .utils import node_value as _val

NAME = "fuse_rope_kv_write"
KV_WRITES = (torch.ops.optgptq.kv_write, torch.ops.optgptq.kv_write.default)  # Dynamo records the packet as called
ROPE_KV_WRITE = torch.ops.optgptq.rope_kv_write.default
KV_WRITE_ARGS = ("k", "v", "k_cache", "v_cache", "slot_mapping")

_ADD = {operator.add, torch.add, torch.ops.aten.add.Tensor}
_NEG = {operator.neg, torch.neg, torch.ops.aten.neg.default}
_CAT = {torch.cat, torch.ops.aten.cat.default}


def _call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets and not node.kwargs


def _method(node, names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _last_dim_slice(node, x: fx.Node, start, stop) -> bool:
    """``node`` is ``x[..., start:stop]`` (Ellipsis form, or full slices on every leading dim)."""
    if not (_call(node, {operator.getitem}) and node.args[0] is x and isinstance(node.args[1], tuple)):
        return False
    index, ndim = node.args[1], _val(x).dim()
    full = slice(None, None, None)
    if index[:1] == (Ellipsis,) and len(index) == 2:
        last = index[1]
    elif len(index) == ndim and all(i == full for i in index[:-1]):
        last = index[-1]
    else:
        return False
    return isinstance(last, slice) and (last.start, last.stop, last.step) == (start, stop, None)


def _is_rotate_half(rot, x: fx.Node) -> bool:
    """``rot`` is HF's ``cat((-x[..., H:], x[..., :H]), dim=-1)`` with H = head_dim / 2."""
    vx = _val(x)
    if vx is None or not isinstance(rot, fx.Node) or rot.op != "call_function" or rot.target not in _CAT:
        return False
    dim = rot.kwargs.get("dim", rot.args[1] if len(rot.args) > 1 else 0)
    if set(rot.kwargs) - {"dim"} or dim not in (-1, vx.dim() - 1):
        return False
    parts = rot.args[0]
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and _call(parts[0], _NEG)):
        return False
    half = vx.shape[-1] // 2
    return (vx.shape[-1] % 2 == 0 and _last_dim_slice(parts[0].args[0], x, half, None)
            and _last_dim_slice(parts[1], x, None, half))


def match_rope(node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) if ``node`` is ``x * cos + rotate_half(x) * sin`` (any operand order), else None."""
    if not (_call(node, _ADD) and len(node.args) == 2):
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        if not (_call(plain, _MUL) and _call(rotated, _MUL)):
            continue
        for x, cos in (plain.args, plain.args[::-1]):
            for rot, sin in (rotated.args, rotated.args[::-1]):
                if isinstance(x, fx.Node) and _is_rotate_half(rot, x) and isinstance(sin, fx.Node):
                    return x, cos, sin
    return None


def _key_rope(k: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(transpose, reshape, k_embed) when kv_write's k is ``k_embed.transpose(1, 2).reshape(...)``."""
    if not (_method(k, {"reshape", "view"}) and _method(k.args[0], {"transpose"})):
        return None
    transpose = k.args[0]
    if tuple(transpose.args[1:]) not in ((1, 2), (2, 1)) or transpose.kwargs:
        return None
    return transpose, k, transpose.args[0]


def _query_ropes(cos: fx.Node, sin: fx.Node, k_embed: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """(q_embed, q) of every other RoPE with these cos and sin: the users' users of ``cos``."""
    found = []
    for mul in cos.users:
        for add in mul.users:
            m = match_rope(add) if add is not k_embed else None
            if m is not None and m[1] is cos and m[2] is sin and (add, m[0]) not in found:
                found.append((add, m[0]))
    return found


def _why_not(kv_write: fx.Node, k_chain, order: dict) -> tuple[str, tuple | None]:
    """("", plan) when the write and its RoPE fold; (reason, None) when not."""
    transpose, reshape, k_embed = k_chain
    m = match_rope(k_embed)
    if m is None:
        return "k is not HF's q/k * cos + rotate_half(q/k) * sin", None
    k, cos, sin = m
    if len(k_embed.users) != 1 or len(transpose.users) != 1 or len(reshape.users) != 1:
        return "the rotated keys are also used outside the KV write", None
    vk, vcos, vsin = _val(k), _val(cos), _val(sin)
    if vk is None or vk.dim() != 4 or vcos is None or vsin is None:
        return "no shape information on k, cos or sin", None
    b, _, sq, d = vk.shape
    for t in (vcos, vsin):
        if t.dim() != 4 or t.shape[1] != 1 or t.shape[0] not in (1, b) or t.shape[2] not in (1, sq) \
                or t.shape[3] != d or t.dtype != vk.dtype:
            return f"cos/sin {tuple(t.shape)} {t.dtype} do not broadcast as [B or 1, 1, Sq or 1, D] in k's dtype", None
    queries = _query_ropes(cos, sin, k_embed)
    if len(queries) != 1:
        return f"{len(queries)} query RoPEs share the keys' cos/sin (expected one)", None
    q_embed, q = queries[0]
    vq = _val(q)
    if vq is None or vq.dim() != 4 or vq.shape[0] != b or vq.shape[2] != sq or vq.shape[3] != d \
            or vq.dtype != vk.dtype:
        return f"query {getattr(vq, 'shape', None)} does not match keys {tuple(vk.shape)}", None
    if any(order[u] < order[kv_write] for u in q_embed.users):
        return "the rotated query is read before the KV write", None
    return "", (q, q_embed, k, transpose, cos, sin)


def _rewrite(gm: fx.GraphModule, ctx: PassContext, kv_write: fx.Node, a: dict, plan: tuple) -> None:
    q, q_embed, k, transpose, cos, sin = plan
    transpose.replace_input_with(transpose.args[0], k)  # the write's k is now the projection output, unrotated
    with gm.graph.inserting_before(kv_write):
        new = gm.graph.call_function(ROPE_KV_WRITE, (q, a["k"], a["v"], cos, sin, a["k_cache"], a["v_cache"],
                                                     a["slot_mapping"]))
    new.meta.update(q_embed.meta)
    q_embed.replace_all_uses_with(new)
    gm.graph.erase_node(kv_write)
    ctx.matched(NAME, new, f"RoPE of {q.name} / {k.name} folded into the KV write", counter="rope_kv_write_fused")


def fuse_rope_kv_write(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Rewrite each ``kv_write`` of RoPE-rotated keys, and its layer's query RoPE, into one ``rope_kv_write``."""
    if not ctx.config.fuse_rope_kv_write:
        return False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = False
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in KV_WRITES]:
        a = {**dict(zip(KV_WRITE_ARGS, node.args)), **node.kwargs}
        k_chain = _key_rope(a["k"])
        if k_chain is None or not _call(k_chain[2], _ADD):
            continue  # keys not rotated by an add (BLOOM's ALiBi layers): not a candidate
        reason, plan = _why_not(node, k_chain, order)
        if reason:
            ctx.skipped(NAME, node, f"RoPE not folded into the KV write: {reason}")
            continue
        _rewrite(gm, ctx, node, a, plan)
        changed = True
    if changed:
        finish_pass(gm, NAME)
    return changed
