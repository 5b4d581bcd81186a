"""Cases for optgptq::rope_paged_attention_triton in the Triton interpreter (CPU): the decode kernel (paged attention
with ROPE) against the reference (``torch_rope_paged_attention``) and against the two kernels it replaces
(``rope_kv_write`` then ``paged_attention``). Collected by test_triton_rope_paged_attention.py in a process started
with TRITON_INTERPRET=1."""

import math

import pytest
import torch

import optgptq_compile  # noqa: F401  (registers the ops and the backend)
from optgptq_compile.lowering import triton_paged_attention as PA
from optgptq_compile.lowering import triton_rope_kv_write as RK
from optgptq_compile.lowering import triton_rope_paged_attention as T
from optgptq_compile.lowering.paged_attention import torch_paged_attention
from optgptq_compile.lowering.rope_kv_write import torch_rope_kv_write
from tests.lowering.triton_paged_attention_cases import _paged, cfg
from tests.lowering.triton_rope_kv_write_cases import _fused_qkv_views

# attention as in the paged cases (P rounded to fp16 before P @ V), plus RoPE rounded once here and after every op
# in the reference
TOL = {torch.float16: 4e-3, torch.float32: 2e-5}


def _inputs(context_lens, hq, hkv, d, sq, block_size, dtype, padding=(), broadcast=False, seed=0):
    """Pools and tables (``_paged``), q/k/v as strided views of one fused projection output, random cos/sin (not
    HF's, whose halves are equal: a kernel mixing up the halves must fail), and each new token's slot where the
    runtime puts it -- its own position's block and offset -- or -1 for the sequences in ``padding``."""
    k_cache, v_cache, tables, lens = _paged(context_lens, hq, hkv, d, block_size, dtype, seed=seed)
    b = len(context_lens)
    q, k, v = _fused_qkv_views(b, hq, hkv, sq, d, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 3)
    cos = torch.randn(1 if broadcast else b, 1, sq, d, generator=g).to(dtype)
    sin = torch.randn(1 if broadcast else b, 1, sq, d, generator=g).to(dtype)
    slots = torch.full((b * sq,), -1, dtype=torch.int64)
    for i, n in enumerate(context_lens):
        for s in range(sq):
            pos = n - sq + s
            if i not in padding and pos >= 0:
                slots[i * sq + s] = int(tables[i, pos // block_size]) * block_size + pos % block_size
    return q, k, v, cos, sin, k_cache, v_cache, slots, tables, lens


def _check(context_lens, hq, hkv, d, sq, block_size, dtype, config, padding=(), broadcast=False, causal=True,
           seed=0):
    q, k, v, cos, sin, k_cache, v_cache, slots, tables, lens = _inputs(context_lens, hq, hkv, d, sq, block_size,
                                                                       dtype, padding, broadcast, seed)
    scale = 1 / math.sqrt(d)
    # the two kernels the op replaces, on copies of the pools
    k_two, v_two = k_cache.clone(), v_cache.clone()
    q_embed = RK.rope_kv_write_launch(q, k, v, cos, sin, k_two, v_two, slots)
    two = PA.paged_attention_fwd(q_embed, k_two, v_two, tables, lens, None, causal, scale, config=config)
    # the reference, in fp32 (RoPE) and fp64 (attention)
    k_ref, v_ref = k_cache.float(), v_cache.float()
    q_ref = torch_rope_kv_write(q.float(), k.float(), v.float(), cos.float(), sin.float(), k_ref, v_ref, slots)
    ref = torch_paged_attention(q_ref.double(), k_ref.double(), v_ref.double(), tables, lens, None, causal, scale)

    before = k_cache.clone()
    out = T.rope_paged_attention_launch(q, k, v, cos, sin, k_cache, v_cache, slots, tables, lens, None, causal,
                                        scale, config=config)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(out, two, rtol=TOL[dtype], atol=TOL[dtype])
    # the pools: exactly what rope_kv_write's kernel stores (same fp32 arithmetic, one rounding)
    assert torch.equal(k_cache, k_two) and torch.equal(v_cache, v_two)
    torch.testing.assert_close(k_cache.float(), k_ref, rtol=TOL[dtype], atol=TOL[dtype])
    written = torch.zeros(k_cache.shape[0] * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    flat_before, flat_after = before.view(-1, hkv, d), k_cache.view(-1, hkv, d)
    assert torch.equal(flat_after[~written], flat_before[~written])  # padding tokens and every other slot untouched
    return out


def _one_tile(block_n=16):
    """As many splits as the table has tiles: one tile a split (ONE_TILE, the launcher's choice at batch 1)."""
    return cfg(16, block_n, splits=128)


# (id, context_lens, Hq, Hkv, D, block_size, dtype, config, padding sequences) -- each case states what it is for.
# One tile a split runs the fused kernel (ROPE); a config with a K/V loop runs rope_kv_write, then paged attention.
CASES = [
    # MHA head 128 (e2e.py's 7B at batch 1): the new key is the last of a tile (16), the first of the next (17), a
    # 1-token context (its only key is new)
    ("one-tile g1 d128", [16, 17, 1, 40], 4, 4, 128, 16, torch.float16, _one_tile(), ()),
    # GQA 7 (7 of 16 rows), head 80 (padded to 128 lanes, partners within 80), block 8 (a tile spans two blocks);
    # a CUDA-graph padding sequence (context 0, slot -1) and a padding token of a live sequence (slot -1: nothing
    # stored, attention reads what the pool holds, as the reference does)
    ("one-tile g7 d80 padding", [8, 9, 31, 0, 12], 14, 2, 80, 8, torch.float16, _one_tile(), (3, 4)),
    # GQA 3, head 64 (SmolLM2's heads), cos/sin shared by the batch ([1, 1, 1, D])
    ("one-tile g3 d64 broadcast", [48, 47, 2], 6, 2, 64, 16, torch.float16, _one_tile(), ()),
    # 32 rows of queries (GQA 32 = two 16-row tiles): only the first query tile stores the new key and value
    ("one-tile two query tiles g32 d64", [19, 3], 32, 1, 64, 16, torch.float16, _one_tile(), ()),
    # fp32: exact IEEE dots
    ("fp32 one-tile g4 d64", [16, 41, 3], 8, 2, 64, 16, torch.float32, _one_tile(), ()),
    # K/V loops (two kernels): 2 splits, a context ending on a tile (32), just past it (33); unsplit with padding
    ("loop split g4 d64", [32, 33, 5, 20], 8, 2, 64, 16, torch.float16, cfg(16, 16, 2), ()),
    ("loop g7 d80 padding", [8, 9, 31, 0, 12], 14, 2, 80, 8, torch.float16, cfg(16, 16, 1), (3, 4)),
    # the launcher's own choices: a 224-key table, 2 KV heads -> 4 one-tile splits of 64 keys (fused); then 5
    # sequences x 2 KV heads (more programs than the interpreter's 4 "SMs") -> unsplit 128-key tiles (two kernels):
    # contexts ending on a tile (128), just past it (129), one token
    ("picked decode g4 d128", [193], 8, 2, 128, 16, torch.float16, None, ()),
    ("picked batch decode g4 d128", [193, 40, 128, 129, 1], 8, 2, 128, 16, torch.float16, None, ()),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_reference_and_the_two_kernels(case):
    _, lens, hq, hkv, d, bs, dtype, config, padding = case
    _check(lens, hq, hkv, d, 1, bs, dtype, config, padding, broadcast="broadcast" in case[0])


def test_not_causal():
    _check([17, 4], 8, 2, 64, 1, 16, torch.float16, cfg(16, 16, 2), causal=False)


def test_prefill_chunk_runs_the_two_kernels():
    """Sq > 1 (a prefill chunk): rope_kv_write, then paged attention -- same numbers as the two kernels."""
    _check([20, 7, 3], 8, 2, 64, 3, 16, torch.float16, cfg(16, 16, 1))


def test_pools_must_be_written_in_place():
    q, k, v, cos, sin, k_cache, v_cache, slots, tables, lens = _inputs([5], 4, 2, 16, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="written in place"):
        T.rope_paged_attention_launch(q, k, v, cos, sin, k_cache, v_cache.transpose(2, 3), slots, tables, lens, None,
                                      True, 0.25)


def test_opcheck():
    q, k, v, cos, sin, k_cache, v_cache, slots, tables, lens = _inputs([9, 3], 4, 2, 16, 1, 8, torch.float32)
    # test_aot_dispatch_*: an interpreted kernel cannot be recorded into AOTDispatcher's graph (see the paged cases)
    torch.library.opcheck(torch.ops.optgptq.rope_paged_attention_triton.default,
                          (q, k, v, cos, sin, k_cache, v_cache, slots, tables, lens, None, True, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
