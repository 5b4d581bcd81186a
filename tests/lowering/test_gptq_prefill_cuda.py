"""Prefill's GPTQ matmul on a CUDA GPU (skipped elsewhere; run on the device machine): from CHUNK_MIN_M rows on, the
weight is dequantized CHUNK_N columns at a time and each chunk's ``torch.mm`` writes its columns of y in place.
Checked eager and inside ``torch.compile`` (where Inductor traces the triton_op's body, the chunk loop and the
``out=`` views included) against the reference. The interpreter cases (triton_gptq_cases.py) cover the kernel on
small shapes; here the launcher's own choice at a long-prompt M."""

import pytest
import torch

from optgptq_compile.lowering import triton_gptq_linear as T
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _weights(n, k, group, seed=0):
    from optgptq_compile.quant.format import default_g_idx, pack_weight

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.randint(0, 16, (k // group, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
    w = pack_weight(q, zeros, scales, default_g_idx(k, group), 4, group)
    return [t.cuda() for t in (w.qweight, w.qzeros, w.scales, w.g_idx)]


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_long_prompt_chunks_match_the_reference(compiled):
    n, k, m = 2 * T.CHUNK_N + 192, 256, T.CHUNK_MIN_M  # two whole chunks and a ragged third
    assert T.pick_config(m, n, k, 4, 128)["CHUNK_N"] == T.CHUNK_N
    qw, qz, sc, gi = _weights(n, k, 128)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).cuda()

    def op(x):
        return torch.ops.optgptq.gptq_linear_triton(x, qw, qz, sc, gi, bias, 4, 128)

    y = (torch.compile(op, fullgraph=True) if compiled else op)(x)
    ref = torch_gptq_linear(x.float(), qw, qz, sc.float(), gi, bias.float(), 4)
    one_pass = T.gptq_matmul(x, qw, qz, sc, gi, bias, 4, 128, config={**T.pick_config(m, n, k, 4, 128), "CHUNK_N": 0})
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    for got in (y, one_pass):
        err = ((got.float() - ref).norm() / ref.norm()).item()
        assert err < 5e-3, err  # bf16 weights and outputs
    # every chunk's columns written (y starts as uninitialised memory)
    assert torch.allclose(y.float(), one_pass.float(), rtol=2e-2, atol=2e-2)
