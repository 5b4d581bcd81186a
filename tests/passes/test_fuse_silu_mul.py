"""fuse_silu_mul: Llama's silu(gate) * up folds into the fused gate/up gptq_linear_fused (act="silu_mul") with the
same logits, keeping the RMSNorm fuse_norm_residual put there; separate gate and up calls (fuse_projections off)
are reported, not fused; BLOOM's gelu MLP is left alone; a silu output read twice stays."""

import logging
import operator

import pytest
import torch
import torch.fx as fx

import optgptq_compile
from optgptq_compile.config import OptGPTQConfig
from optgptq_compile.context import PassContext
from optgptq_compile.passes.fuse_silu_mul import fuse_silu_mul
from tests.models import call_targets, gptq_linear_node, recording, tiny_bloom, tiny_llama

GPTQ = torch.ops.optgptq.gptq_linear.default
FUSED = torch.ops.optgptq.gptq_linear_fused.default
SILU = torch.nn.functional.silu
LAYERS = 2


def _compile_run(model, **options):
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with recording() as graphs, torch.no_grad():
        compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32, "strict": True,
                                                                     "kernels": "reference", **options})
        logits = compiled(ids).logits
    return logits, graphs, optgptq_compile.stats()


def _silu_mul_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is FUSED
            and n.kwargs.get("act") == "silu_mul"]


@pytest.mark.parametrize("norm", [True, False], ids=["with_norm", "without_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_silu_mul_folds_with_the_same_logits(norm, dtype):
    model = tiny_llama(layers=LAYERS, dtype=dtype)
    off, _, _ = _compile_run(model, fuse_norm_residual=norm, fuse_silu_mul=False)
    on, graphs, stats = _compile_run(model, fuse_norm_residual=norm, fuse_silu_mul=True)
    # the reference op computes silu(gate) * up with HF's ops in the activation dtype: the same rounding
    torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-6)
    (gm,) = graphs
    targets = call_targets(gm)
    assert stats["silu_mul_fused"] == LAYERS and "fuse_silu_mul_skipped" not in stats
    assert SILU not in targets and torch.ops.aten.split_with_sizes.default in targets  # q/k/v's split stays
    calls = _silu_mul_calls(gm)
    assert len(calls) == LAYERS
    for call in calls:
        assert call.args[8] is None  # no residual
        assert call.meta["example_value"].shape == (2, 7, model.config.intermediate_size)
        if norm:  # the gate/up call keeps the post-attention RMSNorm fuse_norm_residual folded in and gains act
            assert call.args[1].op == "placeholder" and "post_attention_layernorm" in call.args[1].name
            assert call.args[2] == pytest.approx(model.config.rms_norm_eps)
        else:  # a plain gptq_linear became gptq_linear_fused with no norm
            assert call.args[1] is None and call.args[2] == 0.0
    # the down projection reads the fused call's output directly
    assert all(any(u.target in (GPTQ, FUSED) for u in call.users) for call in calls)


def test_separate_gate_and_up_calls_are_reported(caplog):
    model = tiny_llama(layers=LAYERS)
    with caplog.at_level(logging.INFO, logger="optgptq_compile"):
        _, graphs, stats = _compile_run(model, fuse_projections=False)
    (gm,) = graphs
    assert "silu_mul_fused" not in stats and not _silu_mul_calls(gm)
    assert SILU in call_targets(gm)
    assert stats["fuse_silu_mul_skipped"] == LAYERS
    assert "gate and up are separate gptq calls" in caplog.text


def test_bloom_is_left_alone():
    _, graphs, stats = _compile_run(tiny_bloom(layers=1))
    assert not _silu_mul_calls(graphs[0])
    assert "silu_mul_fused" not in stats and "fuse_silu_mul_skipped" not in stats


def _mlp_graph(split: str, silu_reused: bool = False, up_first: bool = False):
    """x -> gptq_linear [gate | up] (N 16) -> split -> silu(gate) * up, as a hand-built Dynamo-style graph.

    ``split``: "aten" (fuse_projections' split_with_sizes) or "chunk" (a model's own fused gate_up_proj)."""
    from optgptq_compile.quant.format import default_g_idx, pack_weight

    g = torch.Generator().manual_seed(0)
    w = pack_weight(torch.randint(0, 16, (16, 32), generator=g), torch.full((1, 16), 8, dtype=torch.int64),
                    torch.rand(1, 16, generator=g) / 8, default_g_idx(32, 32), 4, 32)
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["example_value"] = torch.randn(3, 32)
    root = torch.nn.Module()
    y = gptq_linear_node(graph, root, x, w, torch.empty(3, 16))
    if split == "aten":
        parts = graph.call_function(torch.ops.aten.split_with_sizes.default, (y, [8, 8], -1))
    else:
        parts = graph.call_method("chunk", (y, 2), {"dim": -1})
    parts.meta["example_value"] = (torch.empty(3, 8), torch.empty(3, 8))
    gate, up = (graph.call_function(operator.getitem, (parts, i)) for i in (0, 1))
    act = graph.call_function(SILU, (gate,), {"inplace": False})
    out = graph.call_function(operator.mul, (up, act) if up_first else (act, up))
    for node in (gate, up, act, out):
        node.meta["example_value"] = torch.empty(3, 8)
    if silu_reused:
        out = graph.call_function(operator.add, (out, act))
        out.meta["example_value"] = torch.empty(3, 8)
    graph.output(out)
    gm = fx.GraphModule(root, graph)
    x_value = torch.randn(3, 32, generator=g)
    return gm, PassContext.for_graph(gm, [x_value], OptGPTQConfig(), 0), x_value


@pytest.mark.parametrize("split,up_first", [("aten", False), ("chunk", True)])
def test_hand_built_mlp_is_fused_and_computes_the_same(split, up_first):
    gm, ctx, x = _mlp_graph(split, up_first=up_first)
    expected = gm(x)
    assert fuse_silu_mul(gm, ctx)
    (call,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert call.target is FUSED and call.kwargs == {"act": "silu_mul"} and call.args[1] is None
    assert call.meta["example_value"].shape == (3, 8)
    assert [n.op for n in gm.graph.nodes if n.op != "get_attr"] == ["placeholder", "call_function", "output"]
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_silu_output_with_a_second_user_is_left_alone():
    gm, ctx, x = _mlp_graph("aten", silu_reused=True)
    expected = gm(x)
    assert not fuse_silu_mul(gm, ctx)
    (line,) = [r for r in ctx.report if r.pass_name == "fuse_silu_mul"]
    assert not line.matched and "silu output has other users" in line.detail
    assert SILU in call_targets(gm) and FUSED not in call_targets(gm)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_option_off_leaves_the_graph():
    gm, _, _ = _mlp_graph("aten")
    ctx = PassContext.for_graph(gm, [torch.randn(3, 32)], OptGPTQConfig(fuse_silu_mul=False), 0)
    assert not fuse_silu_mul(gm, ctx) and SILU in call_targets(gm) and not ctx.report
