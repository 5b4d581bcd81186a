"""optgptq::kv_write / paged_attention / kv_gather: against per-sequence dense attention, opcheck, shape errors."""

import math

import pytest
import torch

import optgptq_compile  # noqa: F401  (registers the ops)

BLOCK_SIZE = 4  # small, so a 13-token context spans 4 blocks with a partial last one


def _paged_setup(context_lens, hkv, d, num_blocks=40, dtype=torch.float32, seed=0):
    """A pool with random contents (stale data in unused slots must not leak into results), and for each
    sequence random K/V written through kv_write into randomly chosen distinct blocks."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=g).to(dtype)
    max_blocks = max(-(-n // BLOCK_SIZE) for n in context_lens) + 1  # +1: a trailing unused entry
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    dense = []
    for b, n in enumerate(context_lens):
        nb = -(-n // BLOCK_SIZE)
        tables[b, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        t = torch.arange(n)
        slots = tables[b, t // BLOCK_SIZE].long() * BLOCK_SIZE + t % BLOCK_SIZE
        torch.ops.optgptq.kv_write(k, v, k_cache, v_cache, slots)
        dense.append((k, v))
    return k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32), dense


def _dense_attention(q, k, v, causal, scale, slopes):
    """One sequence: q [Hq, Sq, D], k/v [n, Hkv, D]; plain fp64 math with explicit positions."""
    hq, sq, _ = q.shape
    n, hkv, _ = k.shape
    k = k.double().permute(1, 0, 2).repeat_interleave(hq // hkv, 0)
    v = v.double().permute(1, 0, 2).repeat_interleave(hq // hkv, 0)
    s = q.double() @ k.transpose(-1, -2) * scale  # [Hq, Sq, n]
    qpos = torch.arange(n - sq, n)[:, None]
    kpos = torch.arange(n)[None, :]
    if slopes is not None:  # BLOOM's form: slope * key position (softmax-equivalent to slope * (key - query))
        s = s + slopes.double()[:, None, None] * kpos
    if causal:
        s = s.masked_fill(kpos > qpos, float("-inf"))
    return torch.softmax(s, -1) @ v


CASES = [
    # (context_lens, Sq, Hq, Hkv): decode with ragged contexts; GQA 4:1; MHA; prefill chunk Sq=5 (causal matters)
    ([13, 1, 7, 20], 1, 8, 2),
    ([5, 9], 5, 4, 4),
    ([16, 8, 12], 3, 6, 2),
]


@pytest.mark.parametrize("context_lens,sq,hq,hkv", CASES)
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_paged_attention_matches_dense(context_lens, sq, hq, hkv, alibi, causal):
    d = 16
    k_cache, v_cache, tables, lens, dense = _paged_setup(context_lens, hkv, d)
    q = torch.randn(len(context_lens), hq, sq, d)
    slopes = torch.rand(hq) * 0.5 if alibi else None
    scale = 1 / math.sqrt(d)
    out = torch.ops.optgptq.paged_attention(q, k_cache, v_cache, tables, lens, slopes, causal, scale)
    for b, (k, v) in enumerate(dense):
        if context_lens[b] < sq:
            continue  # a context shorter than the query chunk cannot happen (the chunk is part of it)
        ref = _dense_attention(q[b], k, v, causal, scale, slopes)
        torch.testing.assert_close(out[b].double(), ref, rtol=1e-5, atol=1e-5)


def test_padding_row_is_zero_not_nan():
    k_cache, v_cache, tables, lens, _ = _paged_setup([6, 3], 2, 8)
    lens[1] = 0  # a padded batch slot (CUDA-graph batches are padded to a captured size)
    out = torch.ops.optgptq.paged_attention(torch.randn(2, 4, 1, 8), k_cache, v_cache, tables, lens, None, True, 0.3)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0


def test_kv_write_skips_negative_slots_and_casts():
    k_cache = torch.randn(3, BLOCK_SIZE, 2, 8, dtype=torch.float16)
    v_cache = torch.randn(3, BLOCK_SIZE, 2, 8, dtype=torch.float16)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    torch.ops.optgptq.kv_write(k, v, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 8)
    torch.testing.assert_close(flat_k[5], k[0].half())
    torch.testing.assert_close(flat_v[0], v[2].half())
    untouched = [i for i in range(3 * BLOCK_SIZE) if i not in (0, 5)]
    assert torch.equal(flat_k[untouched], before_k.view(-1, 2, 8)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, 2, 8)[untouched])


def test_kv_gather_left_pads():
    k_cache, _, tables, lens, dense = _paged_setup([5, 9, 1], 2, 8)
    out = torch.ops.optgptq.kv_gather(k_cache, tables, lens, 11, True)  # 11 > longest context: all rows padded
    assert out.shape == (3, 2, 11, 8)
    for b, (k, _) in enumerate(dense):
        n = k.shape[0]
        torch.testing.assert_close(out[b, :, 11 - n:], k.permute(1, 0, 2))
        assert out[b, :, : 11 - n].abs().max() == 0 if n < 11 else True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    k_cache, v_cache, tables, lens, _ = _paged_setup([7, 3], 2, 8, dtype=dtype)
    q = torch.randn(2, 4, 3, 8, dtype=dtype)
    for slopes in (None, torch.rand(4)):
        torch.library.opcheck(torch.ops.optgptq.paged_attention.default,
                              (q, k_cache, v_cache, tables, lens, slopes, True, 0.35))
    torch.library.opcheck(torch.ops.optgptq.kv_write.default,
                          (torch.randn(3, 2, 8, dtype=dtype), torch.randn(3, 2, 8, dtype=dtype), k_cache.clone(),
                           v_cache.clone(), torch.tensor([3, -1, 17])))
    torch.library.opcheck(torch.ops.optgptq.kv_gather.default, (k_cache, tables, lens, 9, False))


def test_shape_errors_name_the_tensor():
    k_cache, v_cache, tables, lens, _ = _paged_setup([7, 3], 2, 8)
    q = torch.randn(2, 4, 1, 8)
    pa = torch.ops.optgptq.paged_attention
    with pytest.raises(ValueError, match="block_tables must be int32"):
        pa(q, k_cache, v_cache, tables.long(), lens, None, True, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        pa(q, k_cache, v_cache, tables, lens[:1], None, True, 1.0)
    with pytest.raises(ValueError, match="not a multiple of kv_heads"):
        pa(torch.randn(2, 3, 1, 8), k_cache, v_cache, tables, lens, None, True, 1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        pa(q, k_cache, v_cache, tables, lens, torch.rand(4, dtype=torch.float64), True, 1.0)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        torch.ops.optgptq.kv_write(torch.randn(2, 2, 8), torch.randn(2, 2, 8), k_cache, v_cache,
                                   torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="heads/head_dim"):
        torch.ops.optgptq.kv_write(torch.randn(2, 3, 8), torch.randn(2, 3, 8), k_cache, v_cache, torch.tensor([1, 2]))


def test_kv_write_all_padding_changes_nothing():
    # a CUDA-graph batch padded to its captured size can be all padding; the reference must not sync or write
    k_cache, v_cache = torch.randn(2, 2, BLOCK_SIZE, 2, 8)
    before = (k_cache.clone(), v_cache.clone())
    torch.ops.optgptq.kv_write(torch.randn(3, 2, 8), torch.randn(3, 2, 8), k_cache, v_cache, torch.full((3,), -1))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
