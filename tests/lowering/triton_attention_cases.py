"""Cases for optgptq::attention_triton in the Triton interpreter (CPU) against the reference ``torch_attention``
(computed in fp64): prefill and decode shapes, tile boundaries, GQA packing, ALiBi, causal and padding masks, split-KV
decode, strided inputs, the op's registration, and the backend end to end. Collected by test_triton_attention.py in a
process started with TRITON_INTERPRET=1. Shapes are small on purpose: the interpreter runs each program in numpy.
bf16 is not covered here (triton 3.9's interpreter gets bf16 ``tl.dot`` wrong); benchmarks/bench_attention.py checks
it on the GPU at full size."""

import math

import pytest
import torch

import optgptq_compile  # noqa: F401  (registers the ops and the backend)
from optgptq_compile.lowering import triton_attention as T
from optgptq_compile.lowering.attention import torch_attention
from optgptq_compile.runtime.scheduler import cache_kwarg
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}  # fp16: P is rounded to fp16 for the P @ V dot, output to fp16
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, SPLITS=1)  # many tiles on small shapes


def _slopes(heads):
    """BLOOM's slopes (ALiBi paper, section 3), non-power-of-two head counts included."""
    closest = 2 ** math.floor(math.log2(heads))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-4 * (2 * i + 1) / closest) for i in range(heads - closest)]
    return torch.tensor(base + extra, dtype=torch.float32)


def _inputs(b, hq, hkv, sq, skv, d, dtype, seed=0, transposed=False):
    """Random q, k, v; ``transposed``: [B, H, S, D] views of [B, S, H, D] memory, as HF hands them over."""
    g = torch.Generator().manual_seed(seed)
    if transposed:
        q, k, v = (torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
                   for h, s in ((hq, sq), (hkv, skv), (hkv, skv)))
    else:
        q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype) for h, s in ((hq, sq), (hkv, skv), (hkv, skv)))
    return q, k, v


def _left_padding(b, skv, pads):
    """bool [B, Skv], True = attend; row i has pads[i] pad keys on the left."""
    mask = torch.ones(b, skv, dtype=torch.bool)
    for i, n in enumerate(pads):
        mask[i, :n] = False
    return mask


def _check(q, k, v, slopes, pad, causal, scale, config=None):
    out = T.flash_attention(q, k, v, slopes, pad, causal, scale, config)
    want = torch_attention(q.double(), k.double(), v.double(), slopes, pad, causal, scale)
    assert out.shape == want.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    tol = TOL[q.dtype]
    err = (out.double() - want).abs().max().item()
    assert err < tol * max(1.0, want.abs().max().item()), err
    return out


