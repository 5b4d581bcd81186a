"""fuse_rope_attention: a Llama layer's rope_kv_write and the paged_attention reading its rotated query become one
rope_paged_attention with the same tokens; BLOOM has no RoPE and is not a candidate; each pair the op cannot stand
for is left alone with its reason; the option turns the pass off."""

import pytest
import torch
import torch.fx as fx

import optgptq_compile
from optgptq_compile.config import OptGPTQConfig
from optgptq_compile.context import PassContext
from optgptq_compile.passes.fuse_rope_attention import fuse_rope_attention
from tests.lowering.test_rope_paged_attention_op import _inputs
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

OPS = torch.ops.optgptq
FUSED = OPS.rope_paged_attention.default
ROPE_KV_WRITE = OPS.rope_kv_write.default
PAGED_ATTENTION = OPS.paged_attention.default
PROMPTS = [[5, 9, 14, 3, 22], [7], [30, 31, 32, 33, 34, 35, 36, 37, 38]]  # ragged: left-padded prefill
LAYERS = 2


def _generate(model, **options):
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32, "strict": True,
                                                                "kernels": "reference", **options})
    with recording() as graphs:
        tokens = optgptq_compile.generate(compiled, PROMPTS, [6, 3, 5], block_size=8)
    return tokens, graphs, optgptq_compile.stats()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_generate_fuses_every_layer_with_the_same_tokens(dtype):
    model = tiny_llama(layers=LAYERS, dtype=dtype)  # GQA 4/2
    off, _, _ = _generate(model, fuse_rope_attention=False)
    on, graphs, stats = _generate(model)
    assert on == off
    assert graphs and stats["rope_attention_fused"] == LAYERS * len(graphs)  # prefill and decode graphs
    assert stats["rope_kv_write_fused"] == LAYERS * len(graphs) and "fuse_rope_attention_skipped" not in stats
    for gm in graphs:
        targets = call_targets(gm)
        assert targets.count(FUSED) == LAYERS and ROPE_KV_WRITE not in targets and PAGED_ATTENTION not in targets
        for node in (n for n in gm.graph.nodes if n.target is FUSED):
            q, k_cache, v_cache = node.args[0], node.args[5], node.args[6]
            assert q.name.startswith("query_states")  # the unrotated projection output
            assert k_cache.op == v_cache.op == "placeholder" and k_cache is not v_cache  # the layer's pools


def test_option_off_keeps_rope_kv_write_and_paged_attention():
    _, graphs, stats = _generate(tiny_llama(layers=1), fuse_rope_attention=False)
    for gm in graphs:
        targets = call_targets(gm)
        assert ROPE_KV_WRITE in targets and PAGED_ATTENTION in targets and FUSED not in targets
    assert "rope_attention_fused" not in stats and "fuse_rope_attention_skipped" not in stats


def test_bloom_is_not_a_candidate():
    _, graphs, stats = _generate(tiny_bloom(layers=1))
    assert all(PAGED_ATTENTION in call_targets(gm) and FUSED not in call_targets(gm) for gm in graphs)
    assert "rope_attention_fused" not in stats and "fuse_rope_attention_skipped" not in stats


# ----------------------------------------------------------------------------------------------------------------
# hand-built graphs: the forms the pass rewrites, and what it leaves alone and why

NAMES = ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "slot_mapping", "block_tables", "context_lens",
         "other_k_cache", "other_v_cache")


def _write(g, p, target=ROPE_KV_WRITE, **kwargs):
    args = tuple(p[n] for n in NAMES[:8] if n not in kwargs)
    return g.call_function(target, args, {n: p[v] for n, v in kwargs.items()})


def _attention(g, q, p, target=PAGED_ATTENTION, pools=("k_cache", "v_cache")):
    return g.call_function(target, (q, p[pools[0]], p[pools[1]], p["block_tables"], p["context_lens"], None, True,
                                    0.25))


def plain(g, p):
    return _attention(g, _write(g, p), p)


