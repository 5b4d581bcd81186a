"""optgptq::rope_kv_write: HF's apply_rotary_pos_emb bit for bit, the pool writes, opcheck, shape errors."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import optgptq_compile  # noqa: F401  (registers the ops)


def _inputs(b, hq, hkv, sq, d, dtype, broadcast_batch=False, seed=0):
    """q/k as HF holds them ([B, H, Sq, D]), v, HF-style cos/sin of random positions, a pool and scattered slots
    (a third of them padding)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k4 = torch.randn(b, hkv, sq, d, generator=g).to(dtype)
    v = torch.randn(b * sq, hkv, d, generator=g).to(dtype)
    pos = torch.randint(0, 500, (1 if broadcast_batch else b, sq), generator=g).float()
    freqs = pos[..., None] / (10000 ** (torch.arange(0, d, 2).float() / d))  # [Bc, Sq, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [Bc, 1, Sq, D]
    num_blocks, block_size = 6, 4
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[: b * sq]
    slots[torch.rand(b * sq, generator=g) < 0.3] = -1
    return q, k4, v, cos, sin, k_cache, v_cache, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,sq,d,broadcast", [
    (2, 4, 2, 1, 16, False),  # decode, GQA 2
    (3, 6, 6, 5, 8, False),  # prefill chunk, MHA
    (2, 7, 1, 3, 80, True),  # GQA 7, head 80, cos/sin shared by the batch ([1, 1, Sq, D])
])
def test_matches_hf_rope_and_kv_write_bit_for_bit(dtype, b, hq, hkv, sq, d, broadcast):
    q, k4, v, cos, sin, k_cache, v_cache, slots = _inputs(b, hq, hkv, sq, d, dtype, broadcast)
    q_hf, k_hf = apply_rotary_pos_emb(q, k4, cos[:, 0], sin[:, 0])  # HF unsqueezes dim 1 itself
    k = k4.transpose(1, 2).reshape(b * sq, hkv, d)  # [T, Hkv, D], token-major like slot_mapping
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    torch.ops.optgptq.kv_write(k_hf.transpose(1, 2).reshape(b * sq, hkv, d), v, k_ref, v_ref, slots)
    out = torch.ops.optgptq.rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert out.is_contiguous() and torch.equal(out, q_hf)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k4, v, cos, sin, k_cache, v_cache, slots = _inputs(2, 4, 2, 3, 8, dtype)
    k = k4.transpose(1, 2).reshape(6, 2, 8)
    torch.library.opcheck(torch.ops.optgptq.rope_kv_write.default, (q, k, v, cos, sin, k_cache, v_cache, slots))


def test_shape_errors_name_the_tensor():
    q, k4, v, cos, sin, k_cache, v_cache, slots = _inputs(2, 4, 2, 1, 8, torch.float32)
    k = k4.transpose(1, 2).reshape(2, 2, 8)
    op = torch.ops.optgptq.rope_kv_write
    with pytest.raises(ValueError, match="q .* must be"):
        op(q[0], k, v, cos, sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="cos .* must broadcast"):
        op(q, k, v, cos[:, 0], sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="sin dtype"):
        op(q, k, v, cos, sin.double(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match=r"k .* must be \[B \* Sq"):
        op(q, k[:1], v[:1], cos, sin, k_cache, v_cache, slots[:1])
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        op(q, k, v, cos, sin, k_cache, v_cache, slots.int())
    with pytest.raises(ValueError, match="head_dim 7 must be even"):
        op(torch.randn(2, 4, 1, 7), k, v, cos, sin, k_cache, v_cache, slots)
