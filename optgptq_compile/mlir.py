"""Export the backend's final FX graph to MLIR with torch-mlir's FX importer.

``raw`` keeps the project's custom ops as ``torch.operator "torch.optgptq.<op>"``. ``torch`` and
``linalg-on-tensors`` lower the whole graph, so every ``optgptq::*`` op is first decomposed into standard aten ops
(``_decompositions``): gptq_linear as unpack bits -> subtract zero -> scale -> matmul, attention and the paged ops
as their plain-PyTorch references. In every form, Triton kernel variants appear as their base op and the pool
writes of ``kv_write`` / ``rope_kv_write`` / ``rope_paged_attention`` as aten ``index_put`` (``_exportable``).
Packed GPTQ tensors (``get_attr`` buffers) become literals of the module; parameters stay function arguments, in
the order of the graph's placeholders.

torch-mlir's own ``quant.matmul_rhs_group_quant`` linalg lowering (``torch-convert-custom-quant-op``) is not in
its FX pipelines and fits only a narrow case (see README "MLIR export"); the decomposed form works for every
bit width, act-order ``g_idx``, bias and dtype.

torch-mlir is optional: ``pip install torch-mlir==20261001`` (``pip install "optgptq_compile[mlir]"``).
"""

from __future__ import annotations

import contextlib
import copy as copy_module
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from .log import log

INSTALL_HINT = 'pip install torch-mlir==20261001   (or: pip install "optgptq_compile[mlir]")'
OUTPUT_TYPES = ("raw", "torch", "linalg-on-tensors")

_captured: Optional[list] = None  # set by _capture_final_graphs(): the backend's final graphs land here


def _torch_mlir_fx():
    try:
        from torch_mlir import fx as torch_mlir_fx
    except ImportError as exc:
        message = f"optgptq_compile.export_mlir needs torch-mlir, which is not installed: {INSTALL_HINT}"
        raise ImportError(message) from exc
    return torch_mlir_fx


def torch_mlir_available() -> bool:
    try:
        _torch_mlir_fx()
    except ImportError:
        return False
    return True


# ---- decompositions of the project's ops into aten ops torch-mlir lowers --------------------------------------


