"""GPTQ on one layer: the streamed Hessian, quality against RTN by output error, act-order g_idx, groups."""

import pytest
import torch

from optgptq_compile.quant.api import quantize_data_free
from optgptq_compile.config import parse_options
from optgptq_compile.quant.format import default_g_idx
from optgptq_compile.quant.gptq import GPTQSettings, Hessian, gptq_quantize
from optgptq_compile.quant.rtn import quantize_rtn


def _layer(k=160, n=96, tokens=2048, seed=0):
    """Correlated inputs with a few large-magnitude channels (what makes act-order matter in real LLMs).

    K=160 with g64 leaves a partial last group of 32 columns (like SmolLM2's K=576 at g128)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens, k, generator=g) @ mix + 0.1 * torch.randn(tokens, k, generator=g)  # [T, K]
    x[:, : k // 16] *= 8  # outlier channels
    w = torch.randn(n, k, generator=g) * 0.05  # [N, K]
    return x, w


def _out_err(x, w, qw):
    ref = x @ w.t()
    return float((x @ qw.dequantize().t() - ref).pow(2).mean() / ref.pow(2).mean())


def test_streamed_hessian_equals_direct_computation():
    x, _ = _layer()
    h = Hessian(x.shape[1])
    for chunk in (x[:100], x[100:101], x[101:1501].reshape(7, 200, -1), x[1501:]):  # uneven, 3-D batches
        h.add(chunk)
    direct = 2 * x.double().t() @ x.double() / x.shape[0]
    assert h.count == x.shape[0]
    torch.testing.assert_close(h.matrix.double(), direct, rtol=1e-5, atol=1e-5 * float(direct.abs().max()))


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 64), (4, -1), (2, 32), (8, 64)])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_output_error(bits, group_size, act_order):
    x, w = _layer()
    h = Hessian(x.shape[1])
    h.add(x)
    rtn = _out_err(x, w, quantize_rtn(w, bits, group_size, sym=True))
    qw, _ = gptq_quantize(w, h.matrix, GPTQSettings(bits, group_size, sym=True, act_order=act_order))
    gptq = _out_err(x, w, qw)
    # measured gptq/rtn 0.17-0.22 here; the clipping search alone reaches only 0.62-0.99, so this bound needs the
    # error feedback to work
    assert gptq < 0.4 * rtn, (gptq, rtn)


def test_clip_search_and_act_order_help_on_outlier_inputs():
    x, w = _layer(seed=1)
    h = Hessian(x.shape[1])
    h.add(x)
    errs = {}
    for act, clip in [(False, False), (True, False), (True, True)]:
        qw, _ = gptq_quantize(w, h.matrix, GPTQSettings(3, 64, sym=True, act_order=act, clip_search=clip))
        errs[(act, clip)] = _out_err(x, w, qw)
    assert errs[(True, True)] < errs[(True, False)] < errs[(False, False)] * 1.02, errs


def test_act_order_produces_a_real_g_idx_and_static_groups_keep_the_natural_one():
    x, w = _layer()
    h = Hessian(x.shape[1])
    h.add(x)
    k = x.shape[1]
    qw, _ = gptq_quantize(w, h.matrix, GPTQSettings(4, 64, act_order=True))
    assert not torch.equal(qw.g_idx, default_g_idx(k, 64))  # the outlier channels moved to group 0
    assert int(qw.g_idx[: k // 16].max()) == 0
    counts = torch.bincount(qw.g_idx.long())
    assert counts.tolist() == [64, 64, 32]  # group sizes along the permuted order, partial last group
    static, _ = gptq_quantize(w, h.matrix, GPTQSettings(4, 64, act_order=True, static_groups=True))
    assert torch.equal(static.g_idx, default_g_idx(k, 64))
    assert _out_err(x, w, static) < 0.7 * _out_err(x, w, quantize_rtn(w, 4, 64, True))


def test_dead_inputs_and_asymmetric_ranges():
    x, w = _layer()
    x[:, 5] = 0  # an input that never fires: its column is zeroed, the Hessian stays invertible
    h = Hessian(x.shape[1])
    h.add(x)
    qw, _ = gptq_quantize(w, h.matrix, GPTQSettings(4, 32, sym=False))
    assert qw.dequantize()[:, 5].abs().max() == 0
    assert _out_err(x, w, qw) < 0.7 * _out_err(x, w, quantize_rtn(w, 4, 32, False))


def test_data_free_default_is_min_max_rtn():
    # measured on SmolLM2 4-bit g128: min-max RTN 28.24, RTN + unweighted clipping search 30.66 (RESULTS.md)
    _, w = _layer()
    for options in ({"bits": 3, "group_size": 64}, {"bits": 4, "group_size": -1, "sym": False}):
        config = parse_options(options)
        expected = quantize_rtn(w, config.bits, config.group_size, config.sym)
        got = quantize_data_free(w, config)
        assert all(torch.equal(a, b) for a, b in zip(got.tensors().values(), expected.tensors().values()))
