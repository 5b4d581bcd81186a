"""MLIR export (torch-mlir): raw keeps the optgptq ops, lowered forms decompose them and verify, the decomposed
gptq_linear computes what the op computes, dumps carry .mlir files."""

import re
import sys
from typing import Optional

import pytest
import torch
import torch.fx as fx

import optgptq_compile
from optgptq_compile import mlir
from optgptq_compile.dump import GraphDumper
from optgptq_compile.quant.format import default_g_idx, pack_weight
from tests.models import tiny_bloom, tiny_llama

needs_torch_mlir = pytest.mark.skipif(
    not mlir.torch_mlir_available(), reason=f"torch-mlir is not installed ({mlir.INSTALL_HINT})"
)
OPTIONS = {"bits": 4, "group_size": 32}
# q, k, v, o, gate, up, down (lm_head stays dense: the pass skips it), as 4 calls: fuse_projections (on by default)
# merges q/k/v and gate/up, which share their inputs, and splits the wider outputs with aten.split_with_sizes
GPTQ_CALLS_PER_LAYER = 4
LAYERS = 1  # one decoder layer holds every op kind; more only cost test time


@pytest.fixture(scope="module")
def llama_graphs():
    """The optgptq final graphs of a tiny Llama's generate(): prefill (static), first decode, dynamic decode."""
    torch._dynamo.reset()
    model = tiny_llama(layers=LAYERS)
    model.forward = torch.compile(model.forward, backend="optgptq", options=OPTIONS)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))  # random tokens, not pads
    with mlir._capture_final_graphs() as graphs, torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    torch._dynamo.reset()
    return graphs


def operators(text: str) -> list[str]:
    return re.findall(r'torch\.operator "([^"]+)"', text)


def linear_ops(ops: list[str]) -> int:
    """gptq_linear calls, with or without an RMSNorm / residual folded in (the fuse_norm_residual pass)."""
    return ops.count("torch.optgptq.gptq_linear") + ops.count("torch.optgptq.gptq_linear_fused")


@needs_torch_mlir
def test_raw_keeps_custom_ops(llama_graphs):
    gm, inputs = llama_graphs[0]
    text = str(optgptq_compile.export_mlir(gm, inputs, "raw"))
    ops = operators(text)
    assert linear_ops(ops) == GPTQ_CALLS_PER_LAYER * LAYERS
    assert ops.count("torch.optgptq.gptq_linear_fused") == GPTQ_CALLS_PER_LAYER * LAYERS  # each has a norm or residual
    assert ops.count("torch.optgptq.attention") == LAYERS
    assert "func.func @main" in text


@needs_torch_mlir
def test_torch_form_has_no_custom_ops(llama_graphs):
    gm, inputs = llama_graphs[0]
    module = optgptq_compile.export_mlir(gm, inputs, "torch")
    text = str(module)
    assert module.operation.verify()
    assert operators(text) == []
    assert "torch.aten.bitwise_right_shift.Tensor" in text  # the unpacking of the GPTQ words


