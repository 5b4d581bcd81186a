"""The int4 tinygemm baseline module against the fp32 matmul of its dequantized weight (CPU ops; the CUDA packing
is checked on the GPU by the benchmark's own self-check, whose failure path is tested here)."""

import pytest
import torch
from torch import nn

from optgptq_compile.bench import tinygemm
from optgptq_compile.bench.tinygemm import (TinyGemmInt4Linear, check_shape, dequantize_tinygemm, quantize_tinygemm,
                                            replace_linears)
from tests.models import tiny_llama

SHAPES = [  # (N, K, group)
    (256, 256, 128),  # two groups, square
    (80, 384, 128),  # N not a power of two (a multiple of 16, the CPU tile), three groups
    (64, 128, 32),  # g32: four groups per row
    (32, 256, 256),  # one group spanning the whole row
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # output rounding of each dtype


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_module_matches_dequantized_matmul(n, k, group, dtype):
    torch.manual_seed(n + k)
    linear = nn.Linear(k, n, bias=False).to(dtype)
    module = TinyGemmInt4Linear.from_linear(linear, group)
    x = torch.randn(2, 3, k).to(dtype)  # leading dims are flattened and restored
    q, scales, zeros = quantize_tinygemm(linear.weight.detach(), group)
    sz = module.scales_and_zeros  # [K/g, N, 2] in the model's dtype: the reference uses the same rounded values
    ref = x.float() @ dequantize_tinygemm(q, sz[..., 0].t(), sz[..., 1].t()).t()  # [2, 3, N]
    out = module(x)
    assert out.shape == (2, 3, n) and out.dtype == dtype
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOL[dtype]


def test_quantization_is_round_to_nearest_over_the_full_range():
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.02
    w[0, :128] = 0.5  # a constant group: finite scale, no NaN
    q, scales, zeros = quantize_tinygemm(w, 128)
    assert q.dtype == torch.int32 and q.min() >= 0 and q.max() <= 15
    groups = q.reshape(48, 2, 128)
    assert (groups[1:].amin(-1) == 0).all() and (groups[1:].amax(-1) == 15).all()  # min-max: both ends used
    err = (dequantize_tinygemm(q, scales, zeros) - w).abs().reshape(48, 2, 128)
    assert (err <= scales[..., None] / 2 + 1e-6).all()  # never more than half a step off
    assert torch.isfinite(dequantize_tinygemm(q, scales, zeros)).all()


def test_replace_linears_swaps_decoder_linears_only():
    model = tiny_llama(heads=4, kv_heads=2, hidden=128)  # K in {128, 256}, N in {64, 128, 256}
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        dense = model(ids).logits
        reference = tiny_llama(heads=4, kv_heads=2, hidden=128)  # same seed: same weights, dequantized below
        for m in reference.model.layers.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(dequantize_tinygemm(*quantize_tinygemm(m.weight, 128)))
        expected = reference(ids).logits
        count, error = replace_linears(model.model.layers, 128)
        got = model(ids).logits
    assert count == 2 * 7 and error < tinygemm.tolerance(torch.float32)
    assert isinstance(model.lm_head, nn.Linear)
    assert sum(isinstance(m, TinyGemmInt4Linear) for m in model.modules()) == 14
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - dense).abs().max() > 1e-3  # it really is quantized


def test_self_check_catches_a_wrong_packing(monkeypatch):
    real = tinygemm.pack_int4
    monkeypatch.setattr(tinygemm, "pack_int4", lambda q, device: real(q.flip(1), device))  # columns reversed
    model = tiny_llama(heads=4, kv_heads=2, hidden=128)
    with pytest.raises(ValueError, match="self-check failed"):
        replace_linears(model.model.layers, 128)


@pytest.mark.parametrize("n,k,group,device,dtype,bias,message", [
    (72, 256, 128, "cpu", torch.float32, False, "N % 16"),  # 72: a multiple of 8 but not 16
    (64, 192, 64, "cpu", torch.float32, False, "K % 128"),  # K not a multiple of the 8 inner k-tiles
    (64, 256, 100, "cpu", torch.float32, False, "group_size"),
    (64, 256, 128, "cpu", torch.float32, True, "bias"),
    (64, 256, 128, "cuda", torch.float16, False, "bf16"),  # the CUDA kernel takes bf16 only
])
def test_unsupported_shapes_are_named(n, k, group, device, dtype, bias, message):
    with pytest.raises(ValueError, match=message):
        check_shape(n, k, group, torch.device(device), dtype, bias)
