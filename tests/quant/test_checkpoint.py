"""save_quantized / load_quantized: round trips, both zero-point conventions, community layouts, bad checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import optgptq_compile
from optgptq_compile.quant import checkpoint
from optgptq_compile.quant.api import replace_linears
from optgptq_compile.quant.checkpoint import CheckpointError, load_quantized, save_quantized
from optgptq_compile.quant.format import default_g_idx, num_groups, pack_weight
from optgptq_compile.quant.modules import GPTQLinear
from optgptq_compile.quant.packing import unpack_cols, unpack_rows
from optgptq_compile.quant.sequential import eligible_linears, find_blocks
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

def _random_quantized(model, bits, group_size, act_order, min_zero=0, seed=0):
    """Replace every block linear by random codes/zeros/scales (fast; checkpoint I/O does not care how they were
    made). act_order: a random permutation of the group assignment, as GPTQ's desc_act produces."""
    g = torch.Generator().manual_seed(seed)
    name, blocks = find_blocks(model)
    weights = {}
    for i, block in enumerate(blocks):
        for lname, lin in eligible_linears(block, bits).items():
            n, k = lin.out_features, lin.in_features
            groups = num_groups(k, group_size)
            ints = torch.randint(0, 2**bits, (n, k), generator=g)
            zeros = torch.randint(min_zero, 2**bits, (groups, n), generator=g)
            scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half()
            g_idx = default_g_idx(k, group_size)
            if act_order:
                g_idx = g_idx[torch.randperm(k, generator=g)]
            weights[f"{name}.{i}.{lname}"] = pack_weight(ints, zeros, scales, g_idx, bits, group_size)
    return replace_linears(model, weights)


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, GPTQLinear)}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [True, False])
def test_pack_save_load_unpack_round_trip(tmp_path, bits, fmt, act_order):
    # v1 cannot store a zero point of 0, so its models draw zeros from [1, 2**bits)
    model = _random_quantized(tiny_llama(), bits, 32, act_order, min_zero=1 if fmt == "gptq" else 0)
    save_quantized(model, tmp_path / "ckpt", format=fmt)
    qc = json.load(open(tmp_path / "ckpt" / "config.json"))["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["checkpoint_format"]) == ("gptq", bits, 32, fmt)
    assert qc["desc_act"] == act_order
    loaded = load_quantized(tmp_path / "ckpt")
    a, b = _layers(model), _layers(loaded)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        for t in ("qweight", "scales", "g_idx"):
            assert torch.equal(getattr(a[name], t), getattr(b[name], t)), (name, t)
        n = a[name].out_features
        assert torch.equal(unpack_cols(a[name].qzeros, bits)[:, :n], unpack_cols(b[name].qzeros, bits)[:, :n])
        assert torch.equal(unpack_rows(a[name].qweight, bits), unpack_rows(b[name].qweight, bits))
    ids = torch.randint(3, 128, (2, 16))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_v1_zero_convention_is_stored_zero_minus_one(tmp_path):
    model = _random_quantized(tiny_llama(layers=1), 4, 32, False, min_zero=1)
    save_quantized(model, tmp_path / "v1", format="gptq")
    save_quantized(model, tmp_path / "v2", format="gptq_v2")
    v1, v2 = load_file(tmp_path / "v1" / "model.safetensors"), load_file(tmp_path / "v2" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.qzeros"
    assert torch.equal(unpack_cols(v1[key], 4) + 1, unpack_cols(v2[key], 4))
    ids = torch.randint(3, 128, (2, 16))
    torch.testing.assert_close(load_quantized(tmp_path / "v1")(ids).logits, load_quantized(tmp_path / "v2")(ids).logits,
                               rtol=0, atol=0)


def test_zero_point_zero_falls_back_to_v2_with_a_warning(tmp_path, caplog):
    model = _random_quantized(tiny_llama(layers=1), 4, 32, False, min_zero=0)
    save_quantized(model, tmp_path / "c", format="gptq")
    assert json.load(open(tmp_path / "c" / "quantize_config.json"))["checkpoint_format"] == "gptq_v2"
    assert "zero point 0" in caplog.text


def test_community_layouts_quantize_config_only_meta_format_key_no_g_idx(tmp_path):
    model = _random_quantized(tiny_llama(), 4, 32, False, min_zero=1)
    save_quantized(model, tmp_path / "c")
    path = tmp_path / "c"
    config = json.load(open(path / "config.json"))
    del config["quantization_config"]  # AutoGPTQ-era: settings only in quantize_config.json
    json.dump(config, open(path / "config.json", "w"))
    json.dump({"bits": 4, "group_size": 32, "format": "gptq", "meta": {"desc_act": False, "sym": True,
               "quant_method": "gptq"}}, open(path / "quantize_config.json", "w"))
    tensors = {k: v for k, v in load_file(path / "model.safetensors").items() if not k.endswith(".g_idx")}
    os.remove(path / "model.safetensors")
    save_file(tensors, path / "gptq_model-4bit-32g.safetensors")  # AutoGPTQ's file name
    loaded = load_quantized(path)
    ids = torch.randint(3, 128, (2, 16))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_tied_lm_head_is_written_once_and_tied_after_load(tmp_path):
    model = _random_quantized(tiny_bloom(), 4, 32, True, min_zero=1)
    save_quantized(model, tmp_path / "b")
    keys = load_file(tmp_path / "b" / "model.safetensors").keys()
    assert "lm_head.weight" not in keys and "transformer.word_embeddings.weight" in keys
    loaded = load_quantized(tmp_path / "b")
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight
    ids = torch.randint(3, 128, (2, 16))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bloom])
