"""optgptq::gptq_linear: reference numerics from unpacked integers, opcheck, shape errors."""

import pytest
import torch

import optgptq_compile  # noqa: F401  (registers the ops)
from optgptq_compile.quant.format import default_g_idx, pack_weight

BITS = [2, 3, 4, 8]  # 3: values straddle int32 words


def _random_gptq(n, k, bits, group_size, act_order, seed=0):
    """Random integers/zeros/scales, packed; also returns the dense [K, N] weight computed from the integers."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
    g_idx = default_g_idx(k, group_size)
    if act_order:  # act-order: channels of one group are scattered over K
        g_idx = g_idx[torch.randperm(k, generator=g)]
    dense = (q.t() - zeros[g_idx.long()]).float() * scales.float()[g_idx.long()]  # [K, N]
    return pack_weight(q, zeros, scales, g_idx, bits, group_size), dense


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size,act_order", [(32, False), (32, True), (-1, False)])
@pytest.mark.parametrize("batch_shape", [(1,), (3, 5)])  # decode row, and a 3-D activation
def test_matches_dense_weight_from_integers(bits, group_size, act_order, batch_shape):
    n, k = 96, 160  # 160 = 5 groups of 32
    w, dense = _random_gptq(n, k, bits, group_size, act_order)
    x = torch.randn(*batch_shape, k)
    bias = torch.randn(n)
    y = torch.ops.optgptq.gptq_linear(x, w.qweight, w.qzeros, w.scales, w.g_idx, bias, bits, group_size)
    torch.testing.assert_close(y, x @ dense + bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", BITS)
def test_opcheck(bits):
    w, _ = _random_gptq(64, 128, bits, 32, act_order=True)
    for x, bias in ((torch.randn(4, 128), None), (torch.randn(2, 3, 128, dtype=torch.bfloat16), torch.randn(64))):
        torch.library.opcheck(
            torch.ops.optgptq.gptq_linear.default, (x, w.qweight, w.qzeros, w.scales, w.g_idx, bias, bits, 32)
        )


def test_partial_last_group():
    # K=576 with g128 (SmolLM2's hidden size): 4 full groups and one of 64
    w, dense = _random_gptq(32, 576, 4, 128, act_order=False)
    assert w.scales.shape[0] == 5
    x = torch.randn(2, 576)
    torch.testing.assert_close(
        torch.ops.optgptq.gptq_linear(x, w.qweight, w.qzeros, w.scales, w.g_idx, None, 4, 128), x @ dense,
        rtol=1e-4, atol=1e-4,
    )


def test_shape_errors_name_the_tensor():
    w, _ = _random_gptq(64, 128, 4, 32, act_order=False)
    args = dict(qweight=w.qweight, qzeros=w.qzeros, scales=w.scales, g_idx=w.g_idx)
    op = torch.ops.optgptq.gptq_linear
    with pytest.raises(ValueError, match="qweight"):
        op(torch.randn(2, 96), *args.values(), None, 4, 32)  # K mismatch
    with pytest.raises(ValueError, match="unsupported bits=5"):
        op(torch.randn(2, 128), *args.values(), None, 5, 32)
    with pytest.raises(ValueError, match="bias"):
        op(torch.randn(2, 128), *args.values(), torch.randn(3), 4, 32)
    with pytest.raises(ValueError, match="g_idx must be int32"):
        op(torch.randn(2, 128), w.qweight, w.qzeros, w.scales, w.g_idx.long(), None, 4, 32)


# optgptq::gptq_linear_fused: RMSNorm before, residual after (the fuse_norm_residual pass's op)


def _hf_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm, written out independently of the op's reference."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


@pytest.mark.parametrize("norm,residual", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_norm_linear_add(norm, residual, dtype):
    w, dense = _random_gptq(96, 160, 4, 32, act_order=True)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 160, generator=g) * 3).to(dtype)  # rms far from 1: a missing norm shows
    nw = (torch.rand(160, generator=g) + 0.5).to(dtype) if norm else None
    res = torch.randn(2, 3, 96, generator=g).to(dtype) if residual else None
    bias = torch.randn(96, generator=g).to(dtype)
    y = torch.ops.optgptq.gptq_linear_fused(x, nw, 1e-5, w.qweight, w.qzeros, w.scales, w.g_idx, bias, res, 4, 32)
    xn = _hf_rms_norm(x, nw, 1e-5) if norm else x
    expected = xn @ dense.to(dtype) + bias
    if residual:
        expected = expected + res
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)


def test_fused_opcheck():
    w, _ = _random_gptq(64, 128, 4, 32, act_order=True)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    for nw, res in ((torch.rand(128, dtype=torch.bfloat16), None), (None, torch.randn(2, 3, 64, dtype=torch.bfloat16)),
                    (torch.rand(128, dtype=torch.bfloat16), torch.randn(2, 3, 64, dtype=torch.bfloat16))):
        torch.library.opcheck(torch.ops.optgptq.gptq_linear_fused.default,
                              (x, nw, 1e-6, w.qweight, w.qzeros, w.scales, w.g_idx, None, res, 4, 32))


def test_fused_errors_name_the_norm_weight_or_residual():
    w, _ = _random_gptq(64, 128, 4, 32, act_order=False)
    op = torch.ops.optgptq.gptq_linear_fused
    x = torch.randn(2, 128)
    weights = (w.qweight, w.qzeros, w.scales, w.g_idx, None)
    with pytest.raises(ValueError, match="norm_weight"):
        op(x, torch.ones(96), 1e-6, *weights, None, 4, 32)  # K mismatch
    with pytest.raises(ValueError, match="norm_weight"):
        op(x, torch.ones(128, dtype=torch.float16), 1e-6, *weights, None, 4, 32)  # dtype mismatch
    with pytest.raises(ValueError, match="residual"):
        op(x, None, 1e-6, *weights, torch.randn(1, 64), 4, 32)  # a broadcast is not a residual


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_mul_matches_hf_mlp(norm, dtype):
    """act="silu_mul": the columns are [gate | up] (fuse_projections' gate_proj/up_proj concatenation) and the op
    returns HF LlamaMLP's act_fn(gate_proj(x)) * up_proj(x), rounded as HF rounds it."""
    w, dense = _random_gptq(2 * 48, 160, 4, 32, act_order=True)
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 3, 160, generator=g) * 3).to(dtype)
    nw = (torch.rand(160, generator=g) + 0.5).to(dtype) if norm else None
    bias = torch.randn(96, generator=g).to(dtype)
    y = torch.ops.optgptq.gptq_linear_fused(x, nw, 1e-5, w.qweight, w.qzeros, w.scales, w.g_idx, bias, None, 4, 32,
                                            "silu_mul")
    xn = _hf_rms_norm(x, nw, 1e-5) if norm else x
    gate = xn @ dense[:, :48].to(dtype) + bias[:48]
    up = xn @ dense[:, 48:].to(dtype) + bias[48:]
    expected = torch.nn.SiLU()(gate) * up
    assert y.shape == (2, 3, 48)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    torch.library.opcheck(torch.ops.optgptq.gptq_linear_fused.default,
                          (x, nw, 1e-5, w.qweight, w.qzeros, w.scales, w.g_idx, bias, None, 4, 32, "silu_mul"))


def test_fused_act_errors():
    w, _ = _random_gptq(64, 128, 4, 32, act_order=False)
    op = torch.ops.optgptq.gptq_linear_fused
    x = torch.randn(2, 128)
    weights = (w.qweight, w.qzeros, w.scales, w.g_idx, None)
    with pytest.raises(ValueError, match="unknown act 'gelu'"):
        op(x, None, 1e-6, *weights, None, 4, 32, "gelu")
    with pytest.raises(ValueError, match="no residual"):
        op(x, None, 1e-6, *weights, torch.randn(2, 32), 4, 32, "silu_mul")
    from optgptq_compile.lowering.gptq_linear import check_fused_extras

    with pytest.raises(ValueError, match="even number of columns"):  # packed weights never have an odd N (8-bit
        check_fused_extras(x, None, None, 63, "silu_mul")  # zero points pack 4 a word): the check, directly
