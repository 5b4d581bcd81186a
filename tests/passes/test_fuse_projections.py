"""fuse_projections: hand-built graphs (fused numerics, a view the column slice breaks, every reason not to fuse),
tiny Llama / BLOOM compiled with fusion on and off (logits, greedy tokens of HF and paged generate, node counts,
quantized bytes, the separate copies freed), act-order weights, fusion turned off after it was on, the Triton
kernels on fused act-order calls (interpreter), the option."""

import dataclasses
import gc
import weakref

import pytest
import torch
import torch.fx as fx

import optgptq_compile
from optgptq_compile.config import parse_options
from optgptq_compile.context import PassContext
from optgptq_compile.passes.fuse_projections import fuse_projections
from optgptq_compile.passes.quantize_linear import quantize_linear
from optgptq_compile.quant import cache
from optgptq_compile.quant.rtn import quantize_rtn
from tests.lowering.interpreter import run_in_interpreter
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

GPTQ = torch.ops.optgptq.gptq_linear.default
FUSED = torch.ops.optgptq.gptq_linear_fused.default  # after fuse_norm_residual: a gptq_linear with norm / residual


def linear_calls(gm) -> int:
    """gptq_linear calls in a graph, with or without a norm / residual folded in."""
    targets = call_targets(gm)
    return targets.count(GPTQ) + targets.count(FUSED)
LINEAR = torch._C._nn.linear
OPTIONS = {"bits": 4, "group_size": 32, "strict": True}
LAYERS = 2
PER_LAYER_UNFUSED, PER_LAYER_FUSED = 7, 4  # q,k,v,o,gate,up,down -> qkv,o,gate_up,down


# ------------------------------------------------------------------------------------------ hand-built graphs


def _sibling_graph(biases: tuple[bool, bool, bool]):
    """x -> q/k/v linears (N = 64/32/32 over K = 64, like GQA 4/2) whose outputs are used through views, one of
    which (q.view(-1)) merges the last dimension and would fail on a column slice of the fused output."""
    g = fx.Graph()
    x = g.placeholder("x")
    ws = [g.placeholder(f"w{i}") for i in range(3)]
    bs = [g.placeholder(f"b{i}") if has else None for i, has in enumerate(biases)]
    q, k, v = (g.call_function(LINEAR, (x, w, b)) for w, b in zip(ws, bs))
    flat_q = g.call_method("view", (q, -1))
    k1 = g.call_function(torch.add, (k, 1.0))
    v4 = g.call_method("transpose", (g.call_method("view", (v, 2, 3, 2, -1)), 1, 2))
    g.output((flat_q, k1, v4))
    return fx.GraphModule(torch.nn.Module(), g)


def _setup(outs=(64, 32, 32), biases=(True, True, True), ws=None, **options):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=g)  # [B, S, K]
    ws = ws or [torch.nn.Parameter(torch.randn(n, 64, generator=g)) for n in outs]
    bs = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in outs]
    gm = _sibling_graph(biases)
    inputs = [x, *ws, *[b for b, has in zip(bs, biases) if has]]
    ctx = PassContext(config=parse_options({**OPTIONS, **options}), example_inputs=inputs)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    ctx.placeholder_values = dict(zip(names, inputs))
    ctx.placeholder_fqns = {f"w{i}": f"attn.{p}_proj.weight" for i, p in enumerate("qkv")}
    return gm, ctx, inputs, ws


