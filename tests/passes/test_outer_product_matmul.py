"""outer_product_matmul: the rotary embedding's [B, D/2, 1] @ [B, 1, S] (transformers 5.17's form) becomes a
broadcast product with bit-identical logits, prefill and paged decode alike; matmuls in every form Dynamo records
with one contracted element are rewritten and compute the same bits, batch broadcasts included; real contractions,
1-D operands, autocast-cast results and unprovable shapes are left alone; BLOOM's one-key attention bmm is still
matched first."""

import operator

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import optgptq_compile
import optgptq_compile.backend as backend
from optgptq_compile.config import OptGPTQConfig
from optgptq_compile.context import PassContext
from optgptq_compile.passes.outer_product_matmul import outer_product_matmul
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm)
LAYERS = 2


class _MatmulRotaryEmbedding(LlamaRotaryEmbedding):
    """transformers 5.17's ``LlamaRotaryEmbedding.forward``, what the H100 image runs: the frequencies as a
    [B, D/2, 1] @ [B, 1, S] matmul. The installed 5.23 writes the broadcast product itself, so a plain tiny Llama
    here has no matmul to rewrite."""

    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1).to(torch.float)
        position_ids_expanded = position_ids[:, None, :].float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (inv_freq_expanded @ position_ids_expanded).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _matmul_rope_llama(**kw):
    model = tiny_llama(layers=LAYERS, **kw)
    model.model.rotary_emb.__class__ = _MatmulRotaryEmbedding
    return model


def _without_the_pass(monkeypatch):
    monkeypatch.setattr(backend, "PASSES", [p for p in backend.PASSES if p is not outer_product_matmul])


def _compile_run(model, ids, **options):
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    with recording() as graphs, torch.no_grad():
        options = {"strict": True, "kernels": "reference", **options}
        logits = torch.compile(model, backend="optgptq", options=options)(ids).logits
    return logits, graphs, optgptq_compile.stats()


def _matmuls(gm: fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in MATMUL_FUNCTIONS
            or n.op == "call_method" and n.target in ("matmul", "bmm")]


@pytest.mark.parametrize("bits", [None, 4], ids=["dense", "int4"])
def test_llama_rotary_matmul_becomes_a_product_with_the_same_logits(bits, monkeypatch):
    model = _matmul_rope_llama()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
    on, graphs, stats = _compile_run(model, ids, bits=bits, group_size=32)
    (gm,) = graphs
    assert stats["outer_product_matmuls"] == 1 and "outer_product_matmul_skipped" not in stats
    assert not _matmuls(gm)
    (product,) = [n for n in gm.graph.nodes if n.target is torch.mul]
    assert product.meta["example_value"].shape == (1, 8, 7)  # [B, D/2, S]: position ids [1, S] when not given
    assert [u.op + ":" + str(u.target) for u in product.users] == ["call_method:transpose"]
    with monkeypatch.context() as m:
        _without_the_pass(m)
        off, graphs_off, _ = _compile_run(model, ids, bits=bits, group_size=32)
    assert len(_matmuls(graphs_off[0])) == 1  # the pipeline alone keeps it: the pass is what removed it
    # one product, one rounding either way: the same bits, not merely close ones
    torch.testing.assert_close(on, off, rtol=0, atol=0)
    if bits is None:  # the attention op against HF's SDPA: the usual fp32 closeness
        torch.testing.assert_close(on, eager, rtol=1e-5, atol=1e-5)


def test_paged_decode_rewrites_every_graph_and_generates_hf_tokens():
    """optgptq_compile.generate compiles prefill and (dynamic-shape) decode graphs, each with its own rotary matmul;
    the RoPE fold into the KV write still happens on the cos/sin the product feeds."""
    model = _matmul_rope_llama()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 1, 9)]
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
               for p in prompts]
    compiled = torch.compile(model, backend="optgptq", options={"bits": None, "strict": True})
    with recording() as graphs:
        out = optgptq_compile.generate(compiled, prompts, 6, block_size=4)
    assert out == ref
    stats = optgptq_compile.stats()
    assert stats["outer_product_matmuls"] == len(graphs) >= 2 and stats["fallbacks"] == 0
    assert stats["rope_kv_write_fused"] == LAYERS * len(graphs)
    assert not any(_matmuls(gm) for gm in graphs)


