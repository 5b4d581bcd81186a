"""calibrate_gptq: one-call GPTQ from torch.compile options, equal to quantize()-then-compile; reuse; no-data path."""

import importlib
import logging

import pytest
import torch

import optgptq_compile
from optgptq_compile.quant import sequential
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

pass_module = importlib.import_module("optgptq_compile.passes.calibrate_gptq")  # the package exports the function


def _ids(seed, n=4, s=32):
    return torch.randint(3, 128, (n, s), generator=torch.Generator().manual_seed(seed))


# calls: gptq_linear calls in the graph once fuse_projections (on by default) merged Llama's q/k/v and gate/up
@pytest.mark.parametrize("make,linears,calls", [(tiny_llama, 14, 8), (tiny_bloom, 8, 8)])
def test_one_call_rewrites_every_linear_and_matches_quantize_then_compile(make, linears, calls):
    calib, ids = _ids(1), _ids(2, 2, 16)
    reference = optgptq_compile.quantize(make(), calib, bits=4, group_size=32)
    ref = torch.compile(reference, backend="optgptq", options={"strict": True})(ids).logits
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    model = make()
    with recording() as graphs:
        model.forward = torch.compile(model.forward, backend="optgptq",
                                      options={"calibration": calib, "group_size": 32, "strict": True})
        out = model(ids).logits
    assert optgptq_compile.stats()["linear_rewritten"] == linears
    assert sum("gptq_linear" in str(t) for t in call_targets(graphs[0])) == calls
    assert not any(t is torch._C._nn.linear for t in call_targets(graphs[0])[:-1])  # only lm_head stays dense
    # same engine, same data: equal up to float summation order
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_later_graphs_reuse_the_calibration(monkeypatch):
    calls = []
    original = sequential.gptq_sequential

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pass_module, "gptq_sequential", counting)
    model = tiny_llama()
    model.forward = torch.compile(model.forward, backend="optgptq", dynamic=False,
                                  options={"calibration": _ids(1), "group_size": 32, "strict": True})
    model(_ids(2, 1, 8))
    model(_ids(3, 2, 12))  # new static shape: a second graph over the same parameters
    assert optgptq_compile.stats()["graphs_compiled"] == 2 and len(calls) == 1


def test_without_calibration_warns_and_quantizes_data_free(caplog, monkeypatch):
    monkeypatch.setattr(pass_module, "gptq_sequential", lambda *a, **k: pytest.fail("GPTQ ran without data"))
    model = tiny_llama()
    ids = _ids(2, 2, 16)
    with torch.no_grad():
        dense = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="optgptq_compile"):
        out = torch.compile(model, backend="optgptq", options={"strict": True})(ids).logits
    assert "options={'calibration'" in caplog.text
    assert optgptq_compile.stats()["linear_rewritten"] == 14
    assert float((out - dense).pow(2).mean() / dense.pow(2).mean()) < 0.05
