"""What ``match_attention`` checks before it rewrites: the meaning of a mask or ALiBi bias built inside the graph.

HF builds attention masks and BLOOM's ALiBi bias from small subgraphs (aranges, comparisons, the 2-D
``attention_mask`` input, ``cumsum``). Rather than pattern-match every spelling of that code across transformers
versions, we read the subgraph's structure for the features our op cannot express (sliding windows, chunked
attention, biases computed from weights) and then *run* it on the real inputs of this call and on random probes
of the padding input, and compare with what ``optgptq::attention`` would do. Anything that does not agree is
reported and left alone.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..context import PassContext

MAX_CONE = 120  # nodes; a mask or ALiBi subgraph is a few dozen, anything larger is not one
COMPARISONS = {"le", "lt", "ge", "gt", "__le__", "__lt__", "__ge__", "__gt__"}
# ops that only appear in masks our op cannot express: sliding windows (kv > q - w), chunked attention (q // c)
FOREIGN_MASK_OPS = {"sub", "__sub__", "rsub", "floordiv", "__floordiv__", "floor_divide", "remainder", "fmod",
                    "__mod__", "neg", "__neg__", "abs"}
PROBES = 4


def op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def cone(node: fx.Node) -> list[fx.Node]:
    """``node`` and everything it depends on, in graph order."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def concrete(value: Any) -> Any:
    """A real int for a SymInt example input (Dynamo hands the backend SymInts for dynamic sizes)."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return int(hint) if hint is not None else None
    return value


def evaluate(gm: fx.GraphModule, nodes: list[fx.Node], env: dict[fx.Node, Any]) -> Any:
    """Run ``nodes`` (a cone, in graph order) with placeholder values from ``env``; returns the last value."""
    values = dict(env)
    for n in nodes:
        if n in values:
            continue
        args = map_arg(n.args, values.__getitem__)
        kwargs = map_arg(n.kwargs, values.__getitem__)
        if n.op == "get_attr":
            values[n] = getattr(gm, n.target)
        elif n.op == "call_function":
            values[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            values[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_module":
            values[n] = gm.get_submodule(n.target)(*args, **kwargs)
        else:
            raise KeyError(f"no value for {n.op} {n.name}")
    out = values[nodes[-1]]
    # checks compare on the CPU: the graph may build its tensors on a GPU, the expected masks are built here
    return out.cpu() if isinstance(out, torch.Tensor) else out


@dataclasses.dataclass
class Inputs:
    """The graph inputs a mask/bias subgraph reads: SymInts and at most one 2-D padding mask."""

    nodes: list[fx.Node]
    env: dict[fx.Node, Any]
    padding: Optional[fx.Node]  # the [B, Skv] attention_mask placeholder, if the subgraph reads one


def cone_inputs(ctx: PassContext, nodes: list[fx.Node], b: int, skv: int) -> Inputs | str:
    """Placeholders of a cone with their values for this call; a reason string if it reads anything else."""
    env, padding = {}, None
    for n in nodes:
        if n.op != "placeholder":
            continue
        value = concrete(ctx.placeholder_values.get(n.name))
        if isinstance(value, int):
            env[n] = value
        elif isinstance(value, torch.nn.Parameter) or not isinstance(value, torch.Tensor):
            return f"mask/bias depends on {n.name}, which is not a padding mask"
        elif value.dim() == 2 and tuple(value.shape) == (b, skv) and not value.is_floating_point() and padding is None:
            env[n], padding = value, n
        else:
            return f"mask/bias depends on tensor input {n.name} {tuple(value.shape)}, not a [B, Skv] padding mask"
    return Inputs(nodes, env, padding)


def probe_paddings(like: torch.Tensor, left_only: bool, seed: int = 0) -> list[torch.Tensor]:
    """Random padding masks shaped like the real one: left padding (what generate builds) and, unless
    ``left_only``, arbitrary holes. Every row keeps at least its last key, as HF inputs do."""
    g = torch.Generator().manual_seed(seed)
    b, s = like.shape
    out = []
    for i in range(PROBES):
        if left_only or i % 2 == 0:
            starts = torch.randint(0, s, (b, 1), generator=g)
            m = torch.arange(s)[None, :] >= starts
        else:
            m = torch.rand(b, s, generator=g) < 0.6
            m[:, -1] = True
        out.append(m.to(device=like.device, dtype=like.dtype))  # the graph builds its constants on that device
    return out


def expected_allowed(padding: Optional[torch.Tensor], b: int, sq: int, skv: int, causal: bool) -> torch.Tensor:
    """What optgptq::attention lets query i of sequence b see: bool [B, 1, Sq, Skv]."""
    allowed = torch.ones(b, 1, sq, skv, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
    if padding is not None:
        allowed &= padding.bool().cpu()[:, None, None, :]
    return allowed


def as_allowed(mask: torch.Tensor, b: int, sq: int, skv: int) -> torch.Tensor | str:
    """A bool or additive float mask as bool [B, 1, Sq, Skv]; a reason if it is a bias, not a mask."""
    if mask.is_floating_point():
        blocked = mask <= torch.finfo(mask.dtype).min / 2  # HF uses finfo.min (or -inf) for masked entries
        if not ((mask == 0) | blocked).all():
            return "additive mask holds values other than 0 and -inf/finfo.min (an unknown bias)"
        mask = ~blocked
    elif mask.dtype != torch.bool:
        return f"mask dtype {mask.dtype} is neither bool nor floating"
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    try:
        mask = mask.expand(b, mask.shape[1], sq, skv)
    except RuntimeError:
        return f"mask of shape {tuple(mask.shape)} does not broadcast to [{b}, H, {sq}, {skv}]"
    if mask.shape[1] != 1 and not (mask == mask[:, :1]).all():
        return "mask differs between heads"
    return mask[:, :1]


def mask_semantics(gm: fx.GraphModule, ctx: PassContext, mask_node: fx.Node, b: int, sq: int, skv: int):
    """(causal, padding placeholder or None) that reproduce ``mask_node``, or a reason string."""
    nodes = cone(mask_node)
    if len(nodes) > MAX_CONE:
        return f"mask subgraph has {len(nodes)} nodes (> {MAX_CONE})"
    names = [op_name(n) for n in nodes if n.op in ("call_function", "call_method")]
    foreign = sorted(set(names) & FOREIGN_MASK_OPS)
    if foreign:
        return f"mask uses {foreign} (sliding window / chunked attention?)"
    if sum(name in COMPARISONS for name in names) > 1:
        return "mask has more than one position comparison (sliding window?)"
    inputs = cone_inputs(ctx, nodes, b, skv)
    if isinstance(inputs, str):
        return inputs
    pad_value = inputs.env.get(inputs.padding)
    allowed = as_allowed(evaluate(gm, nodes, inputs.env), b, sq, skv)
    if isinstance(allowed, str):
        return allowed
    causal = next((c for c in (True, False) if torch.equal(allowed, expected_allowed(pad_value, b, sq, skv, c))), None)
    if causal is None:
        return "mask is neither causal+padding nor padding alone"
    if inputs.padding is not None:
        for probe in probe_paddings(pad_value, left_only=False):
            got = as_allowed(evaluate(gm, nodes, {**inputs.env, inputs.padding: probe}), b, sq, skv)
            if isinstance(got, str) or not torch.equal(got, expected_allowed(probe, b, sq, skv, causal)):
                return "mask does not follow the padding input on random probes"
    return causal, inputs.padding


def bloom_slopes(heads: int) -> torch.Tensor:
    """ALiBi slopes as BLOOM (and the ALiBi paper) define them, for any head count."""
    closest = 2 ** math.floor(math.log2(heads))
    slopes = [2.0 ** (-8.0 * (i + 1) / closest) for i in range(closest)]
    slopes += [2.0 ** (-4.0 * (2 * i + 1) / closest) for i in range(heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_semantics(gm: fx.GraphModule, ctx: PassContext, alibi_node: fx.Node, b: int, h: int, skv: int):
    """(slopes fp32 [H], padding placeholder or None) if ``alibi_node`` ([B*H, 1 or Sq, Skv]) is BLOOM's
    ``slope[h] * key_position`` up to a per-row constant on every attended key; else a reason string.

    The slopes are read from the graph (the constant ``[H]`` subgraph) and must equal BLOOM's formula. When the
    bias reads the padding mask (``cumsum`` positions) it is checked on left-padded probes only: positions
    counted over a mask with holes are not ``key_position + c``; the caller guards that case at run time.
    """
    nodes = cone(alibi_node)
    if len(nodes) > MAX_CONE:
        return f"ALiBi subgraph has {len(nodes)} nodes (> {MAX_CONE})"
    inputs = cone_inputs(ctx, nodes, b, skv)
    if isinstance(inputs, str):
        return inputs
    # the slopes: a node of shape [H] that reads no graph input; evaluate it
    slopes = None
    for n in nodes:
        val = n.meta.get("example_value", n.meta.get("val"))
        if isinstance(val, torch.Tensor) and tuple(val.shape) == (h,) and val.is_floating_point():
            if not any(m.op == "placeholder" for m in cone(n)):
                slopes = evaluate(gm, cone(n), {}).float()
    if slopes is None:
        return "no constant [H] slope tensor found in the ALiBi subgraph"
    if not torch.allclose(slopes, bloom_slopes(h), rtol=1e-6, atol=0):
        return f"slopes {slopes.tolist()} differ from the ALiBi formula for {h} heads"
    pad = inputs.env.get(inputs.padding)
    probes = [pad] if pad is None else [pad, *probe_paddings(pad, left_only=True)]
    positions = torch.arange(skv, dtype=torch.float32)
    for probe in probes:
        env = dict(inputs.env) if probe is None else {**inputs.env, inputs.padding: probe}
        bias = evaluate(gm, nodes, env)
        if bias.dim() != 3 or bias.shape[0] != b * h or bias.shape[-1] != skv:
            return f"ALiBi tensor shape {tuple(bias.shape)} is not [{b * h}, 1, {skv}]"
        bias = bias.float().reshape(b, h, -1, skv)
        if bias.shape[2] != 1 and not (bias == bias[:, :, :1]).all():
            return "ALiBi bias varies over queries"
        rest = bias[:, :, 0] - slopes[None, :, None] * positions  # [B, H, Skv]: must be constant per (b, h)
        keep = torch.ones(b, skv, dtype=torch.bool) if probe is None else probe.bool().cpu()
        spread = (rest - rest[..., -1:]).abs().masked_fill(~keep[:, None, :], 0)
        if spread.max() > 1e-3 * max(1.0, float(slopes.max()) * skv):
            return "ALiBi bias is not slope * key_position (+ a constant) on attended keys"
    return slopes, inputs.padding


def same(a: Any, b: Any) -> bool:
    """Sizes equal for every value of their symbols (plain ints compare directly)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(operator.eq(a, b)))