def unpack_last_dim(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., W] holding a little-endian ``bits``-wide bit stream -> int32 [..., V] values, V = W*32/bits
    rounded up to whole runs of 32 (callers slice off the padding).

    Written with ``torch.bitwise_*`` calls rather than ``>>``/``<<``: torch-mlir has no lowering for
    ``aten.__rshift__``. 2/4/8 bits: each word holds 32/bits values, one arithmetic shift + mask each (the
    mask drops the sign bits). 3 bits: 32 values fill 3 words and some straddle two, so the words are widened
    to int64 (a logical shift) and each value ORs the low part of its word with the high part of the next.
    """
    mask = 2**bits - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # [32/bits]
        values = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(-1), shifts), mask)  # [..., W, 32/bits]
        return values.flatten(-2)
    *lead, nwords = packed.shape
    words = torch.bitwise_and(packed.to(torch.int64), 0xFFFFFFFF)  # [..., W], as unsigned words
    if nwords % bits:  # qzeros of an N that is not a multiple of 32: the last run is cut short; pad it
        words = torch.cat([words, words.new_zeros(*lead, bits - nwords % bits)], dim=-1)
    words = words.reshape(*lead, -1, bits)  # [..., runs, bits]
    words = torch.cat([words, torch.zeros_like(words[..., :1])], dim=-1)  # a zero spill word: [..., runs, bits+1]
    start = torch.arange(32, device=packed.device) * bits  # bit offset of value j in its run of 32
    word, offset = start // 32, start % 32  # [32] each
    low = torch.bitwise_right_shift(words.index_select(-1, word), offset)  # [..., runs, 32]
    high = torch.bitwise_left_shift(words.index_select(-1, word + 1), 32 - offset)
    return torch.bitwise_and(torch.bitwise_or(low, high), mask).to(torch.int32).flatten(-2)


def decompose_gptq_linear(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # int32 [K*bits/32, N]
    qzeros: torch.Tensor,  # int32 [G, N*bits/32]
    scales: torch.Tensor,  # [G, N]
    g_idx: torch.Tensor,  # int32 [K]
    bias: Optional[torch.Tensor],  # [N]
    bits: int,
    group_size: int,
) -> torch.Tensor:  # [..., N]
    """``optgptq::gptq_linear`` in aten ops: unpack, subtract the zero, scale (fp32, as the reference), matmul."""
    k, n = x.shape[-1], scales.shape[-1]
    q = unpack_last_dim(qweight.t(), bits).t()[:k]  # [K, N]
    zeros = unpack_last_dim(qzeros, bits)[:, :n]  # [G, N]
    g = g_idx.to(torch.int64)  # act-order: any group per input channel, so gather rather than reshape
    w = (q - zeros.index_select(0, g)).to(torch.float32) * scales.index_select(0, g).to(torch.float32)  # [K, N]
    y = torch.matmul(x, w.to(x.dtype))
    return y + bias.to(y.dtype) if bias is not None else y


def decompose_gptq_linear_fused(x, norm_weight, eps, qweight, qzeros, scales, g_idx, bias, residual, bits,
                                group_size, act="none"):
    """``optgptq::gptq_linear_fused`` in aten ops: HF's RMSNorm, ``decompose_gptq_linear``, silu(gate) * up or the
    residual add."""
    from .lowering.gptq_linear import torch_rms_norm, torch_silu_mul

    if norm_weight is not None:
        x = torch_rms_norm(x, norm_weight, eps)
    y = decompose_gptq_linear(x, qweight, qzeros, scales, g_idx, bias, bits, group_size)
    if act == "silu_mul":
        y = torch_silu_mul(y)
    return y + residual if residual is not None else y


def kv_write_aten(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [T], -1 = padding token
) -> None:
    """``optgptq::kv_write`` in aten ops with static shapes: padding tokens (slot -1) are written to a scratch row
    past the pool, which is then dropped. torch.export turns the in-place copy into an updated cache output."""
    for new, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
        padded = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])  # row num_slots: the scratch row
        slots = torch.where(slot_mapping >= 0, slot_mapping, flat.shape[0])  # [T]
        flat.copy_(padded.index_put((slots,), new.to(cache.dtype))[:-1])


def rope_kv_write_aten(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """``optgptq::rope_kv_write`` in aten ops: HF's RoPE of q and k, then ``kv_write_aten``; returns q_embed."""
    from .lowering.rope_kv_write import torch_rope

    q_embed, k_embed = torch_rope(q, k, cos, sin)
    kv_write_aten(k_embed, v, k_cache, v_cache, slot_mapping)
    return q_embed


