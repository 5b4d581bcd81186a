"""Sequential GPTQ over whole HF models: generic block/linear discovery, stages, quantize(), quality vs RTN."""

import pytest
import torch

import optgptq_compile
from optgptq_compile.config import parse_options
from optgptq_compile.eval import perplexity
from optgptq_compile.quant.api import quantize_data_free, replace_linears
from optgptq_compile.quant.gptq import GPTQSettings
from optgptq_compile.quant.modules import GPTQLinear
from optgptq_compile.quant.rtn import quantize_rtn
from optgptq_compile.quant.sequential import _stages, eligible_linears, find_blocks, gptq_sequential
from tests.models import sqnr_db, tiny_bloom, tiny_llama


def _ids(seed, n=8, s=32):
    return torch.randint(3, 128, (n, s), generator=torch.Generator().manual_seed(seed))


def test_blocks_and_linears_found_generically():
    name, blocks = find_blocks(tiny_llama())
    assert name == "model.layers" and len(blocks) == 2
    assert sorted(eligible_linears(blocks[0], 4)) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"])
    name, blocks = find_blocks(tiny_bloom())
    assert name == "transformer.h"
    assert sorted(eligible_linears(blocks[0], 4)) == sorted(
        ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"])


@pytest.mark.parametrize("make,expected", [
    (tiny_llama, [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    (tiny_bloom, [["self_attention.query_key_value"], ["self_attention.dense"], ["mlp.dense_h_to_4h"],
                  ["mlp.dense_4h_to_h"]]),
])
def test_true_sequential_stages_group_layers_by_shared_input(make, expected):
    model = make()
    captured = {}
    _, blocks = find_blocks(model)
    hook = blocks[0].register_forward_pre_hook(lambda m, a, k: captured.setdefault("x", (a, k)), with_kwargs=True)
    with torch.no_grad():
        model(_ids(0, 1), use_cache=False)
    hook.remove()
    assert _stages(blocks[0], eligible_linears(blocks[0], 4), captured["x"], True) == expected


@pytest.mark.parametrize("make", [tiny_llama, tiny_bloom])
def test_quantize_replaces_every_block_linear_and_beats_rtn(make):
    calib, held_out = _ids(1), _ids(2)
    dense = make()
    with torch.no_grad():
        ref = dense(held_out).logits
    rtn = make()
    name, blocks = find_blocks(rtn)
    replace_linears(rtn, {f"{name}.{i}.{n}": quantize_rtn(m.weight.detach(), 3, 32, True)
                          for i, b in enumerate(blocks) for n, m in eligible_linears(b, 3).items()})
    model = optgptq_compile.quantize(make(), calib, bits=3, group_size=32)
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == 2 * len(eligible_linears(find_blocks(make())[1][0], 3))
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output head stays dense
    with torch.no_grad():
        gptq_db, rtn_db = sqnr_db(ref, model(held_out).logits), sqnr_db(ref, rtn(held_out).logits)
    # 3-bit g32 on held-out tokens; measured GPTQ vs RTN: llama 16.4 vs 13.6 dB, bloom 44.5 vs 40.4 dB (random
    # init and random tokens give near-isotropic activations, where GPTQ gains least; real text gains more)
    assert gptq_db > rtn_db + 2, (gptq_db, rtn_db)


def test_restore_leaves_the_model_untouched_and_options_are_validated():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = gptq_sequential(model, _ids(1), GPTQSettings(4, 32), restore=True)
    assert len(results) == 14
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="'bits'"):
        optgptq_compile.quantize(tiny_llama(), _ids(1), bits=5)
    with pytest.raises(ValueError, match="needs calibration"):
        optgptq_compile.quantize(tiny_llama(), None)
    with pytest.raises(ValueError, match="integer tensor"):
        optgptq_compile.quantize(tiny_llama(), [torch.randn(2, 8)])


def test_perplexity_matches_a_direct_computation():
    model, ids = tiny_llama(), _ids(3, 3, 17)
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert perplexity(model, ids, batch_size=2) == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    with pytest.raises(ValueError, match="windows"):
        perplexity(model, ids[0])