def hand_written(g, p):
    """Dynamo records a hand-written call as the op packet; the pools and slots given by keyword."""
    q_embed = _write(g, p, OPS.rope_kv_write, k_cache="k_cache", v_cache="v_cache", slot_mapping="slot_mapping")
    return g.call_function(OPS.paged_attention, (q_embed, p["k_cache"], p["v_cache"]), {
        "block_tables": p["block_tables"], "context_lens": p["context_lens"], "alibi_slopes": None, "causal": True,
        "scale": 0.25})


def query_read_twice(g, p):
    q_embed = _write(g, p)
    return _attention(g, q_embed, p), g.call_function(torch.sum, (q_embed,))


def other_pools(g, p):
    return _attention(g, _write(g, p), p, pools=("other_k_cache", "v_cache"))


def pool_read_between(g, p):
    flat = g.call_method("view", (p["k_cache"], -1))  # a view taken before the write, read after it
    q_embed = _write(g, p)
    first = g.call_function(torch.sum, (flat,))  # would read the pool before the moved write
    return _attention(g, q_embed, p), first


def input_written_between(g, p):
    q_embed = _write(g, p)
    g.call_method("mul_", (p["cos"], 2.0))  # the moved write would rotate with the doubled cos
    return _attention(g, q_embed, p)


def no_paged_attention(g, p):
    return g.call_function(torch.mul, (_write(g, p), 2.0))


def _run(body, config=OptGPTQConfig()):
    """Build ``body``'s graph, run it, run the pass, run it again; (changed, report, targets, before, after) where
    before/after are the outputs and both pools of each run (on copies of the same inputs)."""
    graph = fx.Graph()
    placeholders = {n: graph.placeholder(n) for n in NAMES}
    graph.output(body(graph, placeholders))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    args = _inputs([13, 1, 7], 1, 4, 2, 16, torch.float32)[:10]  # decode, GQA 2, ragged contexts
    args += [args[5].clone(), args[6].clone()]  # the other pools: the same contents, other tensors

    def run():
        inputs = [a.clone() for a in args]
        out = gm(*inputs)
        return (*(out if isinstance(out, tuple) else (out,)), inputs[5], inputs[6])

    optgptq_compile.reset_stats()
    before, code = run(), gm.code
    ctx = PassContext.for_graph(gm, args, config)
    changed = fuse_rope_attention(gm, ctx)
    assert changed or gm.code == code  # left alone: not a node changed
    return changed, [line.detail for line in ctx.report], call_targets(gm), before, run()


@pytest.mark.parametrize("body", [plain, hand_written])
def test_pair_becomes_one_op_with_the_same_bits(body):
    changed, report, targets, before, after = _run(body)
    assert changed and targets == [FUSED]
    assert len(report) == 1 and "folded into its paged attention" in report[0]
    assert optgptq_compile.stats()["rope_attention_fused"] == 1
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))  # output, k pool, v pool


@pytest.mark.parametrize("body,reason", [
    (query_read_twice, "the rotated query has 1 reader(s) besides the attention"),
    (other_pools, "the attention reads other pools (other_k_cache, v_cache)"),
    (pool_read_between, "sum_1 between the write and the attention reads or writes the KV pools"),
    (input_written_between, "mul_ between the write and the attention writes in place to an input of the write"),
    (no_paged_attention, "its rotated query feeds no paged_attention (read by mul)"),
])
def test_pairs_the_op_cannot_stand_for_are_left_alone(body, reason):
    changed, report, targets, before, after = _run(body)
    assert not changed and ROPE_KV_WRITE in targets and FUSED not in targets
    assert len(report) == 1 and reason in report[0], report
    assert optgptq_compile.stats()["fuse_rope_attention_skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_option_off_leaves_the_pair():
    changed, report, targets, _, _ = _run(plain, OptGPTQConfig(fuse_rope_attention=False))
    assert not changed and report == [] and targets == [ROPE_KV_WRITE, PAGED_ATTENTION]
