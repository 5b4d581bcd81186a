"""Cases for optgptq::rope_kv_write_triton in the Triton interpreter (CPU) against the reference
(``torch_rope_kv_write``). Collected by test_triton_rope_kv_write.py in a process started with TRITON_INTERPRET=1."""

import pytest
import torch

import optgptq_compile  # noqa: F401  (registers the ops and the backend)
from optgptq_compile.lowering import triton_rope_kv_write as T
from optgptq_compile.lowering.rope_kv_write import torch_rope_kv_write
from tests.lowering.test_rope_kv_write_op import _inputs
from tests.models import call_targets, recording, tiny_llama

# the kernel rounds a*c - b*s once, the reference after every op (as HF does): one or two rounding steps apart
TOL = {torch.float32: 1e-5, torch.float16: 4e-3}


def _fused_qkv_views(b, hq, hkv, sq, d, dtype, seed=0):
    """q, k, v as strided views of one fused projection output [B, Sq, (Hq + 2 Hkv) D], the way the graph hands
    them over: q [B, Hq, Sq, D] (transposed), k and v [B * Sq, Hkv, D]."""
    g = torch.Generator().manual_seed(seed + 7)
    qkv = torch.randn(b, sq, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[..., : hq * d].reshape(b, sq, hq, d).transpose(1, 2)
    k = qkv[..., hq * d: (hq + hkv) * d].reshape(b * sq, hkv, d)
    v = qkv[..., (hq + hkv) * d:].reshape(b * sq, hkv, d)
    return q, k, v


@pytest.mark.parametrize("b,hq,hkv,sq,d,dtype,broadcast", [
    (3, 4, 1, 1, 128, torch.float16, False),  # decode, GQA 4, head 128: one token per sequence
    (1, 7, 1, 5, 64, torch.float32, True),  # GQA 7, cos/sin shared by the batch
    (2, 2, 2, 9, 80, torch.float16, False),  # head 80: halves of 40 in 64 lanes; 18 tokens = a program and a bit
    (4, 4, 2, 4, 16, torch.float32, False),  # 16 tokens: exactly one program
])
def test_matches_reference_on_strided_views(b, hq, hkv, sq, d, dtype, broadcast):
    _, _, _, cos, sin, k_cache, v_cache, _ = _inputs(b, hq, hkv, sq, d, dtype, broadcast)
    g = torch.Generator().manual_seed(b * 100 + sq)
    # any cos/sin, not HF's (whose two halves are equal): a kernel mixing up the halves must fail here
    cos, sin = torch.randn(cos.shape, generator=g).to(dtype), torch.randn(sin.shape, generator=g).to(dtype)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if num_slots < b * sq:  # room for every token
        k_cache = torch.randn(-(-b * sq // k_cache.shape[1]) + 2, *k_cache.shape[1:], generator=g).to(dtype)
        v_cache = torch.randn_like(k_cache)
        num_slots = k_cache.shape[0] * k_cache.shape[1]
    slots = torch.randperm(num_slots, generator=g)[: b * sq]
    slots[torch.rand(b * sq, generator=g) < 0.3] = -1
    slots[0] = -1  # a padding row first
    q, k, v = _fused_qkv_views(b, hq, hkv, sq, d, dtype)
    assert not q.is_contiguous() and not k.is_contiguous()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = torch_rope_kv_write(q.float(), k.float(), v.float(), cos.float(), sin.float(), k_ref, v_ref, slots)
    before = k_cache.clone()
    out = T.rope_kv_write_launch(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert out.is_contiguous() and out.dtype == dtype
    torch.testing.assert_close(out.float(), q_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k_cache.float(), k_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(v_cache, v_ref)  # v is copied, not computed
    written = torch.zeros(num_slots, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    flat_before, flat_after = before.view(num_slots, hkv, d), k_cache.view(num_slots, hkv, d)
    assert torch.equal(flat_after[~written], flat_before[~written])  # padding rows and every other slot untouched


def test_all_padding_writes_nothing_but_still_rotates_q():
    q, k4, v, cos, sin, k_cache, v_cache, _ = _inputs(2, 4, 2, 1, 16, torch.float32)
    k = k4.transpose(1, 2).reshape(2, 2, 16)
    before = (k_cache.clone(), v_cache.clone())
    out = T.rope_kv_write_launch(q, k, v, cos, sin, k_cache, v_cache, torch.full((2,), -1))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])  # a CUDA-graph padding step
    q_ref = torch_rope_kv_write(q, k, v, cos, sin, *before, torch.full((2,), -1))
    torch.testing.assert_close(out, q_ref, atol=1e-5, rtol=1e-5)


def test_opcheck():
    q, k4, v, cos, sin, k_cache, v_cache, slots = _inputs(2, 4, 2, 3, 16, torch.float32)
    k = k4.transpose(1, 2).reshape(6, 2, 16)
    # test_aot_dispatch_*: an interpreted kernel cannot be recorded into AOTDispatcher's graph (see the paged cases)
    torch.library.opcheck(torch.ops.optgptq.rope_kv_write_triton.default, (q, k, v, cos, sin, k_cache, v_cache, slots),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_variant_has_the_base_schema():
    for base, entry in T.VARIANTS.items():
        assert str(entry["triton"]._schema).split("(", 1)[1] == str(base._schema).split("(", 1)[1]


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k4, v, cos, sin, k_cache, v_cache, slots = _inputs(1, 2, 1, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="CUDA/ROCm device"):
        torch.ops.optgptq.rope_kv_write_triton(q, k4.reshape(1, 1, 8), v, cos, sin, k_cache, v_cache, slots)


def test_generate_with_the_triton_kernel_matches_reference():
    """The runtime end to end on a GQA Llama: prefill of ragged prompts and decode steps through the fused op (with
    fuse_rope_attention off, which would fold it into the attention: triton_paged_attention_cases covers that)."""
    prompts = [[5, 9, 14, 3, 22], [7], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    outs = {}
    for kernels in ("reference", "triton"):
        torch._dynamo.reset()
        model = torch.compile(tiny_llama(layers=1), backend="optgptq",
                              options={"bits": None, "kernels": kernels, "strict": True,
                                       "fuse_rope_attention": False})
        with recording() as graphs:
            outs[kernels] = optgptq_compile.generate(model, prompts, 4, block_size=8)
        targets = {t for gm in graphs for t in call_targets(gm)}
        want = torch.ops.optgptq.rope_kv_write_triton.default if kernels == "triton" else \
            torch.ops.optgptq.rope_kv_write.default
        assert want in targets and torch.ops.optgptq.kv_write.default not in targets
    assert outs["triton"] == outs["reference"]
