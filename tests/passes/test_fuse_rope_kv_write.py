"""fuse_rope_kv_write: a Llama layer's q/k RoPE and its paged KV write become one rope_kv_write with the same
tokens (the reference op is HF's arithmetic, so the same bits); BLOOM has no RoPE and is not a candidate; each
form the op does not cover is left alone with its reason; the option turns the pass off."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

import optgptq_compile
from optgptq_compile.config import OptGPTQConfig
from optgptq_compile.context import PassContext
from optgptq_compile.passes.fuse_rope_kv_write import fuse_rope_kv_write
from tests.lowering.test_rope_kv_write_op import _inputs
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

ROPE_KV_WRITE = torch.ops.optgptq.rope_kv_write.default
KV_WRITE = torch.ops.optgptq.kv_write.default
KV_WRITES = (KV_WRITE, torch.ops.optgptq.kv_write)  # a hand-written call is recorded as the packet
PROMPTS = [[5, 9, 14, 3, 22], [7], [30, 31, 32, 33, 34, 35, 36, 37, 38]]  # ragged: left-padded prefill


def _generate(model, **options):
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    # fuse_rope_attention off: it would fold each rope_kv_write this pass makes into its paged_attention (that
    # pipeline is tested in test_fuse_rope_attention.py); here the graphs show this pass's own output
    compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32, "strict": True,
                                                                "kernels": "reference", "fuse_rope_attention": False,
                                                                **options})
    with recording() as graphs:
        tokens = optgptq_compile.generate(compiled, PROMPTS, [6, 3, 5], block_size=8)
    return tokens, graphs, optgptq_compile.stats()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_generate_folds_rope_with_the_same_tokens(dtype):
    model = tiny_llama(layers=2, dtype=dtype)  # GQA 4/2
    off, _, _ = _generate(model, fuse_rope_kv_write=False)
    on, graphs, stats = _generate(model)
    assert on == off
    assert graphs and stats["rope_kv_write_fused"] == 2 * len(graphs)  # every layer of the prefill/decode graphs
    assert "fuse_rope_kv_write_skipped" not in stats
    for gm in graphs:
        targets = call_targets(gm)
        assert targets.count(ROPE_KV_WRITE) == 2 and KV_WRITE not in targets
        # the RoPE arithmetic is gone: no rotate_half negation left (the rotary embedding's own cat stays)
        assert not any(n.op == "call_function" and "neg" in str(n.target) for n in gm.graph.nodes)
        for node in gm.graph.nodes:
            if node.target is ROPE_KV_WRITE:
                q, k = node.args[:2]  # the unrotated projection outputs
                assert q.name.startswith("query_states") and "key_states" in str(k.args[0].args[0])
                assert any(u.target is torch.ops.optgptq.paged_attention.default for u in node.users)


def test_option_off_keeps_rope_and_kv_write():
    _, graphs, stats = _generate(tiny_llama(layers=1), fuse_rope_kv_write=False)
    assert all(KV_WRITE in call_targets(gm) and ROPE_KV_WRITE not in call_targets(gm) for gm in graphs)
    assert "rope_kv_write_fused" not in stats


def test_bloom_is_not_a_candidate():
    _, graphs, stats = _generate(tiny_bloom(layers=1))
    assert all(KV_WRITE in call_targets(gm) for gm in graphs)
    assert "rope_kv_write_fused" not in stats and "fuse_rope_kv_write_skipped" not in stats


# ----------------------------------------------------------------------------------------------------------------
# hand-written layers: what is left alone, and why


def _run_pass(fn, args):
    """Dynamo-capture ``fn``, run only this pass on it, run the result; (outputs, pool, report, changed)."""
    seen = {}

    def backend(gm, example_inputs):
        ctx = PassContext.for_graph(gm, example_inputs, OptGPTQConfig())
        seen["changed"] = fuse_rope_kv_write(gm, ctx)
        seen["report"] = [line.detail for line in ctx.report]
        seen["targets"] = call_targets(gm)
        return gm.forward

    torch._dynamo.reset()
    args = [a.clone() for a in args]
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, args[4], seen


def _layer_args():
    q, k4, v, cos, sin, k_cache, v_cache, slots = _inputs(2, 4, 2, 3, 8, torch.float32)
    return [q, k4, v, cos[:, 0], k_cache, v_cache, slots, sin[:, 0]]


def _write(k_embed, v, k_cache, v_cache, slots):
    b, hkv, sq, d = k_embed.shape
    torch.ops.optgptq.kv_write(k_embed.transpose(1, 2).reshape(b * sq, hkv, d), v, k_cache, v_cache, slots)


def hf_layer(q, k, v, cos, k_cache, v_cache, slots, sin):
    q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin)
    _write(k_embed, v, k_cache, v_cache, slots)
    return q_embed * 2


def keys_read_twice(q, k, v, cos, k_cache, v_cache, slots, sin):
    q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin)
    _write(k_embed, v, k_cache, v_cache, slots)
    return q_embed, k_embed.sum()


def different_sin(q, k, v, cos, k_cache, v_cache, slots, sin):
    q_embed, _ = apply_rotary_pos_emb(q, k, cos, sin)
    k_embed = k * cos[:, None] + rotate_half(k) * (sin * 0.5)[:, None]  # HF's form, another sin
    _write(k_embed, v, k_cache, v_cache, slots)
    return q_embed


def query_read_first(q, k, v, cos, k_cache, v_cache, slots, sin):
    q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin)
    first = q_embed.sum()  # before the write: the fused op could not produce it in time
    _write(k_embed, v, k_cache, v_cache, slots)
    return q_embed, first


def interleaved_rope(q, k, v, cos, k_cache, v_cache, slots, sin):
    q_embed, _ = apply_rotary_pos_emb(q, k, cos, sin)
    k_embed = k * cos[:, None] + torch.stack((-k[..., 1::2], k[..., ::2]), -1).flatten(-2) * sin[:, None]  # GPT-J
    _write(k_embed, v, k_cache, v_cache, slots)
    return q_embed


def test_hf_layer_is_rewritten_with_the_same_bits():
    args = _layer_args()
    eager_pool = args[4].clone()
    eager = hf_layer(*args[:4], eager_pool, args[5].clone(), *args[6:])
    out, pool, seen = _run_pass(hf_layer, args)
    assert seen["changed"] and ROPE_KV_WRITE in seen["targets"]
    assert not any(t in KV_WRITES for t in seen["targets"])
    assert torch.equal(out, eager) and torch.equal(pool, eager_pool)


@pytest.mark.parametrize("fn,reason", [
    (keys_read_twice, "rotated keys are also used outside the KV write"),
    (different_sin, "0 query RoPEs share the keys' cos/sin"),
    (query_read_first, "rotated query is read before the KV write"),
    (interleaved_rope, "k is not HF's"),
])
def test_forms_the_op_does_not_cover_are_left_alone(fn, reason):
    args = _layer_args()
    eager_pool = args[4].clone()
    eager = fn(*args[:4], eager_pool, args[5].clone(), *args[6:])
    out, pool, seen = _run_pass(fn, args)
    assert not seen["changed"] and any(t in KV_WRITES for t in seen["targets"])
    assert len(seen["report"]) == 1 and reason in seen["report"][0]
    for got, want in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
        assert torch.equal(got, want)
    assert torch.equal(pool, eager_pool)
