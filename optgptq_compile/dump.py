"""FX graph dumps for debugging the compiler: the graph before and after every pass, and what matched and why.

Layout: ``<dump_dir>/graph_<NNN>/`` per compiled graph, holding ``00_captured.py`` (the graph Dynamo handed to
the backend), ``<NN>_after_<pass>.py`` for every pass that changed the graph, ``final.py`` (what runs) and
``report.txt`` (every candidate each pass looked at: rewritten, or left as plain PyTorch with the reason), and
``final.raw.mlir`` / ``final.linalg.mlir`` (the final graph through torch-mlir, written by ``mlir.mlir_dump``;
``final.mlir.txt`` instead says how to install torch-mlir, or why an export failed).
"""

from __future__ import annotations

import os

import torch.fx as fx

from .context import PassContext
from .log import log


class GraphDumper:
    """Writes one compiled graph's dumps; does nothing when no dump directory is configured."""

    def __init__(self, dump_dir: str | None, graph_index: int):
        self.dir = os.path.join(dump_dir, f"graph_{graph_index:03d}") if dump_dir else None
        self.step = 0
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
            log.info("optgptq: dumping graph %d to %s", graph_index, self.dir)

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def write_text(self, filename: str, text: str) -> None:
        if self.dir:
            with open(os.path.join(self.dir, filename), "w") as f:
                f.write(text)

    def graph(self, label: str, gm: fx.GraphModule) -> None:
        """Readable Python of the graph, numbered in pipeline order."""
        if not self.dir:
            return
        header = f"# optgptq graph dump: {label}\n# nodes: {len(gm.graph.nodes)}\n"
        self.write_text(f"{self.step:02d}_{label}.py", header + gm.print_readable(print_output=False))
        self.step += 1

    def report(self, ctx: PassContext, passes_changed: dict[str, bool], error: str | None) -> None:
        if not self.dir:
            return
        lines = [f"graph {ctx.graph_index} on {ctx.device()}", f"options: {ctx.config}", ""]
        for name, changed in passes_changed.items():
            lines.append(f"pass {name}: {'changed the graph' if changed else 'no change'}")
            for r in (r for r in ctx.report if r.pass_name == name):
                lines.append(f"  {'REWROTE' if r.matched else 'LEFT   '} {r.node}: {r.detail}")
        if error:
            lines += ["", f"FALLBACK to the unmodified graph: {error}"]
        self.write_text("report.txt", "\n".join(lines) + "\n")