@needs_torch_mlir
def test_decomposed_graph_matches_compiled_graph(llama_graphs):
    """The whole prefill graph with gptq_linear and attention decomposed computes the same logits."""
    gm, inputs = llama_graphs[0]
    program = mlir.export_program(gm, inputs, decompose=True)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "optgptq" in t], targets
    with torch.no_grad():
        expected = gm(*inputs)[0]
        got = program.module()(*inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_torch_mlir
def test_linalg_form_verifies_and_executes_like_compiled_graph(llama_graphs):
    """The linalg-on-tensors module of the prefill graph has only linalg-level ops, verifies, and, run by MLIR's
    ExecutionEngine, gives the logits (and the K/V the graph returns) of the compiled FX graph."""
    gm, inputs = llama_graphs[0]
    module = optgptq_compile.export_mlir(gm, inputs, "linalg-on-tensors")
    text = str(module)
    assert module.operation.verify()
    assert operators(text) == []
    assert not re.search(r"\btorch\.", text.split("\n", 1)[1]), "torch dialect ops left after linalg lowering"
    assert "linalg.generic" in text
    assert "linalg.matmul" in text or "linalg.batch_matmul" in text
    assert "arith.shrsi" in text and "arith.andi" in text  # unpack bits survived as integer ops
    outputs = mlir.run_linalg(module, inputs)
    with torch.no_grad():
        expected = gm(*inputs)
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_torch_mlir
def test_bloom_alibi_graph_lowers():
    """BLOOM: the fused QKV linear and attention with ALiBi slopes (a get_attr buffer) lower to linalg, and the
    decomposed graph computes what the compiled graph computes."""
    model = tiny_bloom(layers=1)
    model.forward = torch.compile(model.forward, backend="optgptq", options=OPTIONS)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with mlir._capture_final_graphs() as graphs, torch.no_grad():
        model(ids)
    gm, inputs = graphs[0]
    raw = operators(str(optgptq_compile.export_mlir(gm, inputs, "raw")))
    assert raw.count("torch.optgptq.attention") == 1 and raw.count("torch.optgptq.gptq_linear") == 4
    linalg = optgptq_compile.export_mlir(gm, inputs, "linalg-on-tensors")
    assert linalg.operation.verify() and operators(str(linalg)) == []
    program = mlir.export_program(gm, inputs, decompose=True)  # executing it in MLIR too would add ~5 s of JIT
    with torch.no_grad():
        for got, want in zip(program.module()(*inputs), gm(*inputs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_torch_mlir
def test_dynamic_graph_keeps_dynamic_sizes(llama_graphs):
    """generate()'s third graph has symbolic sizes (the cache length): they stay dynamic (``?``, i64 arguments),
    the lowered module verifies, and executing it gives the compiled graph's outputs."""
    gm, inputs = llama_graphs[-1]
    assert any(isinstance(v, torch.SymInt) for v in inputs), "expected a dynamic-shape graph from generate()"
    module = optgptq_compile.export_mlir(gm, inputs, "linalg-on-tensors")
    assert module.operation.verify() and operators(str(module)) == []
    signature = next(line for line in str(module).splitlines() if "func.func @main" in line)
    assert "x?x" in signature and ": i64" in signature
    outputs = mlir.run_linalg(module, inputs)
    with torch.no_grad():
        expected = gm(*mlir._concrete_inputs(inputs))
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


BITS = [2, 3, 4, 8]  # 3: values straddle int32 words (the int64 bit-stream path)


class GPTQLinear(torch.nn.Module):
    """One optgptq::gptq_linear over random packed tensors held as buffers (get_attr, like the backend's)."""

    def __init__(self, n: int, k: int, bits: int, group_size: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        groups = -(-k // group_size)
        q = torch.randint(0, 2**bits, (n, k), generator=g)
        zeros = torch.randint(0, 2**bits, (groups, n), generator=g)
        scales = torch.rand(groups, n, generator=g) * 0.02 + 0.005
        g_idx = default_g_idx(k, group_size)[torch.randperm(k, generator=g)]  # act-order: groups scattered over K
        w = pack_weight(q, zeros, scales, g_idx, bits, group_size)
        for name, t in w.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", torch.randn(n, generator=g))
        self.bits, self.group_size = bits, group_size

    def forward(self, x):
        return torch.ops.optgptq.gptq_linear(
            x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bias, self.bits, self.group_size
        )


@needs_torch_mlir
@pytest.mark.parametrize("bits", BITS)
def test_decomposed_gptq_linear_matches_op(bits):
    # K = 96: three groups of 32, a whole number of 3-bit runs; N = 40: qzeros' last word is partly padding
    n, k = 40, 96
    gm = fx.symbolic_trace(GPTQLinear(n, k, bits, group_size=32))
    x = torch.randn(2, 5, k)  # [B, S, K]: the activation shape of a prefill
    program = mlir.export_program(gm, [x], decompose=True)
    assert not [n_ for n_ in program.graph.nodes if "optgptq" in str(n_.target)]
    expected = gm(x)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
    module = optgptq_compile.export_mlir(gm, [x], "linalg-on-tensors")
    assert module.operation.verify() and operators(str(module)) == []
    (executed,) = mlir.run_linalg(module, [x])  # the lowered module itself, JIT-compiled by MLIR
    torch.testing.assert_close(executed, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_unpack_last_dim_matches_packing(bits):
    """The MLIR-friendly unpacking (torch.bitwise_* only) against the packing module's own unpack."""
    from optgptq_compile.quant.packing import pack_cols, unpack_cols

    values = torch.randint(0, 2**bits, (6, 64), generator=torch.Generator().manual_seed(bits))
    packed = pack_cols(values, bits)  # int32 [6, 64*bits/32]
    assert torch.equal(mlir.unpack_last_dim(packed, bits), unpack_cols(packed, bits))
    assert torch.equal(mlir.unpack_last_dim(packed, bits)[:, :64], values.to(torch.int32))


@needs_torch_mlir
def test_paged_attention_lowers():
    """paged_attention (when the paged-KV pass puts it in a graph) exports to linalg and keeps its numerics."""

    class Paged(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, block_tables, context_lens):
            return torch.ops.optgptq.paged_attention(q, k_cache, v_cache, block_tables, context_lens, None, True, 0.25)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)  # decode: B=2, Hq=4 over Hkv=2, one query each
    k_cache, v_cache = torch.randn(2, 6, 4, 2, 16, generator=g)  # [blocks=6, block_size=4, Hkv=2, D=16]
    block_tables = torch.tensor([[0, 3], [5, 1]], dtype=torch.int32)
    context_lens = torch.tensor([7, 5], dtype=torch.int32)  # both sequences span two blocks, second not full
    inputs = [q, k_cache, v_cache, block_tables, context_lens]
    gm = fx.symbolic_trace(Paged())
    program = mlir.export_program(gm, inputs, decompose=True)
    torch.testing.assert_close(program.module()(*inputs), gm(*inputs), rtol=1e-5, atol=1e-5)
    module = optgptq_compile.export_mlir(gm, inputs, "linalg-on-tensors")
    assert module.operation.verify() and operators(str(module)) == []


@needs_torch_mlir
def test_export_from_model_and_dump(tmp_path):
    """export_mlir(model, inputs) compiles the model itself; dumps carry the raw and linalg MLIR."""
    model = tiny_llama(layers=1)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    text = str(optgptq_compile.export_mlir(model, (ids,), "raw", options={**OPTIONS, "dump_dir": str(tmp_path)}))
    assert linear_ops(operators(text)) == GPTQ_CALLS_PER_LAYER
    (dump,) = tmp_path.glob("graph_*")  # one graph; its number counts every graph compiled in this process
    raw, linalg = (dump / "final.raw.mlir").read_text(), (dump / "final.linalg.mlir").read_text()
    assert "torch.optgptq.gptq_linear" in raw
    assert "linalg.generic" in linalg and "torch.operator" not in linalg
    assert not (dump / "final.mlir.txt").exists()


def test_dump_says_how_to_install_when_torch_mlir_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(mlir, "torch_mlir_available", lambda: False)
    gm = fx.symbolic_trace(torch.nn.Linear(4, 4))
    mlir.mlir_dump(gm, [torch.randn(1, 4)], GraphDumper(str(tmp_path), 0))
    note = (tmp_path / "graph_000" / "final.mlir.txt").read_text()
    assert "pip install torch-mlir" in note
    assert not list(tmp_path.glob("graph_000/*.mlir"))


def test_missing_torch_mlir_raises_import_error_with_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)  # makes `import torch_mlir` fail
    gm = fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(ImportError, match="pip install torch-mlir"):
        optgptq_compile.export_mlir(gm, [torch.randn(1, 4)])


def test_bad_output_type_is_a_value_error():
    with pytest.raises(ValueError, match="output_type"):
        optgptq_compile.export_mlir(torch.nn.Linear(4, 4), [torch.randn(1, 4)], "tosa")


# the pool-writing op each form of the graph holds: rope_paged_attention (fuse_rope_attention, the default), or
# rope_kv_write followed by paged_attention when that pass is off
PAGED_GRAPH_OPS = {True: {"optgptq.rope_paged_attention.default"},
                   False: {"optgptq.rope_kv_write.default", "optgptq.paged_attention.default"}}


@needs_torch_mlir
@pytest.mark.parametrize("fuse_rope_attention", [True, False])
def test_paged_runtime_graph_exports_with_cache_updates(fuse_rope_attention):
    """optgptq_compile.generate's graphs hold rope_paged_attention, or rope_kv_write and paged_attention (both mutate
    the pools): they export, the raw form keeps paged_attention as an op (the pool write becomes index_put); the
    decomposed program returns the updated pools and computes the same logits and pools as the compiled graph."""
    model = tiny_llama(layers=1)
    options = {**OPTIONS, "fuse_rope_attention": fuse_rope_attention}
    model.forward = torch.compile(model.forward, backend="optgptq", options=options)
    with mlir._capture_final_graphs() as graphs, torch.no_grad():
        optgptq_compile.generate(model, [[5, 6, 7, 8, 9], [10, 11, 12]], max_new_tokens=1)  # ragged prefill only
    gm, inputs = graphs[0]
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {t for t in targets if "optgptq" in t and "gptq_linear" not in t} == PAGED_GRAPH_OPS[fuse_rope_attention]
    raw = operators(str(optgptq_compile.export_mlir(gm, inputs, "raw")))
    assert raw.count("torch.optgptq.paged_attention") == 1
    assert not [op for op in raw if "rope" in op or "kv_write" in op], raw  # mutating ops: index_put, not imported
    linalg = optgptq_compile.export_mlir(gm, inputs, "linalg-on-tensors")
    assert linalg.operation.verify() and operators(str(linalg)) == []

    program = mlir.export_program(gm, inputs, decompose=True)
    mutated = [s.target for s in program.graph_signature.output_specs if s.kind.name == "USER_INPUT_MUTATION"]
    assert len(mutated) == 2, mutated  # the K and V pools of the one layer

    def is_pool(x):  # the [blocks, block_size, Hkv, D] K/V pools; parameters are shared, released ones have no data
        return isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) and x.dim() == 4

    def fresh():  # empty pools (the generate run filled the live ones): the prefill must write the prompts' K/V
        return [torch.zeros_like(x) if is_pool(x) else x.clone() if isinstance(x, torch.Tensor)
                and not isinstance(x, torch.nn.Parameter) else x for x in mlir._concrete_inputs(inputs)]

    expected_in, got_in, before = fresh(), fresh(), fresh()
    with torch.no_grad():
        expected = gm(*expected_in)[0]
        got = program.module()(*got_in)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    pools = [(a, b, c) for a, b, c in zip(got_in, expected_in, before) if is_pool(a)]
    assert len(pools) == 2
    for a, b, c in pools:
        assert not torch.equal(b, c)  # the prefill wrote the prompts' K/V
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a == 0, b == 0)  # same slots written, same slots left empty


@torch.library.custom_op("optgptq_test::gptq_linear_variant", mutates_args=())
def _gptq_linear_variant(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                         g_idx: torch.Tensor, bias: Optional[torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """Stands in for a Triton kernel variant (same schema as optgptq::gptq_linear), which a CPU test cannot build."""
    return torch.ops.optgptq.gptq_linear(x, qweight, qzeros, scales, g_idx, bias, bits, group_size)


@_gptq_linear_variant.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], scales.shape[-1])


@needs_torch_mlir
def test_kernel_variants_export_as_their_base_op(monkeypatch):
    """A GPU graph calls kernel variants (select_kernels); the MLIR shows the base op, and lowers like it."""
    from optgptq_compile import lowering

    variant = torch.ops.optgptq_test.gptq_linear_variant.default
    monkeypatch.setitem(lowering.KERNEL_VARIANTS, torch.ops.optgptq.gptq_linear.default, {"triton": variant})
    gm = fx.symbolic_trace(GPTQLinear(40, 64, 4, 32))
    for node in gm.graph.nodes:
        if node.target == torch.ops.optgptq.gptq_linear.default:
            node.target = variant
    gm.recompile()
    x = torch.randn(3, 64)
    assert operators(str(optgptq_compile.export_mlir(gm, [x], "raw"))) == ["torch.optgptq.gptq_linear"]
    assert operators(str(optgptq_compile.export_mlir(gm, [x], "linalg-on-tensors"))) == []
