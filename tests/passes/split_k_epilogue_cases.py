"""passes/split_k_epilogue.py in the Triton interpreter: which decode GEMVs it rewrites, and that the partials op
and the rewritten model compute what the reference does (collected by test_split_k_epilogue.py)."""

import pytest
import torch

import optgptq_compile  # noqa: F401  (registers the ops and the backend)
from optgptq_compile.lowering import triton_gptq_linear as T
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear, torch_gptq_linear_partials
from optgptq_compile.quant.format import default_g_idx, pack_weight
from tests.models import call_targets, recording, tiny_llama

PARTIALS = torch.ops.optgptq.gptq_linear_partials_triton.default
GPTQ_TRITON = torch.ops.optgptq.gptq_linear_triton.default
OPTIONS = {"bits": 4, "group_size": 32, "kernels": "triton", "strict": True}


def _weights(n, k, bits, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
    return pack_weight(q, zeros, scales, default_g_idx(k, group_size), bits, group_size)


# K=512: 8 tiles of 64; split_len 128 / 192 (a ragged last split of 128) / 512 (one split); N=200: masked columns
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, 64), (2, -1), (4, 32)])
@pytest.mark.parametrize("split_len", [128, 192, 512])
def test_partials_kernel_matches_reference(bits, group_size, split_len):
    w = _weights(200, 512, bits, group_size)
    x = torch.randn(1, 1, 512, dtype=torch.float16)
    args = (x, w.qweight, w.qzeros, w.scales, w.g_idx, bits, group_size, split_len)
    got = PARTIALS(*args)
    ref = torch_gptq_linear_partials(x.double(), w.qweight, w.qzeros, w.scales, w.g_idx, bits, split_len)
    assert got.shape == ref.shape == (-(-512 // split_len), 1, 1, 200) and got.dtype == torch.float32
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-4, err  # fp32 sums of exact products; a wrong slice or group is >> 1e-2
    full = torch_gptq_linear(x.double(), w.qweight, w.qzeros, w.scales, w.g_idx, None, bits)
    torch.testing.assert_close(got.double().sum(0), full, rtol=1e-4, atol=1e-4)


def test_partials_off_the_fast_path_run_the_reference():
    """Two rows, or a split_len that is not a whole number of the launcher's K tiles: still the right partials."""
    w = _weights(64, 256, 4, 64)
    for x, split_len in ((torch.randn(2, 256, dtype=torch.float16), 64), (torch.randn(1, 256, dtype=torch.float16), 40)):
        got = PARTIALS(x, w.qweight, w.qzeros, w.scales, w.g_idx, 4, 64, split_len)
        ref = torch_gptq_linear_partials(x, w.qweight, w.qzeros, w.scales, w.g_idx, 4, split_len)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def _compiled(model, ids, **options):
    torch._dynamo.reset()
    with recording() as graphs:
        logits = torch.compile(model, backend="optgptq", options={**OPTIONS, **options})(ids).logits
    return logits, [t for g in graphs for t in call_targets(g)]


def test_single_row_decode_gemvs_are_rewritten_and_agree():
    """hidden 256 (the interpreter counts 4 SMs): fused q/k/v (N 512), o (256) and down (K 512) split K and are
    rewritten; fused gate/up (N 1024: 8 column tiles, enough programs) does not split and keeps gptq_linear. The
    logits match the in-kernel reduce and the reference."""
    model = tiny_llama(layers=1, hidden=256)
    ids = torch.randint(3, 128, (1, 1))
    logits, targets = _compiled(model, ids)
    assert targets.count(PARTIALS) == 3 and targets.count(GPTQ_TRITON) == 1
    off, off_targets = _compiled(model, ids, split_k_epilogue=False)
    assert PARTIALS not in off_targets and off_targets.count(GPTQ_TRITON) == 4
    ref, _ = _compiled(model, ids, kernels="reference")
    torch.testing.assert_close(logits, off, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert optgptq_compile.stats()["split_k_epilogues"] >= 3


@pytest.mark.parametrize("shape", [(2, 1), (1, 5)])  # two rows (decode batch 2), a prompt: not one row
def test_more_than_one_row_keeps_the_in_kernel_reduce(shape):
    model = tiny_llama(layers=1, hidden=256)
    logits, targets = _compiled(model, torch.randint(3, 128, shape))
    assert PARTIALS not in targets and GPTQ_TRITON in targets


def test_only_split_gemvs_are_rewritten():
    """hidden 64 with groups of 32 (K tiles of 32): q/k/v, o and gate/up have K 64, two tiles, which the gemv does
    not split (no reduce to move); down has K 128 and splits in two."""
    _, targets = _compiled(tiny_llama(layers=1), torch.randint(3, 128, (1, 1)))
    assert targets.count(PARTIALS) == 1 and targets.count(GPTQ_TRITON) == 3