def _quantize_then_fuse(gm, ctx, inputs):
    assert quantize_linear(gm, ctx)
    before = gm(*inputs)
    changed = fuse_projections(gm, ctx)
    after = gm(*inputs)
    for a, b in zip(after, before, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # same dequantized columns, same matmul
    return changed


def test_siblings_fuse_into_one_call_with_the_same_outputs():
    gm, ctx, inputs, ws = _setup()
    assert _quantize_then_fuse(gm, ctx, inputs)
    (call,) = [n for n in gm.graph.nodes if n.target is GPTQ]
    assert call.args[2].meta["val"].shape == (64 // 32, (64 + 32 + 32) * 4 // 32)  # qzeros [G, N*bits/32]
    assert "reshape" in gm.code and ".view(" not in gm.code  # the view over a column slice became a reshape
    assert optgptq_compile.stats()["projections_fused"] == 3
    assert optgptq_compile.stats()["linear_rewritten"] == 3  # still the number of linears quantized
    (line,) = [r for r in ctx.report if r.pass_name == "fuse_projections"]
    assert line.matched and "attn.q_proj.weight + attn.k_proj.weight + attn.v_proj.weight" in line.detail
    # the graph holds the fused tensors only; each parameter's cache entry is a view of them
    assert sum(name.startswith("_optgptq_") for name, _ in gm.named_buffers()) == 5  # 4 weight tensors + bias
    fused = cache.lookup_fused(ws, ctx.config.quant_key())
    views = [cache.lookup(w, ctx.config.quant_key()) for w in ws]
    assert all(v.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr() for v in views)


def _act_order_like(w, config):
    """The RTN weight of ``w`` with its input channels' groups scattered, as GPTQ's act-order leaves them."""
    qw = quantize_rtn(w.detach(), config.bits, config.group_size, config.sym)
    perm = torch.randperm(qw.in_features, generator=torch.Generator().manual_seed(1))
    return dataclasses.replace(qw, g_idx=qw.g_idx[perm].contiguous())


@pytest.mark.parametrize("case,reason", [
    ("g_idx", "different g_idx"),
    ("bits", "8-bit g32 while a sibling is 4-bit g32"),
    ("bias", "a bias on some of the projections only"),
    ("packing", "out_features=16 at 3 bits does not fill whole int32 words"),  # 48 bits: qzeros packs along N
])
def test_a_sibling_that_cannot_share_the_call_stays_alone_with_a_reason(case, reason):
    outs = (64, 32, 16) if case == "packing" else (64, 32, 32)
    biases = (False, False, True) if case == "bias" else (False, False, False)
    gm, ctx, inputs, ws = _setup(outs, biases, **({"bits": 3} if case == "packing" else {}))
    key = ctx.config.quant_key()
    if case == "g_idx":
        cache.store(ws[2], key, _act_order_like(ws[2], ctx.config))
    elif case == "bits":  # e.g. a checkpoint with a more sensitive layer kept at 8 bits
        cache.store(ws[2], key, quantize_rtn(ws[2].detach(), 8, 32, True))
    assert _quantize_then_fuse(gm, ctx, inputs)
    assert linear_calls(gm) == 2  # q and k fused, v alone
    assert optgptq_compile.stats()["projections_fused"] == 2
    (skip,) = [r for r in ctx.report if r.pass_name == "fuse_projections" and not r.matched]
    assert reason in skip.detail


def test_a_later_graph_that_leaves_a_fused_weight_alone_gives_it_a_contiguous_copy():
    """The cache holds views of the fused tensors once a graph fused them; a graph grouping the same weights
    differently (here v gains a bias) must not hand a column-slice view to a kernel that assumes contiguous rows."""
    gm, ctx, inputs, ws = _setup(biases=(False, False, False))
    assert _quantize_then_fuse(gm, ctx, inputs)
    gm, ctx, inputs, _ = _setup(biases=(False, False, True), ws=ws)
    assert not cache.lookup(ws[2], ctx.config.quant_key()).qweight.is_contiguous()
    assert _quantize_then_fuse(gm, ctx, inputs)
    assert linear_calls(gm) == 2  # q+k fused again (a new pair), v alone
    assert all(b.is_contiguous() for _, b in gm.named_buffers())


def test_weights_that_are_graph_inputs_are_not_fused():
    """A loaded checkpoint's GPTQLinear buffers reach the graph as inputs: nothing to concatenate at compile time."""
    g = fx.Graph()
    x, *tensors = (g.placeholder(n) for n in ("x", "qw", "qz", "sc", "gi"))
    outs = [g.call_function(GPTQ, (x, *tensors, None, 4, 32)) for _ in range(2)]
    g.output(tuple(outs))
    gm = fx.GraphModule(torch.nn.Module(), g)
    ctx = PassContext(config=parse_options(OPTIONS), example_inputs=[])
    assert not fuse_projections(gm, ctx)
    assert linear_calls(gm) == 2
    assert all("graph inputs, not constants" in r.detail for r in ctx.report) and len(ctx.report) == 2


# ------------------------------------------------------------------------------------------ compiled models


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _quantized_bytes(model, graphs) -> int:
    """Bytes of every storage holding packed GPTQ tensors that the compiled graphs or the cache keep alive."""
    held = [b for gm in graphs for name, b in gm.named_buffers() if name.startswith("_optgptq_")]
    held = [t for t in held if t.dtype == torch.int32 or t.dim() == 2]  # packed ints and scales; not a fused bias
    cached = [t for p in model.parameters() for qw in cache._cache.get(p, {}).values() for t in qw.tensors().values()]
    return sum(_storages(held + cached).values())


def _run_llama(fuse: bool) -> dict:
    """HF greedy generate (prefill, first decode, dynamic-shape decode graphs) of a tiny Llama, fusion on or off."""
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    model = tiny_llama(layers=LAYERS)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    originals = []  # weak references to the separately quantized weights, to see them freed

    def spy(param, key, qw):  # called once per new quantization (``cache.fuse`` rebinds entries without it)
        originals.append(weakref.ref(qw.qweight))
        real_store(param, key, qw)

    real_store = cache.store
    with pytest.MonkeyPatch.context() as mp, recording() as graphs, torch.no_grad():
        mp.setattr(cache, "store", spy)
        model.forward = torch.compile(model.forward, backend="optgptq", options={**OPTIONS, "fuse_projections": fuse})
        out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    gc.collect()
    return dict(model=model, graphs=graphs, tokens=out.sequences, logits=torch.stack(out.logits),
                stats=optgptq_compile.stats(),
                bytes=_quantized_bytes(model, graphs), alive=sum(r() is not None for r in originals),
                weight_bytes=optgptq_compile.weight_bytes(model))


@pytest.fixture(scope="module")
def llama():
    return {fuse: _run_llama(fuse) for fuse in (False, True)}


def test_llama_fused_gives_the_same_logits_and_greedy_tokens(llama):
    off, on = llama[False], llama[True]
    assert on["logits"].shape == (6, 1, 128)  # every step: prefill, first decode, dynamic-shape decodes
    torch.testing.assert_close(on["logits"], off["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(on["tokens"], off["tokens"])
    assert on["stats"]["fallbacks"] == 0 and on["stats"]["graphs_compiled"] == 3


def test_llama_layers_have_four_gptq_linears_instead_of_seven(llama):
    for fuse, per_layer in ((False, PER_LAYER_UNFUSED), (True, PER_LAYER_FUSED)):
        run = llama[fuse]
        counts = [linear_calls(gm) for gm in run["graphs"]]
        assert counts == [per_layer * LAYERS] * 3
        assert run["stats"]["linear_rewritten"] == 3 * PER_LAYER_UNFUSED * LAYERS  # linears quantized, per graph
    assert llama[True]["stats"]["projections_fused"] == 3 * 5 * LAYERS  # q,k,v + gate,up in each of 3 graphs
    assert "projections_fused" not in llama[False]["stats"]


def test_llama_fused_weights_take_no_more_bytes_and_the_separate_copies_are_freed(llama):
    off, on = llama[False], llama[True]
    g_idx_bytes = 64 * 4  # one int32 [K] per weight: q,k,v share one, gate,up share one -> 3 fewer per layer
    assert off["bytes"] - on["bytes"] == 3 * LAYERS * g_idx_bytes
    assert off["weight_bytes"] - on["weight_bytes"] == 3 * LAYERS * g_idx_bytes  # a fused storage counted once
    assert off["alive"] == PER_LAYER_UNFUSED * LAYERS  # all quantized once, held by the graphs and the cache
    assert on["alive"] == 2 * LAYERS  # o_proj and down_proj; the fused ones live on only as the fused tensors
    # the three graphs share one copy of each fused weight
    fused = [{b.untyped_storage().data_ptr() for n, b in gm.named_buffers() if "q_proj_k_proj_v_proj_qweight" in n}
             for gm in on["graphs"]]
    assert all(len(f) == LAYERS for f in fused) and fused[0] == fused[1] == fused[2]


def test_paged_generate_gives_the_same_tokens_fused_or_not():
    prompts = [[5, 9, 33, 7, 81], [12], [40, 41, 42, 43, 44, 45, 46, 47, 48]]  # ragged lengths
    outs = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        model = torch.compile(tiny_llama(layers=1), backend="optgptq", options={**OPTIONS, "fuse_projections": fuse})
        with recording() as graphs:
            outs[fuse] = optgptq_compile.generate(model, prompts, [6, 4, 5], block_size=4)
        assert graphs and all(linear_calls(gm) == (PER_LAYER_FUSED if fuse else PER_LAYER_UNFUSED)
                              for gm in graphs)
    assert outs[True] == outs[False]
    assert optgptq_compile.stats()["fallbacks"] == 0


def test_bloom_has_nothing_to_fuse_and_is_unchanged():
    """BLOOM's query_key_value is already one linear and its MLP has no gate: no call shares its input."""
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    logits = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        with recording() as graphs, torch.no_grad():
            compiled = torch.compile(tiny_bloom(layers=LAYERS), backend="optgptq",
                                     options={**OPTIONS, "fuse_projections": fuse})
            logits[fuse] = compiled(ids).logits
        assert linear_calls(graphs[0]) == 4 * LAYERS
    assert torch.equal(logits[True], logits[False])
    assert "projections_fused" not in optgptq_compile.stats()


def test_act_order_weights_fuse_when_g_idx_match_then_fusion_off_reuses_them():
    """GPTQ with act-order: q/k/v (and gate/up) see the same inputs, so one Hessian ordering and equal g_idx: they
    fuse (or, if they did not, are reported). A later compile with fusion off gets the cache's views of the fused
    tensors and must hand its kernels contiguous copies."""
    model = tiny_llama(layers=1)
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    options = {**OPTIONS, "act_order": True, "calibration": calib}
    with recording() as graphs, torch.no_grad():
        on = torch.compile(model, backend="optgptq", options=options)(ids).logits
    g_idx = [b for n, b in graphs[0].named_buffers() if n.endswith("g_idx")]
    assert any(not torch.equal(g.sort().values, g) for g in g_idx)  # act-order did scatter the groups
    fused = optgptq_compile.stats().get("projections_fused", 0)
    skipped = optgptq_compile.stats().get("fuse_projections_skipped", 0)
    assert fused + skipped == 5  # every sibling either fused or reported with its reason
    assert fused == 5 and linear_calls(graphs[0]) == PER_LAYER_FUSED  # what GPTQ gives here
    torch._dynamo.reset()
    with recording() as graphs, torch.no_grad():
        off = torch.compile(model, backend="optgptq", options={**options, "fuse_projections": False})(ids).logits
    assert linear_calls(graphs[0]) == PER_LAYER_UNFUSED
    assert all(b.is_contiguous() for n, b in graphs[0].named_buffers())
    torch.testing.assert_close(off, on, rtol=1e-5, atol=1e-5)


def test_triton_kernels_run_fused_act_order_calls():
    """Prefill and decode through gptq_linear_triton in the interpreter (fuse_projections_triton_cases.py)."""
    run_in_interpreter("tests/passes/fuse_projections_triton_cases.py")


@pytest.mark.parametrize("value", [1, "yes", None])
def test_option_must_be_a_bool(value):
    with pytest.raises(ValueError, match="'fuse_projections'.*expected True or False"):
        parse_options({"fuse_projections": value})
    assert parse_options({"fuse_projections": False}).fuse_projections is False
    assert parse_options({}).fuse_projections is True
