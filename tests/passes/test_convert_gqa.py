"""Opt-GQA: the kv_heads option's convert_gqa pass (minimal graph, whole models, negatives) and the module-level
optgptq_compile.convert_gqa (mean pooling vs the data-aware "aligned" merge)."""

import pytest
import torch
import torch.nn.functional as F

import optgptq_compile
from optgptq_compile.config import parse_options
from optgptq_compile.context import PassContext
from optgptq_compile.gqa import convert_gqa as convert_model, refit_output
from optgptq_compile.passes.convert_gqa import convert_gqa
from optgptq_compile.passes.match_attention import match_attention, val
from tests.models import recording, tiny_bloom, tiny_llama

ATTENTION = torch.ops.optgptq.attention.default
PADDED = (torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]]), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))


def attention_kv_heads(gm) -> list[int]:
    return [val(n.args[1]).shape[1] for n in gm.graph.nodes if n.target is ATTENTION]


def logit_error(model, ref_logits, ids) -> float:
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref_logits).pow(2).mean() / ref_logits.pow(2).mean())


# ---------------------------------------------------------------- the pass


class MiniAttention(torch.nn.Module):
    """Llama-shaped projections + SDPA with enable_gqa: 4 query heads over 4 KV heads of 8 dims."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(32, 32, bias=False) for _ in range(3))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, 8).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_minimal_graph_merges_weights_and_slices_heads():
    torch.manual_seed(0)
    mod, x = MiniAttention(), torch.randn(2, 6, 32)
    captured = {}

    def grab(gm, example_inputs):
        captured.update(gm=gm, inputs=example_inputs)
        return gm.forward

    torch.compile(mod, backend=grab, fullgraph=True)(x)
    gm, inputs = captured["gm"], captured["inputs"]
    ctx = PassContext.for_graph(gm, inputs, parse_options({"bits": None, "kv_heads": 2}))
    k_before = mod.k_proj.weight.detach().clone()
    assert match_attention(gm, ctx) and convert_gqa(gm, ctx)
    assert attention_kv_heads(gm) == [2]
    # in place: the K rows of heads 0,1 (and 2,3) are now their mean
    want_k = k_before.view(2, 2, 8, 32).mean(1, keepdim=True).expand(2, 2, 8, 32).reshape(32, 32)
    torch.testing.assert_close(mod.k_proj.weight.detach(), want_k)
    # the graph computes GQA 4/2 with those weights; eager SDPA over the duplicated heads is the same function
    torch.testing.assert_close(gm(*inputs)[0], mod(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,make,n", [
    ("llama_4_2_to_1", lambda: tiny_llama(heads=4, kv_heads=2), 1),
    ("llama_mha_4_to_2", lambda: tiny_llama(heads=4, kv_heads=4), 2),
    ("bloom_4_to_2", lambda: tiny_bloom(heads=4), 2),  # fused, interleaved query_key_value
])
def test_option_equals_mean_pooled_model(name, make, n):
    ids, mask = PADDED
    want = convert_model(make(), n, method="mean").generate(ids, attention_mask=mask, max_new_tokens=6,
                                                             do_sample=False)
    model = make()
    model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": None, "kv_heads": n,
                                                                             "strict": True})
    with recording() as graphs:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert all(attention_kv_heads(gm) == [n, n] for gm in graphs)
    assert optgptq_compile.stats()["gqa_converted"] == 2 * len(graphs)
    assert torch.equal(got, want)


def test_option_with_quantization_merges_before_quantizing():
    model = tiny_llama(heads=4, kv_heads=2)
    model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": 4, "group_size": 32,
                                                                             "kv_heads": 1, "strict": True})
    with recording() as graphs:
        model.generate(torch.tensor([[3, 4, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    s = optgptq_compile.stats()
    assert s["fallbacks"] == 0 and s["gqa_converted"] == 2 * len(graphs) and s["linear_rewritten"] > 0


def test_option_noop_when_model_already_has_kv_heads():
    model = convert_model(tiny_llama(heads=4, kv_heads=2), 1, method="mean")
    model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": None, "kv_heads": 1})
    with recording() as graphs:
        model.generate(torch.tensor([[3, 4, 5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert all(attention_kv_heads(gm) == [1, 1] for gm in graphs)
    assert optgptq_compile.stats().get("gqa_converted", 0) == 0


def test_option_not_a_divisor_is_left_alone():
    model = tiny_llama(heads=4, kv_heads=2)
    before = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": None, "kv_heads": 3})
    with recording() as graphs:
        model(torch.tensor([[3, 4, 5]]))
    assert attention_kv_heads(graphs[0]) == [2, 2]
    assert optgptq_compile.stats()["convert_gqa_skipped"] == 2
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, before)


# ---------------------------------------------------------------- optgptq_compile.convert_gqa


def _related_heads(model):
    """KV head 1 of every layer made an exact image of head 0: K by a complex scalar per RoPE pair, V by an
    invertible map. Merging them loses nothing for a method that can undo those maps in Q and O."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            k, v = attn.k_proj.weight.view(2, 16, -1), attn.v_proj.weight.view(2, 16, -1)
            c = torch.polar(0.5 + torch.rand(8, generator=g), torch.rand(8, generator=g) * 6.28)  # [D/2]
            z = c[:, None] * torch.complex(k[0, :8], k[0, 8:])
            k[1] = torch.cat([z.real, z.imag])
            v[1] = (torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g)) @ v[0]
    return model