def rope_paged_attention_aten(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                              alibi_slopes, causal, scale) -> torch.Tensor:
    """``optgptq::rope_paged_attention`` as what it stands for: ``rope_kv_write_aten``, then ``paged_attention``
    on the rotated query. The attention stays the (non-mutating) custom op, so the raw form still shows it and the
    lowered forms decompose it like any other ``paged_attention``."""
    q_embed = rope_kv_write_aten(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return torch.ops.optgptq.paged_attention.default(q_embed, k_cache, v_cache, block_tables, context_lens,
                                                     alibi_slopes, causal, scale)


def _exportable(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy with two kinds of call swapped before torch.export sees them:

    - kernel variants (the Triton ops of ``lowering.KERNEL_VARIANTS``) back to their base op: same schema and
      semantics, and a ``triton_op`` would be traced into a Triton-kernel wrapper that torch-mlir cannot import;
    - the mutating ops (``kv_write``, ``rope_kv_write``, ``rope_paged_attention``) to their aten forms: a
      mutating custom op reaches torch-mlir as ``auto_functionalized_v2``, which its FX importer cannot import,
      even in the raw form.
    """
    from . import lowering

    swaps = {variant: base for base, variants in lowering.KERNEL_VARIANTS.items() for variant in variants.values()}
    ops = torch.ops.optgptq
    for name, aten_form in (("kv_write", kv_write_aten), ("rope_kv_write", rope_kv_write_aten),
                            ("rope_paged_attention", rope_paged_attention_aten)):
        if hasattr(ops, name):  # a Triton variant goes straight to the aten form too
            base = getattr(ops, name).default
            swaps = {op: aten_form if target == base else target for op, target in swaps.items()}
            swaps[base] = aten_form
    if not any(n.op == "call_function" and n.target in swaps for n in gm.graph.nodes):
        return gm
    exportable = fx.GraphModule(gm, copy_module.deepcopy(gm.graph))
    for node in exportable.graph.nodes:
        if node.op == "call_function" and node.target in swaps:
            node.target = swaps[node.target]
    exportable.recompile()
    return exportable


def _decompositions() -> dict:
    """optgptq op overload -> the aten-level function that replaces it (kernel variants were swapped back to
    their base op by ``_exportable``)."""
    from .lowering import attention, paged_attention

    ops = torch.ops.optgptq
    table: dict = {ops.gptq_linear.default: decompose_gptq_linear, ops.attention.default: attention.torch_attention,
                   ops.gptq_linear_fused.default: decompose_gptq_linear_fused}
    if hasattr(ops, "paged_attention"):
        table[ops.paged_attention.default] = paged_attention.torch_paged_attention
    if hasattr(ops, "kv_gather"):
        table[ops.kv_gather.default] = _decompose_kv_gather
    return table


def _decompose_kv_gather(cache, block_tables, context_lens, out_len, lengths_are_mask):
    """The flag only licenses a rewrite in the paged_kv pass; it does not change what the op computes."""
    from .lowering.paged_attention import torch_kv_gather

    return torch_kv_gather(cache, block_tables, context_lens, out_len)


# ---- export ---------------------------------------------------------------------------------------------------


def _concrete_inputs(example_inputs: Sequence) -> tuple:
    """Real tensors and ints for torch.export: a symbolic size (Dynamo's dynamic-shape graphs pass SymInts) becomes
    its example value, an inference-mode tensor (the runtime's) a normal one."""
    from torch._subclasses.fake_tensor import is_fake

    inputs = []
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and is_fake(value):
            raise ValueError("export_mlir needs real example inputs; got a FakeTensor (call it outside tracing)")
        if isinstance(value, torch.SymInt):
            if value.node.hint is None:
                raise ValueError(f"export_mlir: symbolic size {value} has no example value")
            value = int(value.node.hint)
        if isinstance(value, torch.Tensor) and value.is_inference():  # torch.export cannot trace inference
            value = value.clone()  # tensors together with parameters
        inputs.append(value)
    return tuple(inputs)


def _dynamic_shapes(gm: fx.GraphModule, example_inputs: Sequence) -> Optional[tuple]:
    """torch.export's ``dynamic_shapes`` mirroring Dynamo's: every size that is symbolic in the graph's example
    values (and every SymInt input) stays dynamic; None for a static graph."""
    from torch.export import Dim

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = []
    for node, value in zip(placeholders, example_inputs):
        example = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt):
            specs.append(Dim.AUTO)
        elif isinstance(value, torch.Tensor) and isinstance(example, torch.Tensor):
            dims = {i: Dim.AUTO for i, size in enumerate(example.shape) if isinstance(size, torch.SymInt)}
            specs.append(dims or None)
        else:
            specs.append(None)
    return tuple(specs) if any(spec is not None for spec in specs) else None


def export_program(gm: fx.GraphModule, example_inputs: Sequence, decompose: bool) -> torch.export.ExportedProgram:
    """``gm`` as an aten-level ExportedProgram; ``decompose`` replaces every optgptq op by its aten decomposition
    (and applies torch-mlir's usual decompositions). Sizes Dynamo kept symbolic stay dynamic (``?`` in the MLIR
    types); if torch.export cannot keep them so, the program is specialized to the example sizes, with a warning."""
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    inputs, exportable = _concrete_inputs(example_inputs), _exportable(gm)
    dynamic_shapes = _dynamic_shapes(gm, example_inputs)
    with _outside_dynamo():
        try:
            program = torch.export.export(exportable, inputs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:
            if dynamic_shapes is None:
                raise
            log.warning("export_mlir: dynamic export failed (%s: %s); exporting specialized to the example sizes",
                        type(exc).__name__, exc)
            program = torch.export.export(exportable, inputs, strict=False)
        table = dict(get_decomposition_table())  # a copy: torch-mlir caches (functools.cache) the table it returns
        if decompose:
            table.update(_decompositions())
        return program.run_decompositions(table)


@contextlib.contextmanager
def _outside_dynamo():
    """The dump exports while Dynamo is compiling; torch.export must not see Dynamo's tracing context."""
    from torch._guards import tracing

    with tracing(None):
        yield


@contextlib.contextmanager
def _capture_final_graphs():
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


def _final_graph(model: torch.nn.Module, example_inputs: Sequence, options: Optional[dict]) -> tuple:
    """Compile ``model`` with the optgptq backend (one graph: fullgraph) and return its final graph and inputs."""
    compiled = torch.compile(model, backend="optgptq", options=options or {}, fullgraph=True, dynamic=False)
    with _capture_final_graphs() as graphs, torch.no_grad():
        compiled(*example_inputs)
    if len(graphs) != 1:
        raise ValueError(f"export_mlir: compiling the model gave {len(graphs)} optimized graphs, expected 1 (0: the "
                         "backend fell back, see the log, or Dynamo reused an earlier compile: torch._dynamo.reset())")
    return graphs[0]


def export_mlir(
    graph_module_or_model: torch.nn.Module,
    example_inputs: Sequence[Any],
    output_type: str = "raw",
    options: Optional[dict] = None,
):
    """The optimized graph as a torch-mlir ``Module`` (``str(module)`` is its text).

    ``graph_module_or_model``: a final graph of the optgptq backend (an ``fx.GraphModule`` with the example inputs
    the backend received) or an ``nn.Module``, which is compiled with ``backend="optgptq"`` and ``options`` and
    called once on ``example_inputs`` to get that graph. ``output_type``: ``"raw"`` (custom ops kept as
    ``torch.operator``), ``"torch"`` or ``"linalg-on-tensors"`` (optgptq ops decomposed; the module verifies).
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"export_mlir: output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
    torch_mlir_fx = _torch_mlir_fx()
    gm, inputs = graph_module_or_model, list(example_inputs)
    if not isinstance(gm, fx.GraphModule):
        if not isinstance(gm, torch.nn.Module):
            raise ValueError(f"export_mlir: expected an fx.GraphModule or nn.Module, got {type(gm).__name__}")
        gm, inputs = _final_graph(gm, inputs, options)
    program = export_program(gm, inputs, decompose=output_type != "raw")
    return torch_mlir_fx.export_and_import(program, output_type=output_type, decomposition_table={})


# ---- execution of a linalg-on-tensors module (a second, independent check of the lowered graph) -----------------

_LOWER_TO_LOOPS = ",".join([
    "func.func(linalg-generalize-named-ops)",
    "one-shot-bufferize{bufferize-function-boundaries function-boundary-type-conversion=identity-layout-map}",
])
_LOWER_TO_LLVM = ",".join([
    "func.func(convert-linalg-to-loops)", "func.func(lower-affine)", "convert-scf-to-cf", "func.func(arith-expand)",
    "expand-strided-metadata", "lower-affine",  # expand-strided-metadata makes affine.apply for dynamic sizes
    "finalize-memref-to-llvm", "convert-math-to-llvm", "convert-math-to-libm",
    "convert-arith-to-llvm", "convert-func-to-llvm", "convert-cf-to-llvm", "reconcile-unrealized-casts",
])


def _walk(op):
    """Every operation nested in ``op``, depth first."""
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk(child.operation)


def _ops_named(op, name: str) -> list:
    return [o for o in _walk(op) if o.name == name]


def run_linalg(module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Execute a ``linalg-on-tensors`` module from ``export_mlir`` on the CPU with MLIR's ExecutionEngine (JIT via
    LLVM, plain loops) and return its results. Consumes ``module`` (lowered in place).

    The pipeline is upstream MLIR only, as the torch-mlir wheel registers it in Python: bufferize, turn
    ``memref.copy`` into ``linalg.copy`` (the JIT has no ``memrefCopy`` runtime library), loops, LLVM. Graphs with
    ``tm_tensor`` ops (the paged graphs' scatter) need torch-mlir's RefBackend passes and are refused."""
    import ctypes

    import numpy as np
    from torch_mlir import ir
    from torch_mlir.dialects import linalg
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.passmanager import PassManager
    from torch_mlir.runtime import as_ctype, get_ranked_memref_descriptor, make_nd_memref_descriptor
    from torch_mlir.runtime import ranked_memref_to_numpy

    (func,) = _ops_named(module.operation, "func.func")
    if any(o.name.startswith("tm_tensor.") for o in _walk(module.operation)):
        raise ValueError("run_linalg: the module has tm_tensor ops (scatter), which need torch-mlir's RefBackend")
    numpy_types = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i64": np.int64, "i32": np.int32,
                   "i8": np.int8, "i1": np.bool_}
    with module.context, ir.Location.unknown():
        func_type = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value)
        results = [ir.RankedTensorType(t) for t in func_type.results]
        num_args = len(func_type.inputs)
        unsupported = sorted({str(r.element_type) for r in results} - set(numpy_types))
        if unsupported:
            raise ValueError(f"run_linalg: result element types {unsupported} have no numpy type (bf16: export fp32)")
        func.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
        PassManager.parse(f"builtin.module({_LOWER_TO_LOOPS})").run(module.operation)
        for copy in _ops_named(module.operation, "memref.copy"):
            with ir.InsertionPoint(copy):
                linalg.copy(copy.operands[0], outs=[copy.operands[1]])
            copy.erase()
        PassManager.parse(f"builtin.module({_LOWER_TO_LLVM})").run(module.operation)
    engine = ExecutionEngine(module, opt_level=2)

    descriptors = [make_nd_memref_descriptor(len(r.shape), as_ctype(numpy_types[str(r.element_type)]))()
                   for r in results]

    class Results(ctypes.Structure):  # the C interface returns all results through one struct pointer
        _fields_ = [(f"r{i}", type(d)) for i, d in enumerate(descriptors)]

    def as_array(t: torch.Tensor) -> np.ndarray:
        if t.untyped_storage().nbytes() < t.numel() * t.element_size():  # a released dense weight (unused): zeros
            t = torch.zeros(t.shape, dtype=t.dtype)
        return np.ascontiguousarray(t.detach().cpu().numpy())

    values = _concrete_inputs(inputs)
    if len(values) != num_args:  # sizes of a specialized export were folded into the module: tensors only
        values = [v for v in values if isinstance(v, torch.Tensor)]
    if len(values) != num_args:
        raise ValueError(f"run_linalg: the module takes {num_args} arguments, got {len(values)} inputs")
    arrays = [as_array(v) for v in values if isinstance(v, torch.Tensor)]  # alive until the call returns
    tensors = iter(arrays)
    args = [ctypes.pointer(ctypes.pointer(get_ranked_memref_descriptor(next(tensors)))) if isinstance(v, torch.Tensor)
            else ctypes.pointer(ctypes.c_int64(int(v))) for v in values]  # a dynamic size: an i64 argument
    out = descriptors[0] if len(descriptors) == 1 else Results()
    engine.invoke("main", ctypes.pointer(ctypes.pointer(out)), *args)
    views = [out] if len(descriptors) == 1 else [getattr(out, f"r{i}") for i in range(len(descriptors))]
    return [torch.from_numpy(ranked_memref_to_numpy(ctypes.pointer(v)).copy()) for v in views]


def mlir_text(module, elide: bool = True) -> str:
    """MLIR text; ``elide`` shortens weight literals to ``__elided__`` (dumps of real models stay small)."""
    limit = 16 if elide else None
    return module.operation.get_asm(large_elements_limit=limit, large_resource_limit=limit)


def mlir_dump(gm: fx.GraphModule, example_inputs: Sequence, dumper) -> None:
    """Called by the backend on every final graph: hands it to ``export_mlir`` captures, and when dumping, writes
    ``final.raw.mlir`` and ``final.linalg.mlir`` (or ``final.mlir.txt`` saying why one is missing)."""
    if _captured is not None:
        _captured.append((gm, list(example_inputs)))
    if not dumper.enabled:
        return
    if not torch_mlir_available():
        dumper.write_text("final.mlir.txt", f"No MLIR dump: torch-mlir is not installed. Install it with:\n"
                                            f"    {INSTALL_HINT}\n")
        return
    notes = []
    for output_type, filename in (("raw", "final.raw.mlir"), ("linalg-on-tensors", "final.linalg.mlir")):
        try:
            dumper.write_text(filename, mlir_text(export_mlir(gm, example_inputs, output_type)))
        except Exception as exc:  # a dump must never break compilation
            log.warning("optgptq: MLIR export (%s) of graph failed: %s: %s", output_type, type(exc).__name__, exc)
            notes.append(f"{output_type}: {type(exc).__name__}: {exc}")
    if notes:
        dumper.write_text("final.mlir.txt", "MLIR export failed:\n" + "\n".join(notes) + "\n")


__all__: list[str] = ["export_mlir", "mlir_dump", "mlir_text", "run_linalg", "decompose_gptq_linear", "unpack_last_dim",
                      "export_program", "torch_mlir_available", "INSTALL_HINT", "OUTPUT_TYPES"]
