import pytest
import torch

from optgptq_compile.quant.rtn import quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,k", [(32, 96), (128, 576), (-1, 64)])  # 576/128: partial last group (SmolLM2)
def test_error_within_half_a_step(bits, sym, group_size, k):
    torch.manual_seed(0)
    w = torch.randn(48, k)
    q = quantize_rtn(w, bits, group_size, sym)
    groups = 1 if group_size == -1 else -(-k // group_size)
    assert q.scales.shape == (groups, 48) and q.g_idx.shape == (k,) and int(q.g_idx.max()) == groups - 1
    step = q.scales.float()[q.g_idx.long()].t()  # [N, K] the quantization step of each weight
    err = (q.dequantize() - w).abs()
    # Half a step of rounding, plus the fp16 rounding of the scale (relative 2**-11) times the integer level
    # |q - zero| <= |w|/step + 1. Nothing else: a min-max range clamps nothing beyond the half step.
    fp16_slack = (w.abs() / step + 1) * step * 2**-10
    assert bool((err <= 0.5 * step + fp16_slack + 1e-6).all())


def test_symmetric_zero_is_midpoint_and_zero_weights_stay_zero():
    w = torch.randn(8, 64)
    w[:, :32] = 0  # an all-zero group must not divide by zero
    q = quantize_rtn(w, 4, 32, sym=True)
    from optgptq_compile.quant.packing import unpack_cols

    assert bool((unpack_cols(q.qzeros, 4)[:, :8] == 8).all())
    assert torch.equal(q.dequantize()[:, :32], torch.zeros(8, 32))