# (b, Hq, Hkv, Sq, Skv) with the reason for each
SHAPES = {
    "prefill on a tile boundary": (2, 4, 2, 32, 32),  # 64 packed rows, 2 KV tiles of 16 exactly
    "prefill just past a boundary": (1, 4, 1, 33, 33),  # GQA 4: 132 rows (9 row tiles, last holds 4); 3 KV tiles
    "decode one token, long cache": (2, 7, 1, 1, 70),  # GQA 7: 7 rows in one 16-row tile; 70 keys = 4 tiles + 6
    "decode chunk of 3 tokens": (1, 8, 2, 3, 45),  # queries at key positions 42..44: diagonal inside a tile
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("causal,alibi,padded", [
    (True, True, True),  # BLOOM generate: everything at once
    (True, False, False),  # Llama prefill
    (False, True, False),  # ALiBi without causal masking (ALiBi's sign matters on both sides of the diagonal)
    (False, False, True),  # padding alone
])
def test_small_tiles_match_reference(name, causal, alibi, padded):
    b, hq, hkv, sq, skv = SHAPES[name]
    q, k, v = _inputs(b, hq, hkv, sq, skv, 64, torch.float32)
    pad = _left_padding(b, skv, [3, 0][:b]) if padded else None  # one ragged row, one full row
    _check(q, k, v, _slopes(hq) if alibi else None, pad, causal, 0.3, SMALL_TILES)  # 0.3: not 1/sqrt(d)


@pytest.mark.parametrize("group", [1, 3])  # 3: row tiles start at query positions 0, 5, 10, 16, ...
def test_causal_diagonal_at_every_offset_in_a_tile(group):
    # chunks of 5 queries over 16..33 keys: the first query of a row tile lands on every position of a 16-key
    # tile, so an off-by-one in "fully below the diagonal" (unmasked) or "wholly above" (skipped) shows up
    for skv in range(16, 34):
        q, k, v = _inputs(1, group, 1, 5, skv, 16, torch.float32, seed=skv)
        _check(q, k, v, None, None, True, 0.5, SMALL_TILES)


@pytest.mark.parametrize("d", [64, 80, 128])  # 80: not a power of two (the D tile is padded to 128, masked)
@pytest.mark.parametrize("hq,hkv", [(3, 3), (4, 1), (7, 1)])  # GQA ratios 1 / 4 / 7
@pytest.mark.parametrize("sq,skv", [(20, 20), (1, 37)])  # prefill / decode with the launcher's own tiles
def test_head_dims_and_gqa_ratios_fp16(d, hq, hkv, sq, skv):
    q, k, v = _inputs(1, hq, hkv, sq, skv, d, torch.float16, seed=d + hq)
    _check(q, k, v, _slopes(hq), None, True, d**-0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_ragged_left_padding_and_fully_padded_row(dtype):
    # prefill of 4 left-padded prompts; row 3 has no real key at all (every output of it must be exactly 0)
    b, hq, hkv, s = 4, 4, 2, 24
    q, k, v = _inputs(b, hq, hkv, s, s, 64, dtype)
    pad = _left_padding(b, s, [0, 5, 17, s])
    out = _check(q, k, v, _slopes(hq), pad, True, 0.125, SMALL_TILES)
    assert (out[3] == 0).all()
    assert (out[1, :, :5] == 0).all() and (out[2, :, :17] == 0).all()  # pad queries of a causal prefill: no key
    assert (out[1, :, 5:].abs() > 0).any()


def test_strided_inputs_and_default_config():
    # transposed views (HF's [B, S, H, D] memory): the kernel reads them through their strides, no copies
    q, k, v = _inputs(2, 8, 2, 19, 19, 80, torch.float16, transposed=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    _check(q, k, v, _slopes(8), _left_padding(2, 19, [4, 0]), True, 80**-0.5)
    # strided head dim too (a stride-2 slice of a wider buffer), decode
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, 128, generator=g)[..., ::2]
    k = torch.randn(1, 2, 30, 128, generator=g)[..., ::2]
    v = torch.randn(1, 2, 30, 128, generator=g)[..., ::2]
    _check(q, k, v, None, None, True, 0.125)


@pytest.mark.parametrize("splits,sq,causal,pads", [
    (3, 1, True, [0, 0]),  # decode: 3 chunks of keys merged by the combine kernel
    (4, 2, True, [0, 40]),  # row 1: the first chunks are all padding (their log-sum-exp is -inf)
    (5, 1, False, [0, 65]),  # row 1 fully padded: every chunk empty -> zeros
])
def test_split_kv_decode(splits, sq, causal, pads):
    q, k, v = _inputs(2, 4, 2, sq, 65, 64, torch.float32, seed=splits)
    cfg = dict(SMALL_TILES, SPLITS=splits)
    out = _check(q, k, v, _slopes(4), _left_padding(2, 65, pads), causal, 0.2, cfg)
    if pads[1] == 65:
        assert (out[1] == 0).all()


def test_launcher_picks_a_split_for_decode_with_few_programs():
    cfg = T.pick_config(rows=4, skv=4096, head_dim=128, dtype=torch.float16, programs=8)
    assert cfg["SPLITS"] > 1 and cfg["BLOCK_M"] == 16
    assert T.pick_config(rows=4, skv=4096, head_dim=128, dtype=torch.float16, programs=1024)["SPLITS"] == 1
    assert T.pick_config(rows=8192, skv=2048, head_dim=128, dtype=torch.float16, programs=8)["SPLITS"] == 1
    # and the default launch of such a shape (4 KV tiles x 4 = enough to split on the interpreter's 4 "SMs")
    q, k, v = _inputs(1, 4, 1, 1, 16 * 64 + 5, 64, torch.float16)
    assert T.pick_config(4, k.shape[2], 64, torch.float16, 1, sms=4)["SPLITS"] > 1
    _check(q, k, v, _slopes(4), None, True, 0.125)


@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("rows", [4, 64, 65, 4096])
def test_configs_fit_the_rules(d, rows):
    for hip in (False, True):
        for dtype in (torch.float16, torch.float32):
            cfg = T.pick_config(rows, 2048, d, dtype, programs=64, hip=hip)
            assert min(cfg["BLOCK_M"], cfg["BLOCK_N"], T.block_d(d)) >= 16  # MFMA / mma tiles
            assert cfg["num_warps"] in (4, 8)
            if hip:  # the ROCm tiles stay narrow (64 KB LDS; measured in test_aot_compile.py)
                assert cfg["BLOCK_N"] <= (64 if T.block_d(d) <= 64 else 32) and cfg["num_stages"] == 1


def test_other_dtypes_run_the_reference():
    q, k, v = _inputs(1, 4, 2, 5, 7, 16, torch.float64)
    out = T.flash_attention(q, k, v, _slopes(4), None, True, 0.25)
    torch.testing.assert_close(out, torch_attention(q, k, v, _slopes(4), None, True, 0.25), rtol=0, atol=0)


def test_op_validates_like_the_base_op():
    q, k, v = _inputs(1, 4, 2, 5, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="at least as many keys"):
        torch.ops.optgptq.attention_triton(q, k, v, None, None, True, 0.25)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        torch.ops.optgptq.attention_triton(q, k[:, :1].expand(1, 3, 3, 16), v[:, :1].expand(1, 3, 3, 16), None, None,
                                           False, 0.25)


def test_opcheck():
    q, k, v = _inputs(2, 6, 2, 3, 7, 16, torch.float32)
    pad = _left_padding(2, 7, [0, 2])
    for args in ((q, k, v, None, None, True, 0.35), (q, k, v, _slopes(6), pad, True, 0.35),
                 (q.half(), k.half(), v.half(), _slopes(6), None, False, 0.35)):
        # test_aot_dispatch_*: AOTDispatcher traces a triton_op's body, and an interpreted kernel cannot be
        # recorded into that graph (wrap_triton records JIT kernels only); covered on the GPU instead.
        torch.library.opcheck(torch.ops.optgptq.attention_triton.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_backward_is_the_reference_backward():
    q, k, v = (t.requires_grad_() for t in _inputs(2, 4, 2, 3, 6, 16, torch.float32))
    pad = _left_padding(2, 6, [0, 1])
    grad = torch.randn(2, 4, 3, 16)
    got = torch.autograd.grad(torch.ops.optgptq.attention_triton(q, k, v, _slopes(4), pad, True, 0.4), (q, k, v),
                              grad)
    want = torch.autograd.grad(torch_attention(q, k, v, _slopes(4), pad, True, 0.4), (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = _inputs(1, 2, 2, 3, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="CUDA/ROCm device"):
        torch.ops.optgptq.attention_triton(q, k, v, None, None, True, 0.25)


# ---------------------------------------------------------------- the backend end to end


def _spread(model):
    """Random-init tiny models have near-uniform attention; wider weights give peaked, position-dependent scores."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    return model


def _prefill_then_decode(model, kernels, ids, mask):
    """Logits of a left-padded prefill and of one decode step over its cache, compiled with the given kernels."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="optgptq", options={"bits": None, "kernels": kernels, "strict": True})
    with recording() as graphs:
        first = compiled(ids, attention_mask=mask, use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        second = compiled(nxt, attention_mask=mask2, use_cache=True, **{cache_kwarg(model): first.past_key_values})
    return first.logits, second.logits, [t for g in graphs for t in call_targets(g)]


@pytest.mark.parametrize("make", [lambda: tiny_llama(heads=4, kv_heads=2), lambda: tiny_bloom(heads=6, hidden=48)],
                         ids=["llama_gqa_4_2", "bloom_6_alibi"])
def test_backend_kernels_triton_matches_reference(make):
    model = _spread(make())
    ids = torch.tensor([[0, 0, 5, 6, 7, 9], [3, 4, 5, 6, 7, 8]])  # two prompts, the first left-padded by 2
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want_prefill, want_decode, ref_targets = _prefill_then_decode(model, "reference", ids, mask)
    got_prefill, got_decode, targets = _prefill_then_decode(model, "triton", ids, mask)
    assert torch.ops.optgptq.attention.default in ref_targets
    assert torch.ops.optgptq.attention_triton.default in targets
    assert torch.ops.optgptq.attention.default not in targets
    torch.testing.assert_close(got_prefill[:, 2:], want_prefill[:, 2:], rtol=1e-4, atol=1e-4)  # real tokens
    torch.testing.assert_close(got_decode, want_decode, rtol=1e-4, atol=1e-4)
    assert (want_decode - want_prefill[:, -1:]).abs().max() > 1e-2  # the decode step is not a copy of the prefill
