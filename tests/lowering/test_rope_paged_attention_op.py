"""optgptq::rope_paged_attention: rope_kv_write then paged_attention bit for bit (output and both pools), opcheck,
shape errors from either part."""

import math

import pytest
import torch

from tests.lowering.test_paged_attention_op import BLOCK_SIZE, _paged_setup  # (imports optgptq_compile: the ops)
from tests.lowering.test_rope_kv_write_op import _inputs as _rope_inputs


def _inputs(context_lens, sq, hq, hkv, d, dtype, padded_row=None, alibi=False, seed=0):
    """The op's 13 arguments: a pool whose sequences sit in scattered blocks (``_paged_setup``) with the new
    tokens as the last ``sq`` of each context; tokens at positions before 0 (a context shorter than the chunk:
    left padding) and every token of ``padded_row`` (context length 0, a padded CUDA-graph batch row) get slot -1."""
    b = len(context_lens)
    k_cache, v_cache, tables, lens, _ = _paged_setup(context_lens, hkv, d, dtype=dtype, seed=seed)
    q, k4, v, cos, sin, *_ = _rope_inputs(b, hq, hkv, sq, d, dtype, seed=seed)
    k = k4.transpose(1, 2).reshape(b * sq, hkv, d)  # [T, Hkv, D], token-major like slot_mapping
    if padded_row is not None:
        lens[padded_row] = 0
    pos = lens.long()[:, None] - sq + torch.arange(sq)  # [B, Sq] position of each new token
    slots = tables.long().gather(1, pos.clamp(min=0) // BLOCK_SIZE) * BLOCK_SIZE + pos % BLOCK_SIZE
    slots = torch.where(pos >= 0, slots, -1).reshape(-1)  # [T]
    slopes = torch.rand(hq, generator=torch.Generator().manual_seed(seed)) * 0.5 if alibi else None
    return [q, k, v, cos, sin, k_cache, v_cache, slots, tables, lens, slopes, not alibi, 1 / math.sqrt(d)]


CASES = [
    # (context_lens, Sq, Hq, Hkv, padded_row, alibi)
    ([13, 1, 7, 20], 1, 8, 2, None, False),  # decode, GQA 4, ragged contexts crossing blocks
    ([9, 5, 6], 1, 4, 4, 1, False),  # decode, MHA, row 1 a padding row: slot -1, context 0
    ([5, 9, 3], 5, 6, 2, None, False),  # prefill chunk, GQA 3; row 2 has two left-padding tokens (slot -1)
    ([12, 6], 3, 4, 2, None, True),  # a chunk with ALiBi slopes, not causal: the op passes both through
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("context_lens,sq,hq,hkv,padded_row,alibi", CASES)
def test_equals_rope_kv_write_then_paged_attention_bit_for_bit(dtype, context_lens, sq, hq, hkv, padded_row, alibi):
    args = _inputs(context_lens, sq, hq, hkv, 16, dtype, padded_row, alibi)
    q, k, v, cos, sin, k_cache, v_cache, slots, tables, lens, slopes, causal, scale = args
    k_ref, v_ref, before = k_cache.clone(), v_cache.clone(), k_cache.clone()
    q_embed = torch.ops.optgptq.rope_kv_write(q, k, v, cos, sin, k_ref, v_ref, slots)
    ref = torch.ops.optgptq.paged_attention(q_embed, k_ref, v_ref, tables, lens, slopes, causal, scale)
    out = torch.ops.optgptq.rope_paged_attention(*args)
    assert out.is_contiguous() and out.dtype == dtype and torch.equal(out, ref)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert bool((slots < 0).any()) == (padded_row is not None or min(context_lens) < sq)  # padding where meant
    written = slots[slots >= 0]
    assert not torch.equal(k_cache.view(-1, hkv, 16)[written], before.view(-1, hkv, 16)[written])  # stored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alibi", [False, True])
def test_opcheck(dtype, alibi):
    args = _inputs([7, 3], 2, 4, 2, 8, dtype, alibi=alibi)
    torch.library.opcheck(torch.ops.optgptq.rope_paged_attention.default, tuple(args))


def test_shape_errors_name_the_tensor():
    args = _inputs([7, 3], 1, 4, 2, 8, torch.float32)
    op = torch.ops.optgptq.rope_paged_attention

    def call(**replace):
        names = ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "slot_mapping", "block_tables", "context_lens")
        op(*[replace.get(n, a) for n, a in zip(names, args)], *args[10:])

    with pytest.raises(ValueError, match=r"rope_kv_write: q .* must be \[B, Hq, Sq, D\]"):
        call(q=args[0][0])
    with pytest.raises(ValueError, match=r"k .* must be \[B \* Sq"):
        call(k=args[1][:1], v=args[2][:1], slot_mapping=args[7][:1])
    with pytest.raises(ValueError, match="cos .* must broadcast"):
        call(cos=args[3][:, 0])
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        call(slot_mapping=args[7].int())
    with pytest.raises(ValueError, match="block_tables must be int32"):
        call(block_tables=args[8].long())
    with pytest.raises(ValueError, match="context_lens must be int32"):
        call(context_lens=args[9][:1])
    with pytest.raises(ValueError, match="alibi_slopes must be float32"):
        op(*args[:10], torch.rand(4, dtype=torch.float64), *args[11:])
