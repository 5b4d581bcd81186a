"""match_attention: minimal graphs, whole tiny models through a recording backend, eager-vs-compiled greedy
tokens (bits=None), negative cases that must stay plain PyTorch, and every attention of SmolLM2."""

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import optgptq_compile
from optgptq_compile.config import parse_options
from optgptq_compile.context import PassContext
from optgptq_compile.passes.attention_semantics import bloom_slopes
from optgptq_compile.passes.match_attention import match_attention
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

ATTENTION = torch.ops.optgptq.attention.default
DENSE = {"bits": None, "strict": True}  # strict: a pass exception fails the test instead of falling back


def capture(fn, *args):
    """The Dynamo graph of ``fn(*args)`` (with example values, as the backend gets it) and a PassContext."""
    out = {}

    def grab(gm, example_inputs):
        out["gm"], out["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=grab, fullgraph=True)(*args)
    ctx = PassContext.for_graph(out["gm"], out["inputs"], parse_options(DENSE))
    return out["gm"], out["inputs"], ctx


def rewritten(gm: fx.GraphModule) -> int:
    return call_targets(gm).count(ATTENTION)


def qkv(b=2, hq=4, hkv=2, sq=5, skv=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, skv, d, generator=g),
            torch.randn(b, hkv, skv, d, generator=g))


def hf_style_mask(attention_mask, sq, skv):
    """transformers' sdpa_mask, written out: causal (queries are the last sq keys) & padding, bool [B,1,Sq,Skv]."""
    q_idx = (torch.arange(sq) + (skv - sq))[None, None, :, None]
    kv_idx = torch.arange(skv)[None, None, None, :]
    b_idx = torch.arange(attention_mask.shape[0])[:, None, None, None]
    return (kv_idx <= q_idx) & attention_mask.bool()[b_idx, kv_idx]


# ---------------------------------------------------------------- minimal graphs


def test_minimal_sdpa_causal_gqa():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)

    q, k, v = qkv()
    gm, inputs, ctx = capture(fn, q, k, v)
    want = gm(*inputs)
    assert match_attention(gm, ctx) and rewritten(gm) == 1
    assert F.scaled_dot_product_attention not in call_targets(gm)
    torch.testing.assert_close(gm(*inputs)[0], want[0], rtol=1e-5, atol=1e-5)


def test_minimal_repeat_kv_with_padding_mask():
    # HF's padded path: repeat_kv (expand + reshape) and a bool mask from the 2-D attention_mask input
    def fn(q, k, v, attention_mask):
        def repeat_kv(x, n):
            b, h, s, d = x.shape
            return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)

        mask = hf_style_mask(attention_mask, q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.3)

    q, k, v = qkv(sq=2, skv=6)  # two new tokens over four cached: the causal offset matters
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    gm, inputs, ctx = capture(fn, q, k, v, am)
    want = gm(*inputs)[0]
    assert match_attention(gm, ctx) and rewritten(gm) == 1
    node = next(n for n in gm.graph.nodes if n.target is ATTENTION)
    assert node.args[5] is True and node.args[4] is not None  # causal, with a key-padding mask
    torch.testing.assert_close(gm(*inputs)[0], want, rtol=1e-5, atol=1e-5)
    am2 = torch.tensor([[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1]])  # another mask, holes included: same graph
    inputs2 = [am2 if x is am else x for x in inputs]
    torch.testing.assert_close(gm(*inputs2)[0], fn(q, k, v, am2), rtol=1e-5, atol=1e-5)


def test_hand_built_fx_graph():
    # no Dynamo: a graph built node by node with real tensors as example values
    g = fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    out = g.call_function(F.scaled_dot_product_attention, (q, k, v), {"scale": 0.5, "enable_gqa": True})
    g.output(out)
    gm = fx.GraphModule(torch.nn.Module(), g)
    tensors = qkv(b=1, hq=6, hkv=3, sq=1, skv=7)  # decode: one query, no mask, not causal
    for node, t in zip((q, k, v), tensors):
        node.meta["val"] = t
    out.meta["val"] = torch.empty_like(tensors[0])
    want = gm(*tensors)
    assert match_attention(gm, PassContext.for_graph(gm, list(tensors), parse_options(DENSE)))
    assert rewritten(gm) == 1
    torch.testing.assert_close(gm(*tensors), want, rtol=1e-5, atol=1e-5)


