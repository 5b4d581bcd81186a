"""The backend end to end: registration, counters, weight caching and release, fallback, dumps, dense numerics."""

import functools
import importlib.metadata
import os
from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx

import optgptq_compile
import optgptq_compile.backend as backend
from optgptq_compile.context import fqn_of
from optgptq_compile.quant import cache
from tests.models import tiny_bloom, tiny_llama


def _storage_bytes(module: torch.nn.Module) -> int:
    return sum(p.untyped_storage().nbytes() for p in module.parameters())


def test_backend_is_registered_by_import_and_entry_point():
    assert "optgptq" in torch._dynamo.list_backends(exclude_tags=())
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "optgptq" and ep.value == "optgptq_compile.backend:optgptq_backend" for ep in eps)


def test_bad_option_raises_at_compile():
    model = tiny_llama()
    compiled = torch.compile(model, backend="optgptq", options={"bits": 6})
    with pytest.raises(Exception, match="'bits'=6 is invalid"):
        compiled(torch.randint(3, 128, (1, 4)))


@pytest.mark.parametrize("make", [tiny_llama, tiny_bloom], ids=["llama", "bloom"])
def test_dense_path_generates_the_same_tokens_as_eager(make):
    model = make()
    ids = torch.randint(3, 128, (1, 7))
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": None})
    got = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)
    assert optgptq_compile.stats()["graphs_compiled"] >= 2 and optgptq_compile.stats()["fallbacks"] == 0


def test_generate_quantizes_each_weight_once_and_releases_dense_copies(monkeypatch):
    calls = []
    real_store = cache.store
    monkeypatch.setattr(cache, "store", lambda *a: calls.append(1) or real_store(*a))  # once per new quantization
    model = tiny_llama()
    before = _storage_bytes(model)
    ids = torch.randint(3, 128, (1, 7))
    model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": 4, "group_size": 32})
    model.generate(ids, max_new_tokens=6, do_sample=False)
    s = optgptq_compile.stats()
    assert s["graphs_compiled"] == 3  # prefill, first decode, dynamic-shape decode
    assert s["linear_rewritten"] == 3 * 14 and s["fallbacks"] == 0
    assert len(calls) == 14  # the cache serves the second and third graphs
    freed = before - _storage_bytes(model)
    quantized = sum(m.weight.numel() * 4 for n, m in model.named_modules() if n.endswith("proj"))
    assert freed == quantized == s["dense_bytes_released"]
    with pytest.raises(RuntimeError):  # eager use of a released layer fails loudly, never silently
        model.model.layers[0].mlp.up_proj(torch.randn(1, 64))


def test_keep_dense_keeps_the_model_usable_eagerly():
    model = tiny_llama()
    before = _storage_bytes(model)
    model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": 4, "keep_dense": True,
                                                                                "group_size": 32})
    model(torch.randint(3, 128, (1, 5)))
    assert _storage_bytes(model) == before
    assert "dense_bytes_released" not in optgptq_compile.stats()


def _broken_pass(gm, ctx):
    raise RuntimeError("pass bug")


def test_a_failing_pass_falls_back_to_the_unmodified_graph(monkeypatch):
    monkeypatch.setattr(backend, "PASSES", [*backend.PASSES, _broken_pass])
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 6))
    expected = model(ids).logits
    compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32})
    torch.testing.assert_close(compiled(ids).logits, expected)  # dense result: nothing was released
    assert optgptq_compile.stats()["fallbacks"] == 1


def _broken_runner(gm, example_inputs, ctx):
    raise RuntimeError("the runner could not build a kernel")


def test_a_failing_runner_falls_back_with_the_dense_weights(monkeypatch):
    """Inductor failing on the rewritten graph (it happened on the GPU: a kernel that did not build) must leave a
    working model: the unmodified graph, with its dense weights not yet released."""
    monkeypatch.setattr(backend, "_runner", _broken_runner)
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 6))
    expected = model(ids).logits
    compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32})
    torch.testing.assert_close(compiled(ids).logits, expected)
    assert optgptq_compile.stats()["fallbacks"] == 1
    assert "dense_bytes_released" not in optgptq_compile.stats()


def test_strict_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(backend, "PASSES", [_broken_pass])
    compiled = torch.compile(tiny_llama(), backend="optgptq", options={"strict": True})
    with pytest.raises(Exception, match="pass bug"):
        compiled(torch.randint(3, 128, (1, 6)))


def test_dump_dir_writes_graphs_and_report(tmp_path):
    model = tiny_llama()
    compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32, "dump_dir": tmp_path})
    compiled(torch.randint(3, 128, (1, 6)))
    graph_dirs = sorted(os.listdir(tmp_path))
    assert len(graph_dirs) == 1
    files = sorted(os.listdir(tmp_path / graph_dirs[0]))
    assert files[0].startswith("00_captured") and "report.txt" in files
    assert any("after_quantize_linear" in f for f in files) and any(f.endswith("final.py") for f in files)
    final = open(tmp_path / graph_dirs[0] / [f for f in files if f.endswith("final.py")][0]).read()
    assert "optgptq.gptq_linear" in final
    report = open(tmp_path / graph_dirs[0] / "report.txt").read()
    assert "REWROTE" in report and "lm_head.weight: output head stays dense" in report


@pytest.mark.parametrize("source,expected", [
    ("L['self']._modules['lm_head']._parameters['weight']", "lm_head.weight"),
    # transformers >= 5.24 wraps forward in a decorator taking (*args, **kwargs): self is the first argument
    ("L['args'][0]._modules['model']._modules['layers']._modules['0']._parameters['w']", "model.layers.0.w"),
    ("L['args'][1]", None),  # input_ids: not a module path
    ("L['input_ids']", None),
])
def test_fqn_of_reads_module_paths_from_dynamo_sources(source, expected):
    node = fx.Graph().placeholder("p")
    node.meta["grapharg"] = SimpleNamespace(source=SimpleNamespace(name=source))
    assert fqn_of(node) == expected


def test_decorated_forward_keeps_the_output_head_dense():
    """A forward wrapped as f(*args, **kwargs) (as transformers 5.24 does) must still name lm_head and keep it dense."""
    model = tiny_llama(layers=1)
    forward = type(model).forward

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        return forward(*args, **kwargs)

    model.forward = wrapped.__get__(model)
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32, "strict": True})(
        torch.randint(3, 128, (1, 4)))
    assert optgptq_compile.stats()["linear_rewritten"] == 7  # q, k, v, o, gate, up, down: not lm_head