def test_bloom_one_token_prompt_attention_is_matched_before_its_bmm_could_become_a_product():
    """probabilities [B*H, 1, 1] @ V [B*H, 1, D] contracts one key: had the pass run first, match_attention would
    have lost its bmm (it did, when tried). It runs last, so attention is matched and nothing is left to rewrite."""
    model = tiny_bloom(layers=LAYERS)
    ids = torch.randint(3, 128, (2, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
    logits, graphs, stats = _compile_run(model, ids, bits=None)
    assert stats["attention_rewritten"] == LAYERS and "match_attention_skipped" not in stats
    assert "outer_product_matmuls" not in stats and "outer_product_matmul_skipped" not in stats
    assert torch.ops.optgptq.attention.default in call_targets(graphs[0])
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)


# Unit graphs as Dynamo records them: each form of the product, traced by a backend that keeps the graph.

FORMS = {
    "operator": lambda a, b: a @ b,
    "torch.matmul": torch.matmul,
    "torch.bmm": torch.bmm,
    "method matmul": lambda a, b: a.matmul(b),
    "method bmm": lambda a, b: a.bmm(b),
}
SHAPES = {  # (a, b): a's last and b's second-to-last dims 1
    "batched": ((3, 8, 1), (3, 1, 7)),  # the rotary embedding's [B, D/2, 1] @ [B, 1, S]
    "broadcast batch": ((1, 8, 1), (3, 1, 7)),  # 1 against 3: the product broadcasts it as matmul does
    "2-D": ((8, 1), (1, 7)),
    "4-D both broadcast": ((2, 1, 8, 1), (1, 3, 1, 7)),
    "2-D @ 3-D": ((8, 1), (4, 1, 7)),
}


def _dynamo_graph(fn, *inputs, dynamic=False):
    """(graph Dynamo hands a backend for ``fn(*inputs)``, the backend's example inputs, the compiled ``fn``: it runs
    that graph as it is when called, rewritten or not)."""
    torch._dynamo.reset()
    captured = []

    def keep(gm, example_inputs):
        captured.append((gm, example_inputs))
        return lambda *args: gm(*args)  # late: the pass recompiles gm in place after this returns

    compiled = torch.compile(fn, backend=keep, fullgraph=True, dynamic=dynamic)
    compiled(*inputs)
    (gm, example_inputs), = captured
    return gm, example_inputs, compiled


def _rewrite(gm, example_inputs):
    ctx = PassContext.for_graph(gm, example_inputs, OptGPTQConfig(), 0)
    return outer_product_matmul(gm, ctx), ctx


def _random(*shape, dtype=torch.float32, seed=0):
    """Never zeros (a product of zeros would hide a wrong pairing): normals away from 0, either sign."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x + x.sign() * 0.5).to(dtype) * 3


# bmm takes only 3-D operands of one batch size: the other shapes are for the matmul forms
CASES = [(form, shapes) for form in FORMS for shapes in SHAPES
         if not form.endswith("bmm") or shapes == "batched"]


@pytest.mark.parametrize("form,shapes", CASES)
def test_each_form_with_one_contracted_element_becomes_a_bitwise_equal_product(form, shapes):
    sa, sb = SHAPES[shapes]
    a, b = _random(*sa, seed=1), _random(*sb, seed=2)
    gm, inputs, _ = _dynamo_graph(FORMS[form], a, b)
    assert len(_matmuls(gm)) == 1
    expected = a @ b
    changed, ctx = _rewrite(gm, inputs)
    assert changed and not _matmuls(gm)
    (line,) = ctx.report
    assert line.matched and line.pass_name == "outer_product_matmul"
    (product,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert product.target is torch.mul and product.meta["example_value"].shape == expected.shape
    assert torch.equal(gm(a, b)[0], expected)
    a2, b2 = _random(*sa, seed=3), _random(*sb, seed=4)  # other values through the same graph
    assert torch.equal(gm(a2, b2)[0], a2 @ b2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtypes_are_bitwise_equal_too(dtype):
    a, b = _random(2, 64, 1, dtype=dtype, seed=5), _random(2, 1, 33, dtype=dtype, seed=6)
    gm, inputs, _ = _dynamo_graph(lambda x, y: x @ y, a, b)
    assert _rewrite(gm, inputs)[0]
    assert torch.equal(gm(a, b)[0], a @ b)


def test_dynamic_batch_and_sequence_are_rewritten():
    """Decode graphs are dynamic: [s0, s1, 1] @ [s0, 1, s2], the contracted 1 static (Dynamo specializes size 1)."""
    a, b = _random(3, 8, 1, seed=7), _random(3, 1, 5, seed=8)
    gm, inputs, compiled = _dynamo_graph(lambda x, y: x @ y, a, b, dynamic=True)
    out = _matmuls(gm)[0].meta["example_value"]
    assert all(isinstance(d, torch.SymInt) for d in out.shape)
    assert _rewrite(gm, inputs)[0] and not _matmuls(gm)
    a2, b2 = _random(5, 8, 1, seed=9), _random(5, 1, 11, seed=10)  # other sizes through the same graph
    assert torch.equal(compiled(a2, b2), a2 @ b2)


@pytest.mark.parametrize("fn,sa,sb", [
    (lambda x, y: x @ y, (3, 8, 2), (3, 2, 7)),  # a real contraction: two elements summed
    (torch.bmm, (6, 1, 16), (6, 16, 1)),  # attention-shaped, one query: contracts 16
    (lambda x, y: x @ y, (1,), (1, 7)),  # vector @ matrix: [7], a product would be [1, 7]
    (lambda x, y: x @ y, (8, 1), (1,)),  # matrix @ vector: [8], a product would be [8, 1]
    (torch.matmul, (1,), (1,)),  # a dot: a 0-d result
], ids=["inner 2", "bmm inner 16", "vector @ matrix", "matrix @ vector", "dot"])
def test_contractions_and_vector_operands_are_left_alone(fn, sa, sb):
    a, b = _random(*sa, seed=11), _random(*sb, seed=12)
    gm, inputs, _ = _dynamo_graph(fn, a, b)
    code = gm.code
    assert not _rewrite(gm, inputs)[0]
    assert gm.code == code and len(_matmuls(gm)) == 1
    assert torch.equal(gm(a, b)[0], fn(a, b))


def test_vector_operand_with_one_element_is_reported():
    gm, inputs, _ = _dynamo_graph(lambda x, y: x @ y, _random(1), _random(1, 7))
    changed, ctx = _rewrite(gm, inputs)
    (line,) = ctx.report
    assert not changed and not line.matched and "1-D operand" in line.detail


def test_autocast_cast_result_is_left_alone():
    """Under an enabled autocast the matmul computes in bf16 (its result's dtype says so) and a product would not."""
    a, b = _random(3, 8, 1, seed=13), _random(3, 1, 7, seed=14)

    def fn(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return x @ y

    gm, inputs, _ = _dynamo_graph(fn, a, b)
    changed, ctx = _rewrite(gm, inputs)
    (line,) = ctx.report
    assert not changed and "dtypes torch.float32 @ torch.float32 -> torch.bfloat16" in line.detail
    assert len(_matmuls(gm)) == 1


def _hand_graph(sa, sb, so, target=operator.matmul, **kwargs):
    """a @ b with the given example shapes (ints or SymInts) in node.meta, as a pass sees them."""
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    a.meta["example_value"], b.meta["example_value"] = sa, sb
    out = graph.call_function(target, (a, b), kwargs)
    out.meta["example_value"] = so
    graph.output(out)
    return fx.GraphModule(torch.nn.Module(), graph)


def _symbolic(shape, dynamic):
    """A fake tensor of ``shape`` whose dims at ``dynamic`` are fresh symbols (their own shape env)."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    sizes = [DimDynamic.DYNAMIC if i in dynamic else DimDynamic.STATIC for i in range(len(shape))]
    return mode.from_tensor(torch.empty(shape), symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))


def test_unknown_or_symbolic_contracted_size_is_not_a_candidate():
    a, b = _symbolic((3, 8, 2), {2}), _symbolic((3, 2, 7), {1})  # contracted size a symbol, not a known 1
    for gm in (_hand_graph(a, b, torch.empty(3, 8, 7)), _hand_graph(None, None, None)):
        changed, ctx = _rewrite(gm, [])
        assert not changed and not ctx.report and len(_matmuls(gm)) == 1


def test_batch_dims_of_different_symbols_are_not_provably_the_result_shape():
    a, b = _symbolic((4, 8, 1), {0}), _symbolic((4, 1, 7), {0})  # s0 and s0' of two shape envs: unrelated
    changed, ctx = _rewrite(_hand_graph(a, b, torch.empty(4, 8, 7)), [])
    (line,) = ctx.report
    assert not changed and "not provably" in line.detail


def test_out_keyword_is_left_alone():
    gm = _hand_graph(torch.empty(8, 1), torch.empty(1, 7), torch.empty(8, 7), torch.matmul, out=None)
    changed, ctx = _rewrite(gm, [])
    (line,) = ctx.report
    assert not changed and "keyword arguments ['out']" in line.detail