def bloom_like(q, k, v, slope_scale=1.0, softcap=None):
    """BLOOM's eager attention on [B, H, S, D] tensors with its in-graph slopes and causal mask."""
    b, h, s, d = q.shape
    closest = 2 ** math.floor(math.log2(h))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != h:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * (h - closest), 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    alibi = (slopes[:, None, None] * slope_scale * torch.arange(s)).repeat(b, 1, 1).float()
    mask = torch.where(torch.arange(s)[None, :] <= torch.arange(s)[:, None], 0.0, torch.finfo(torch.float32).min)
    scores = alibi.baddbmm(batch1=q.reshape(b * h, s, d), batch2=k.reshape(b * h, s, d).transpose(-1, -2),
                           beta=1.0, alpha=1 / math.sqrt(d)).view(b, h, s, s)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32)
    return torch.bmm(probs.view(b * h, s, s), v.reshape(b * h, s, d)).view(b, h, s, d)


@pytest.mark.parametrize("heads", [4, 6, 12])  # 6, 12: not powers of two (the extra slopes interleave)
def test_minimal_bloom_slopes_recovered(heads):
    q, k, v = qkv(b=1, hq=heads, hkv=heads, sq=6, skv=6)
    gm, inputs, ctx = capture(bloom_like, q, k, v)
    want = gm(*inputs)[0]
    assert match_attention(gm, ctx) and rewritten(gm) == 1
    node = next(n for n in gm.graph.nodes if n.target is ATTENTION)
    torch.testing.assert_close(getattr(gm, node.args[3].target), bloom_slopes(heads), rtol=1e-6, atol=0)
    torch.testing.assert_close(gm(*inputs)[0], want, rtol=1e-5, atol=1e-5)


def test_bloom_slopes_formula_against_transformers():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in (1, 4, 6, 12, 16, 112):  # 112: BLOOM-176B
        alibi = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), heads, torch.float32)  # [H, 1, 3]
        torch.testing.assert_close(alibi[:, 0, 1], bloom_slopes(heads))


# ---------------------------------------------------------------- negative cases


def _skips(fn, *args) -> fx.GraphModule:
    gm, _, ctx = capture(fn, *args)
    assert not match_attention(gm, ctx)
    assert rewritten(gm) == 0 and optgptq_compile.stats()["match_attention_skipped"] == 1
    return ctx.report[-1].detail


def test_no_match_dropout():
    assert "dropout" in _skips(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), *qkv(hkv=4))


def test_no_match_unknown_additive_bias_input():
    bias = torch.randn(2, 4, 5, 5)
    assert "not a [B, Skv] padding" in _skips(
        lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), *qkv(hkv=4), bias)


def test_no_match_in_graph_relative_bias():
    def fn(q, k, v):  # a float mask with values other than 0/-inf: a position bias, not a mask
        pos = torch.arange(5)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(pos[None, :] * 0.1).expand(5, 5))

    assert "unknown bias" in _skips(fn, *qkv(hkv=4))


def test_no_match_sliding_window():
    def fn(q, k, v):  # Mistral-style window of 3: looks causal at short lengths, is not
        q_idx, kv_idx = torch.arange(5)[:, None], torch.arange(5)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(kv_idx <= q_idx) & (kv_idx > q_idx - 3))

    assert "sliding window" in _skips(fn, *qkv(hkv=4))


def test_no_match_is_causal_with_cache():
    # SDPA's is_causal aligns top-left; with 2 queries over 6 keys that is not "queries are the last keys"
    assert "Sq != Skv" in _skips(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                 *qkv(hkv=4, sq=2, skv=6))


def test_no_match_bloom_softcap_and_wrong_slopes():
    q, k, v = qkv(b=1, hq=4, hkv=4, sq=6, skv=6)
    assert "no mask added" in _skips(lambda q, k, v: bloom_like(q, k, v, softcap=30.0), q, k, v)
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    assert "slope" in _skips(lambda q, k, v: bloom_like(q, k, v, slope_scale=2.0), q, k, v)


