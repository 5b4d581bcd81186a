"""The ``optgptq`` torch.compile backend: validate options, run the passes, pick kernels, hand the graph on.

If any pass raises, the backend logs a warning, counts a fallback and runs the graph Dynamo captured, unchanged
(``strict=True`` or ``OPTGPTQ_STRICT=1`` raise instead). Weights are released only after the whole pipeline
succeeded, so the fallback graph still has its dense weights.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx

from . import stats
from .config import OptGPTQConfig, parse_options
from .context import PassContext
from .dump import GraphDumper
from .log import log
from .lowering import select_kernels
from .mlir import mlir_dump
from .passes import PASSES
from .quant import cache

_graph_ids = itertools.count()


def run_passes(gm: fx.GraphModule, ctx: PassContext, dumper: GraphDumper) -> dict[str, bool]:
    """Run ``PASSES`` in order on ``gm`` (in place), dumping the graph after each pass that changed it."""
    changed = {}
    for pass_fn in PASSES:
        start = time.perf_counter()
        changed[pass_fn.__name__] = pass_fn(gm, ctx)
        log.debug("pass %s took %.3f s", pass_fn.__name__, time.perf_counter() - start)
        if changed[pass_fn.__name__]:
            dumper.graph(f"after_{pass_fn.__name__}", gm)
    return changed


def _runner(gm: fx.GraphModule, example_inputs: list, ctx: PassContext) -> Callable:
    """What executes the rewritten graph: Inductor on GPUs (it fuses the elementwise glue between our ops and
    leaves the custom ops opaque), the plain FX graph on the CPU (the reference ops dominate there).
    ``OPTGPTQ_RUNNER=fx|inductor`` overrides the choice, for benchmarking the two."""
    runner = os.environ.get("OPTGPTQ_RUNNER") or ("inductor" if ctx.device().type == "cuda" else "fx")
    if runner not in ("fx", "inductor"):
        raise ValueError(f"OPTGPTQ_RUNNER={runner!r}: expected 'fx' or 'inductor'")
    if runner == "inductor":
        from torch._functorch import config as functorch_config
        from torch._inductor.compile_fx import compile_fx

        # Our Triton ops are triton_ops: Inductor may inline their kernels (wrap_triton), but then it analyses every
        # call site's TTIR for mutations, which made compiling a 32-layer 7B graph take minutes on the H100
        # (benchmarks/RESULTS.md). By default they stay opaque custom ops (the launcher runs the kernel);
        # OPTGPTQ_INLINE_TRITON=1 lets Inductor inline them.
        inline = os.environ.get("OPTGPTQ_INLINE_TRITON") == "1"
        with functorch_config.patch(decompose_custom_triton_ops=inline):
            return compile_fx(gm, example_inputs)
    return gm.forward


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: OptGPTQConfig) -> Callable:
    index = next(_graph_ids)
    stats.bump("graphs_compiled")
    ctx = PassContext.for_graph(gm, example_inputs, config, index)
    dumper = GraphDumper(config.dump_dir, index)
    dumper.graph("captured", gm)
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # passes mutate this copy; `gm` stays the fallback
    work.meta.update(gm.meta)
    changed: dict[str, bool] = {}
    try:
        changed = run_passes(work, ctx, dumper)
        changed["select_kernels"] = select_kernels(work, ctx)
    except Exception as exc:  # a pass bug must never break or corrupt the user's model
        if config.strict or os.environ.get("OPTGPTQ_STRICT") == "1":
            raise
        stats.bump("fallbacks")
        log.warning("optgptq: falling back to the unmodified graph %d: %s: %s", index, type(exc).__name__, exc)
        log.debug("%s", traceback.format_exc())
        dumper.report(ctx, changed, f"{type(exc).__name__}: {exc}")
        return gm.forward
    dumper.graph("final", work)
    mlir_dump(work, example_inputs, dumper)  # final.*.mlir when dumping; export_mlir(model) captures here
    try:
        runner = _runner(work, example_inputs, ctx)
    except Exception as exc:  # e.g. Inductor failing to build one of our kernels: the model must still run
        if config.strict or os.environ.get("OPTGPTQ_STRICT") == "1":
            raise
        stats.bump("fallbacks")
        log.warning("optgptq: compiling the rewritten graph %d failed, running the unmodified graph: %s: %s", index,
                    type(exc).__name__, str(exc)[:2000])
        log.debug("%s", traceback.format_exc())
        dumper.report(ctx, changed, f"runner: {type(exc).__name__}: {exc}")
        return gm.forward
    if not config.keep_dense:  # only now: every fallback above still needs the dense weights
        stats.bump("dense_bytes_released", sum(cache.release_dense(p) for p in ctx.dense_to_release))
    dumper.report(ctx, changed, None)
    return runner


def optgptq_backend(
    gm: fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None, mode: str | None = None
) -> Callable:
    """``torch.compile(model, backend="optgptq", options={...})``; see README "Options"."""
    if mode not in (None, "default"):
        raise ValueError(f"optgptq backend: mode={mode!r} is not supported; use options={{...}} instead")
    return compile_graph(gm, example_inputs, parse_options(options))


def register() -> None:
    """Make ``backend="optgptq"`` resolve. Skipped when Dynamo already found our entry point: it registers it
    itself when the name is first looked up, and a second registration would be a duplicate."""
    from torch._dynamo.backends import registry

    if "optgptq" not in registry._COMPILER_FNS and registry._BACKENDS.get("optgptq") is None:
        registry.register_backend(optgptq_backend, name="optgptq")