def test_loaded_checkpoint_compiles_without_calibration(tmp_path, make):
    model = _random_quantized(make(), 4, 32, True, min_zero=1)
    save_quantized(model, tmp_path / "m")
    loaded = load_quantized(tmp_path / "m")
    ids = torch.randint(3, 128, (2, 16))
    expected = loaded(ids).logits
    with recording() as graphs:
        compiled = torch.compile(loaded, backend="optgptq", options={"strict": True})
        out = compiled(ids).logits
    # Dynamo records the op as traced (packet or overload): count by name
    assert sum("gptq_linear" in str(t) for t in call_targets(graphs[0])) == len(_layers(loaded))
    assert optgptq_compile.stats()["linear_rewritten"] == 0  # nothing quantized twice; lm_head stays dense
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def saved(tmp_path):
    model = _random_quantized(tiny_llama(layers=1), 4, 32, True, min_zero=1)
    save_quantized(model, tmp_path / "c")
    return tmp_path / "c"


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def _edit_config(path, fn):
    config = json.load(open(path / "config.json"))
    fn(config["quantization_config"])
    json.dump(config, open(path / "config.json", "w"))


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(f"{Q}.scales"), f"tensor {Q}.scales is missing"),
    (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:-1].contiguous()}), f"tensor {Q}.qweight has shape"),
    (lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"].float()}), f"tensor {Q}.qzeros has dtype"),
    (lambda t: t.update({f"{Q}.g_idx": torch.full_like(t[f"{Q}.g_idx"], 7)}), f"tensor {Q}.g_idx holds values"),
    (lambda t: t.pop("model.norm.weight"), "tensor model.norm.weight is missing"),
    (lambda t: t.update({"model.norm.weight": torch.ones(3)}), "tensor model.norm.weight has shape"),
    (lambda t: t.update({"model.extra.weight": torch.ones(3)}), "tensor model.extra.weight does not belong"),
    (lambda t: t.update({"model.norm.qweight": torch.ones(3, dtype=torch.int32)}), "is a LlamaRMSNorm"),
])
def test_bad_tensors_raise_named_errors(saved, edit, message):
    _edit_tensors(saved, edit)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_quantized(saved)


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(bits=5), "bits=5 is unsupported"),
    (lambda q: q.update(group_size=0), "group_size=0"),
    (lambda q: q.update(checkpoint_format="marlin", format="marlin"), "format 'marlin' is unsupported"),
    (lambda q: q.update(quant_method="awq"), "quant_method 'awq'"),
    (lambda q: q.update(group_size=64), "tensor model.layers.0.*has shape"),  # settings disagree with tensors
])
def test_bad_settings_raise_named_errors(saved, edit, message):
    _edit_config(saved, edit)
    os.remove(saved / "quantize_config.json")
    with pytest.raises(CheckpointError, match=message):
        load_quantized(saved)


def test_truncated_weights_and_missing_files_raise(saved):
    data = open(saved / "model.safetensors", "rb").read()
    open(saved / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_quantized(saved)
    os.remove(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_quantized(saved)
    os.remove(saved / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_quantized(saved)


def test_interrupted_save_leaves_no_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    model = _random_quantized(tiny_llama(layers=1), 4, 32, False, min_zero=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "new")
    assert os.listdir(tmp_path) == []  # neither the target nor a partial directory is left
    monkeypatch.undo()
    save_quantized(model, tmp_path / "old")
    before = open(tmp_path / "old" / "model.safetensors", "rb").read()
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError):
        save_quantized(model, tmp_path / "old")
    assert open(tmp_path / "old" / "model.safetensors", "rb").read() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="holds other files"):
        save_quantized(model, tmp_path / "other")


def test_save_needs_gptq_layers():
    with pytest.raises(ValueError, match="no GPTQ layers"):
        save_quantized(tiny_llama(layers=1), "/tmp/never-written")
