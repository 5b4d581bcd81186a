"""What a pass needs besides the graph: options, the real tensors behind placeholders, counters, a match report."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.fx as fx

from . import stats
from .config import OptGPTQConfig
from .log import log

_SOURCE_KEY = re.compile(r"\['([^']+)'\]")


def fqn_of(node: fx.Node) -> str | None:
    """Module path of a placeholder that Dynamo lifted from the model, e.g. ``model.layers.0.mlp.up_proj.weight``.

    Dynamo records where each graph input came from (``L['self']._modules['model']...._parameters['weight']``, or
    ``L['args'][0]...`` when ``forward`` is wrapped, see below); None for anything else (inputs, constants).
    """
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name if isinstance(source.name, str) else source.name()
    # ``self`` itself, or the first positional argument when a decorator wraps ``forward`` as ``f(*args, **kwargs)``
    # (transformers 5.24 wraps the models' forward in its deprecation helper: ``L['args'][0]._modules[...]``)
    for prefix in ("L['self']", "L['args'][0]."):
        if name.startswith(prefix):
            keys = _SOURCE_KEY.findall(name[len(prefix):])
            return ".".join(keys) or None
    return None


@dataclasses.dataclass
class ReportLine:
    pass_name: str
    node: str
    matched: bool
    detail: str


@dataclasses.dataclass
class PassContext:
    """Carried through every pass of one compiled graph."""

    config: OptGPTQConfig
    example_inputs: list[Any]  # the real inputs: nn.Parameters for lifted weights, tensors, SymInts
    placeholder_values: dict[str, Any] = dataclasses.field(default_factory=dict)  # placeholder name -> value
    placeholder_fqns: dict[str, str] = dataclasses.field(default_factory=dict)  # placeholder name -> module path
    report: list[ReportLine] = dataclasses.field(default_factory=list)
    dense_to_release: list[torch.Tensor] = dataclasses.field(default_factory=list)  # weights now held quantized
    graph_index: int = 0

    @classmethod
    def for_graph(cls, gm: fx.GraphModule, example_inputs: list[Any], config: OptGPTQConfig, graph_index: int = 0):
        ctx = cls(config=config, example_inputs=list(example_inputs), graph_index=graph_index)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, example_inputs):
            ctx.placeholder_values[node.name] = value
            fqn = fqn_of(node)
            if fqn is not None:
                ctx.placeholder_fqns[node.name] = fqn
        return ctx

    def parameter(self, node: Any) -> torch.nn.Parameter | None:
        """The real ``nn.Parameter`` behind a placeholder node, or None if the node is not one."""
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        value = self.placeholder_values.get(node.name)
        return value if isinstance(value, torch.nn.Parameter) else None

    def device(self) -> torch.device:
        """The device the graph runs on: that of its first tensor input (CPU if it has none)."""
        for value in self.example_inputs:
            if isinstance(value, torch.Tensor):
                return value.device
        return torch.device("cpu")

    def matched(self, pass_name: str, node: fx.Node, detail: str, counter: str | None = None) -> None:
        self.report.append(ReportLine(pass_name, node.name, True, detail))
        if counter:
            stats.bump(counter)
        log.debug("%s: rewrote %s (%s)", pass_name, node.name, detail)

    def skipped(self, pass_name: str, node: fx.Node, reason: str) -> None:
        """A candidate the pass left as plain PyTorch, with the reason (counted as ``<pass>_skipped``)."""
        self.report.append(ReportLine(pass_name, node.name, False, reason))
        stats.bump(f"{pass_name}_skipped")
        log.info("%s: left %s as plain PyTorch: %s", pass_name, node.name, reason)