def test_no_match_bloom_training_dropout_and_output_attentions():
    model = tiny_bloom()
    model.config.attention_dropout = 0.1
    for block in model.transformer.h:
        block.self_attention.attention_dropout.p = 0.1
    model.train()
    ids = torch.tensor([[3, 4, 5, 6]])
    with recording() as graphs:
        torch.compile(model, backend="optgptq", options=DENSE)(ids)
    assert ATTENTION not in call_targets(graphs[0]) and optgptq_compile.stats()["match_attention_skipped"] == 2
    torch._dynamo.reset()
    model.eval()
    with recording() as graphs:  # the probabilities are a model output: the op cannot provide them
        torch.compile(model, backend="optgptq", options=DENSE)(ids, output_attentions=True)
    assert ATTENTION not in call_targets(graphs[0])


def test_training_without_dropout_is_rewritten_and_differentiable():
    # HF passes dropout_p=0.0 when attention_dropout is 0, even in train(): the op must then give the same grads
    eager, compiled = tiny_llama(), tiny_llama()
    eager.train(), compiled.train()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    eager(ids, labels=ids).loss.backward()
    with recording() as graphs:
        torch.compile(compiled, backend="optgptq", options=DENSE)(ids, labels=ids).loss.backward()
    assert rewritten(graphs[0]) == 2
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- whole models


def _spread(model):
    """Random-init tiny models predict one token forever; wider weights make greedy decoding a real check."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    return model


BATCHES = {
    "one": (torch.tensor([[3, 4, 5, 6, 7]]), torch.ones(1, 5, dtype=torch.long)),
    # two prompts of lengths 3 and 5, left-padded as generate expects
    "padded": (torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]]), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])),
}
MODELS = {
    "llama_gqa_4_2": lambda: tiny_llama(heads=4, kv_heads=2),
    "llama_mha_4_4": lambda: tiny_llama(heads=4, kv_heads=4),
    "bloom_4": lambda: tiny_bloom(heads=4),
    "bloom_6": lambda: tiny_bloom(heads=6, hidden=48),  # 6 heads: non-power-of-two slopes; 48 = 6 x 8
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("name", list(MODELS))
def test_models_every_attention_rewritten_same_greedy_tokens(name, batch):
    model = _spread(MODELS[name]())
    ids, mask = BATCHES[batch]
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    model.forward = torch.compile(model.forward, backend="optgptq", options=DENSE)
    with recording() as graphs:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert len(graphs) >= 2  # prefill and decode
    for gm in graphs:
        names = [str(t) for t in call_targets(gm)]
        assert rewritten(gm) == 2, names  # two layers
        assert not any("scaled_dot_product" in t or "bmm" in t for t in names), names
    assert optgptq_compile.stats()["attention_rewritten"] == 2 * len(graphs)
    assert len(set(got[:, ids.shape[1]:].flatten().tolist())) > 2  # the check is not a constant sequence
    assert torch.equal(got, want)


def test_bloom_holed_mask_is_refused_at_run_time():
    # BLOOM counts ALiBi positions over the mask; the rewrite asserts the mask has no holes instead of erring
    model = tiny_bloom()
    ids, mask = BATCHES["padded"]
    compiled = torch.compile(model, backend="optgptq", options=DENSE)
    torch.testing.assert_close(compiled(ids, attention_mask=mask).logits[:, 2:],
                               model(ids, attention_mask=mask).logits[:, 2:], rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="left-padded"):
        compiled(ids, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))


def test_smollm2_every_attention_rewritten_same_32_tokens():
    from optgptq_compile.data import load_smollm2

    model, tok = load_smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=32, do_sample=False)
    model.forward = torch.compile(model.forward, backend="optgptq", options=DENSE)
    with recording() as graphs:
        got = model.generate(ids, max_new_tokens=32, do_sample=False)
    layers = model.config.num_hidden_layers
    assert all(rewritten(gm) == layers for gm in graphs)
    assert optgptq_compile.stats()["attention_rewritten"] == layers * len(graphs)
    assert optgptq_compile.stats().get("match_attention_skipped", 0) == 0
    assert torch.equal(got, want), (tok.decode(got[0]), tok.decode(want[0]))
