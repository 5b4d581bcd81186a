"""quantize_linear: hand-built graphs, end-to-end compiles through a recording backend, numerics, negatives."""

import pytest
import torch
import torch.fx as fx

import optgptq_compile
from optgptq_compile.config import parse_options
from optgptq_compile.context import PassContext
from optgptq_compile.passes.quantize_linear import quantize_linear
from tests.models import call_targets, recording, sqnr_db, tiny_bloom, tiny_llama

GPTQ = torch.ops.optgptq.gptq_linear.default
FUSED = torch.ops.optgptq.gptq_linear_fused.default  # fuse_norm_residual's form of a gptq_linear
LINEAR = torch._C._nn.linear


def _linear_graph(weight_users: int = 1):
    """placeholder x, placeholder w (a Parameter) -> linear(x, w) [-> extra uses of w]."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    out = g.call_function(LINEAR, (x, w, None))
    if weight_users > 1:
        out = g.call_function(torch.add, (out, g.call_function(torch.sum, (w,))))
    g.output(out)
    return fx.GraphModule(torch.nn.Module(), g)


def _ctx(gm, x, w, fqn="block.proj.weight", **options):
    ctx = PassContext(config=parse_options(options), example_inputs=[x, w])
    ctx.placeholder_values = {"x": x, "w": w}
    ctx.placeholder_fqns = {"w": fqn}
    return ctx


def test_hand_built_graph_is_rewritten_and_exact_to_the_reference():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(96, 64))
    x = torch.randn(3, 64)
    gm = _linear_graph()
    ctx = _ctx(gm, x, w, bits=4, group_size=32)
    assert quantize_linear(gm, ctx)
    assert GPTQ in call_targets(gm) and LINEAR not in call_targets(gm)
    assert optgptq_compile.stats()["linear_rewritten"] == 1 and ctx.dense_to_release == [w]
    qw = optgptq_compile.quant.cache.lookup(w, ctx.config.quant_key())
    torch.testing.assert_close(gm(x, w), x @ qw.dequantize().t(), rtol=1e-5, atol=1e-5)
    assert sqnr_db(x @ w.detach().t(), gm(x, w)) > 15


@pytest.mark.parametrize(
    "case,reason",
    [
        ("lm_head", "output head stays dense"),
        ("tied", "tied weights stay dense"),
        ("not_packable", "cannot be packed at 3 bits"),
        ("not_a_parameter", "not a model parameter"),
    ],
)
def test_negative_cases_stay_dense_with_a_reason(case, reason):
    k = 48 if case == "not_packable" else 64  # 48 * 3 bits = 144, not a whole number of int32 words
    w = torch.nn.Parameter(torch.randn(32, k))
    x = torch.randn(2, k)
    gm = _linear_graph(weight_users=2 if case == "tied" else 1)
    ctx = _ctx(gm, x, w, fqn="lm_head.weight" if case == "lm_head" else "block.proj.weight", bits=3, group_size=16)
    if case == "not_a_parameter":
        ctx.placeholder_values["w"] = w.detach()  # a plain tensor input, e.g. a weight computed outside the model
    assert not quantize_linear(gm, ctx)
    assert LINEAR in call_targets(gm) and GPTQ not in call_targets(gm)
    assert len(ctx.report) == 1 and not ctx.report[0].matched and reason in ctx.report[0].detail
    assert optgptq_compile.stats()["quantize_linear_skipped"] == 1


def test_bits_none_leaves_graph_alone():
    w = torch.nn.Parameter(torch.randn(32, 64))
    gm = _linear_graph()
    assert not quantize_linear(gm, _ctx(gm, torch.randn(1, 64), w, bits=None))
    assert LINEAR in call_targets(gm)


@pytest.mark.parametrize(
    "make,per_layer,calls_per_layer",
    # q,k,v,o,gate,up,down / query_key_value,dense,dense_h_to_4h,dense_4h_to_h; the calls after fuse_projections
    # (on by default) merged q/k/v and gate/up, which share their inputs: the counter still counts linears
    [(tiny_llama, 7, 4), (tiny_bloom, 4, 4)],
    ids=["llama", "bloom"],
)
def test_every_eligible_linear_rewritten_in_compiled_model(make, per_layer, calls_per_layer):
    model = make()
    ids = torch.randint(3, 128, (1, 9))
    with recording() as graphs, torch.no_grad():
        compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32})
        compiled(ids)
    (gm,) = graphs
    targets = call_targets(gm)
    assert targets.count(GPTQ) + targets.count(FUSED) == 2 * calls_per_layer  # two layers
    assert targets.count(LINEAR) == 1  # the lm_head (tied to the embedding in BLOOM)
    assert optgptq_compile.stats()["linear_rewritten"] == 2 * per_layer


@pytest.mark.parametrize("make", [tiny_llama, tiny_bloom], ids=["llama", "bloom"])
@pytest.mark.parametrize("bits,group_size,floor_db", [(8, 128, 30), (4, 32, 15)])  # issue 2's SQNR floors
def test_logits_sqnr_against_dense(make, bits, group_size, floor_db):
    model = make()
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": bits, "group_size": group_size})
        quant = model(ids).logits
    assert optgptq_compile.stats()["linear_rewritten"] > 0
    assert sqnr_db(dense, quant) >= floor_db