def test_aligned_is_exact_when_heads_are_related():
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _related_heads(tiny_llama(heads=4, kv_heads=2))
    with torch.no_grad():
        want = ref(ids).logits
    aligned = convert_model(_related_heads(tiny_llama(heads=4, kv_heads=2)), 1, calibration=ids, method="aligned",
                            refit=False)  # the merge alone; a damped refit would move O slightly
    mean = convert_model(_related_heads(tiny_llama(heads=4, kv_heads=2)), 1, method="mean")
    assert logit_error(aligned, want, ids) < 1e-8
    assert logit_error(mean, want, ids) > 1e-3


@pytest.mark.parametrize("make,n", [(lambda: tiny_llama(heads=8, kv_heads=4), 1), (lambda: tiny_bloom(heads=4), 1)])
def test_aligned_beats_mean_pooling_on_held_out_tokens(make, n):
    g = torch.Generator().manual_seed(0)
    cal, held_out = torch.randint(3, 128, (8, 32), generator=g), torch.randint(3, 128, (4, 32), generator=g)
    with torch.no_grad():
        want = make()(held_out).logits
    err_mean = logit_error(convert_model(make(), n, method="mean"), want, held_out)
    err_aligned = logit_error(convert_model(make(), n, calibration=cal, method="aligned"), want, held_out)
    assert err_aligned < 0.8 * err_mean, (err_aligned, err_mean)


def test_refit_output_maps_merged_outputs_back():
    # merged attention outputs that are an invertible mix of the original ones: the refit must undo the mix
    g = torch.Generator().manual_seed(0)
    original = torch.randn(512, 24, generator=g)  # 512 tokens, Hq*D = 24
    rotation = torch.linalg.qr(torch.randn(24, 24, generator=g))[0]
    merged = original @ (rotation * torch.linspace(0.5, 2.0, 24))  # well conditioned: damping stays negligible
    out_proj = torch.nn.Linear(24, 16, bias=False)
    weight = out_proj.weight.detach().clone()
    refit_output(out_proj, weight, original, merged)
    torch.testing.assert_close(merged @ out_proj.weight.detach().T, original @ weight.T, rtol=2e-2, atol=2e-2)


def test_converted_llama_cache_holds_fewer_heads():
    model = convert_model(tiny_llama(heads=4, kv_heads=2), 1, calibration=torch.randint(3, 128, (2, 16)))
    assert model.config.num_key_value_heads == 1 and model.model.layers[0].self_attn.k_proj.out_features == 16
    out = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.layers[0].keys.shape[1] == 1


def test_bloom_mean_duplicates_heads_within_groups():
    model = convert_model(tiny_bloom(heads=4), 2, method="mean")
    w = model.transformer.h[0].self_attention.query_key_value.weight.view(4, 3, 16, 64)
    assert torch.equal(w[0, 1], w[1, 1]) and torch.equal(w[2, 2], w[3, 2]) and not torch.equal(w[1, 1], w[2, 1])
    assert not torch.equal(w[0, 0], w[1, 0])  # queries untouched


def test_bad_arguments():
    with pytest.raises(ValueError, match="kv_heads=3"):
        convert_model(tiny_llama(heads=4, kv_heads=2), 3)
    with pytest.raises(ValueError, match="method"):
        convert_model(tiny_llama(heads=4, kv_heads=2), 1, method="pca")
