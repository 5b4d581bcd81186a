"""optgptq::attention: numerics against SDPA with an explicit bias (BLOOM's ALiBi form), opcheck, shape errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import optgptq_compile  # noqa: F401  (registers the ops)

op = torch.ops.optgptq.attention

# (Hq, Hkv): MHA, GQA 4/2, SmolLM2's 9/3, MQA 6/1 (6: BLOOM's non-power-of-two head count)
HEADS = [(4, 4), (4, 2), (9, 3), (6, 1)]
# (Sq, Skv): prefill, one decode token, a chunk of 3 new tokens over 7 cached (query offset != 0 and != Skv-1)
LENGTHS = [(5, 5), (1, 9), (3, 10)]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _slopes(heads: int) -> torch.Tensor:
    """BLOOM's slopes, written out independently of the code under test (ALiBi paper, section 3)."""
    closest = 2 ** math.floor(math.log2(heads))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-4 * (2 * i + 1) / closest) for i in range(heads - closest)]
    return torch.tensor(base + extra, dtype=torch.float32)


def _expected(q, k, v, slopes, pad, causal, scale):
    """SDPA over repeated K/V with a materialized additive mask; ALiBi in BLOOM's absolute form slope * key_pos."""
    b, hq, sq, _ = q.shape
    skv = k.shape[2]
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
    bias = torch.zeros(b, hq, sq, skv)
    if slopes is not None:
        bias += slopes[:, None, None] * torch.arange(skv).float()
    allowed = torch.ones(b, 1, sq, skv, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
    if pad is not None:
        allowed &= pad[:, None, None, :]
    bias = bias.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=bias, scale=scale)
    return torch.where(allowed.any(-1, keepdim=True), out, 0.0), allowed


def _inputs(b, hq, hkv, sq, skv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, skv, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, skv, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("sq,skv", LENGTHS)
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_sdpa_with_materialized_bias(hq, hkv, sq, skv, alibi, padded):
    d = 16  # small head dim; the math does not depend on it
    q, k, v = _inputs(2, hq, hkv, sq, skv, d, torch.float32)
    slopes = _slopes(hq) if alibi else None
    # left padding as HF generate builds it: sequence 0 has 3 pad keys, sequence 1 none
    pad = torch.ones(2, skv, dtype=torch.bool)
    if padded:
        pad[0, :3] = False
    pad = pad if padded else None
    for causal in (True, False):
        scale = 0.3  # not 1/sqrt(d): the op must use the scale it is given
        got = op(q, k, v, slopes, pad, causal, scale)
        want, allowed = _expected(q, k, v, slopes, pad, causal, scale)
        assert allowed.any(-1).all() or padded  # only the padded case has rows with no key (pad queries)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    # long context with ALiBi: fp16 scores of 200 keys with slopes up to 0.5 * 200 would lose bits if not fp32
    q, k, v = _inputs(1, 4, 2, 4, 200, 32, dtype)
    slopes = _slopes(4)
    got = op(q, k, v, slopes, None, True, 32**-0.5)
    assert got.dtype == dtype
    want, _ = _expected(q.float(), k.float(), v.float(), slopes, None, True, 32**-0.5)
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_fully_masked_query_rows_are_zero_not_nan():
    # prefill of a left-padded prompt: the pad queries (positions 0..2) see only pad keys
    q, k, v = _inputs(1, 2, 2, 6, 6, 8, torch.float32)
    pad = torch.tensor([[False, False, False, True, True, True]])
    out = op(q, k, v, None, pad, True, 0.5)
    assert torch.isfinite(out).all()
    assert (out[:, :, :3] == 0).all() and (out[:, :, 3:].abs() > 0).any()


def test_opcheck():
    q, k, v = _inputs(2, 6, 2, 3, 7, 8, torch.float32)
    pad = torch.tensor([[True] * 7, [False, False] + [True] * 5])
    for args in (
        (q, k, v, None, None, True, 0.35),
        (q, k, v, _slopes(6), pad, True, 0.35),
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), _slopes(6), None, False, 0.35),
    ):
        torch.library.opcheck(op.default, args)


def test_backward_matches_reference_autograd():
    q, k, v = (t.requires_grad_() for t in _inputs(2, 4, 2, 3, 6, 8, torch.float64))
    pad = torch.tensor([[True] * 6, [False] + [True] * 5])
    grad = torch.randn(2, 4, 3, 8, dtype=torch.float64)
    got = torch.autograd.grad(op(q, k, v, _slopes(4), pad, True, 0.4), (q, k, v), grad)
    want = torch.autograd.grad(_expected(q, k, v, _slopes(4), pad, True, 0.4)[0], (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-5)  # reference runs in fp32


def test_bad_inputs_name_the_argument():
    q, k, v = _inputs(2, 4, 2, 3, 5, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        op(q, k[:, :1].expand(2, 3, 5, 8).contiguous(), v[:, :1].expand(2, 3, 5, 8).contiguous(), None, None, True, 1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        op(q, k, v, torch.ones(4, dtype=torch.float64), None, True, 1.0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        op(q, k, v, None, torch.ones(2, 4, dtype=torch.bool), True, 1.0)
    with pytest.raises(ValueError, match="k .* and v"):
        op(q, k, v[:, :, :4], None, None, True, 1.0)
    with pytest.raises(ValueError, match="at least as many keys"):
        op(q, k[:, :, :2], v[:, :, :2], None, None, True, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        op(q, k.half(), v.half(), None, None, True, 1.0)
