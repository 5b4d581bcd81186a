"""fuse_norm_residual: Llama's RMSNorm and residual adds fold into gptq_linear_fused with the same logits; BLOOM
(LayerNorm, dropout before its residual add) is left alone; a broadcasting add is reported, not folded."""

import torch
import torch.fx as fx

import optgptq_compile
from optgptq_compile.config import OptGPTQConfig
from optgptq_compile.context import PassContext
from optgptq_compile.passes.fuse_norm_residual import fuse_norm_residual
from tests.models import call_targets, gptq_linear_node, recording, tiny_bloom, tiny_llama

GPTQ = torch.ops.optgptq.gptq_linear.default
FUSED = torch.ops.optgptq.gptq_linear_fused.default


def _compile_run(model, fuse: bool):
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with recording() as graphs, torch.no_grad():
        compiled = torch.compile(model, backend="optgptq",
                                 options={"bits": 4, "group_size": 32, "fuse_norm_residual": fuse, "strict": True})
        logits = compiled(ids).logits
    return logits, graphs, optgptq_compile.stats()


def test_llama_norms_and_residuals_fold_with_the_same_logits():
    model = tiny_llama(layers=2)
    off, _, _ = _compile_run(model, False)
    on, graphs, stats = _compile_run(model, True)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)  # fp32 model: the reference op composes the same math
    (gm,) = graphs
    targets = call_targets(gm)
    assert targets.count(FUSED) == 4 * 2 and GPTQ not in targets  # qkv, o, gate/up, down per layer
    assert stats["norms_fused"] == 2 * 2 and stats["residuals_fused"] == 2 * 2
    rsqrt = [t for t in targets if t is torch.rsqrt]
    assert len(rsqrt) == 1  # only the final norm before lm_head stays in the graph


def test_bloom_is_left_alone():
    _, graphs, stats = _compile_run(tiny_bloom(layers=1), True)
    assert FUSED not in call_targets(graphs[0])
    assert "norms_fused" not in stats and "residuals_fused" not in stats


def test_broadcasting_add_is_reported_not_folded():
    """y = gptq_linear(x) + r with r [N] (a broadcast) must stay an add: the fused op's residual is y's shape."""
    from optgptq_compile.quant.format import default_g_idx, pack_weight

    w = pack_weight(torch.randint(0, 16, (8, 32)), torch.zeros(1, 8, dtype=torch.int64), torch.ones(1, 8).half(),
                    default_g_idx(32, 32), 4, 32)
    graph = fx.Graph()
    x, r = graph.placeholder("x"), graph.placeholder("r")
    x.meta["example_value"], r.meta["example_value"] = torch.randn(2, 32), torch.randn(8)
    root = torch.nn.Module()
    y = gptq_linear_node(graph, root, x, w, torch.randn(2, 8))
    out = graph.call_function(torch.add, (y, r))
    out.meta["example_value"] = torch.randn(2, 8)
    graph.output(out)
    gm = fx.GraphModule(root, graph)
    ctx = PassContext.for_graph(gm, [torch.randn(2, 32), torch.randn(8)], OptGPTQConfig(), 0)
    assert not fuse_norm_residual(gm, ctx)
    (line,) = [r for r in ctx.report if r.pass_name == "fuse_norm_residual"]
    assert not line.matched and "broadcast" in line.detail
