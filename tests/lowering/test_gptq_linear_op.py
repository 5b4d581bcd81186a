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
