"""Cases for optgptq::paged_attention_triton and optgptq::kv_write_triton in the Triton interpreter (CPU) against the
references (``torch_paged_attention`` / ``torch_kv_write``). Collected by test_triton_paged_attention.py in a process
started with TRITON_INTERPRET=1. Shapes are small on purpose: the interpreter runs each program in numpy."""

import math

import pytest
import torch

import optgptq_compile  # noqa: F401  (registers the ops and the backend)
from optgptq_compile.lowering import triton_paged_attention as T
from optgptq_compile.lowering.paged_attention import torch_kv_write, torch_paged_attention
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

TOL = {torch.float16: 3e-3, torch.float32: 2e-5}  # fp16: P is rounded to fp16 before P @ V (~1e-3 relative)


def _paged(context_lens, hq, hkv, d, block_size, dtype, spare_blocks=1, seed=0, unused=-1):
    """Random pools, random (shuffled: non-contiguous, non-monotonic) distinct blocks per sequence, ``spare_blocks``
    trailing table entries past the longest sequence. Unused entries hold ``unused`` (-1) or, with ``unused=None``,
    blocks of other sequences (a kernel that reads past a context then gets wrong numbers, not a crash)."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in context_lens) + spare_blocks
    num_blocks = len(context_lens) * width + 3
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(context_lens), width), -1, dtype=torch.int32)
    for b, n in enumerate(context_lens):
        used = -(-n // block_size)
        tables[b, :used] = perm[b * width: b * width + used].int()
        if unused is None:
            tables[b, used:] = perm[torch.randint(0, num_blocks, (width - used,), generator=g)].int()
    return k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32)


def _check(context_lens, hq, hkv, d, sq, block_size, dtype, config, alibi, causal, seed=0, unused=-1, spare=1):
    k_cache, v_cache, tables, lens = _paged(context_lens, hq, hkv, d, block_size, dtype, spare, seed, unused)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(context_lens), hq, sq, d, generator=g).to(dtype)
    slopes = torch.rand(hq, generator=g) * 0.3 if alibi else None
    scale = 1 / math.sqrt(d)
    out = T.paged_attention_fwd(q, k_cache, v_cache, tables, lens, slopes, causal, scale, config=config)
    ref = torch_paged_attention(q.double(), k_cache.double(), v_cache.double(), tables, lens, slopes, causal, scale)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])
    for b, n in enumerate(context_lens):  # rows with no key to attend to are exactly zero
        if n == 0:
            assert out[b].abs().max() == 0
        elif causal and n < sq:
            assert out[b, :, : sq - n].abs().max() == 0 and out[b, :, sq - n:].abs().max() > 0
    return out


def cfg(block_m=16, block_n=16, splits=1, num_stages=2):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=num_stages, SPLITS=splits)


# (id, context_lens, Hq, Hkv, D, Sq, block_size, dtype, config) -- each case states what it is for
CASES = [
    # decode GQA 4, head 128; contexts end exactly on a block (16) and a KV tile (32), just past each, a 1-token
    # context; 4 splits of 32 keys over a 112-key table: the 1- and 33-token sequences get splits that start past them
    ("decode g4 d128 bs16 split", [16, 33, 1, 64, 65, 32], 8, 2, 128, 1, 16, torch.float16, cfg(16, 32, 4)),
    # GQA 7 (7 of 16 rows), head 80 (padded to 128 lanes), block 8: a 16-key tile spans two pool blocks; a context-0
    # row (a CUDA-graph padding slot) gives zeros
    ("decode g7 d80 bs8", [8, 9, 31, 32, 0, 17], 14, 2, 80, 1, 8, torch.float16, cfg(16, 16, 1)),
    # MHA, head 64, block 32 > tile 16 (a tile is half a block); split into 2
    ("decode g1 d64 bs32 split", [32, 33, 95, 1], 4, 4, 64, 1, 32, torch.float16, cfg(16, 16, 2)),
    # 3 new tokens (12 rows of one tile), one context of 2 < Sq: its first row is left padding
    ("sq3 g4 d64 bs16", [3, 17, 2, 48], 8, 2, 64, 3, 16, torch.float16, cfg(16, 16, 1)),
    # prefill of left-padded prompts (Sq = longest prompt, 20; contexts 20, 7, 1, 16): 80 rows in tiles of 32
    # (8 positions a tile), rows of the shorter prompts' padding see no key
    ("prefill g4 d128 bs16", [20, 7, 1, 16], 8, 2, 128, 20, 16, torch.float16, cfg(32, 16, 1)),
    # prefill with GQA 7 (tiles of 32 rows split a position's 7 heads), block 8, split into 3 (splits past short
    # contexts), head 80
    ("prefill g7 d80 bs8 split", [12, 5, 9], 14, 2, 80, 12, 8, torch.float16, cfg(32, 16, 3)),
    # chunked prefill: 6 new tokens at the end of long contexts, 64-row tiles
    ("chunk g4 d64 bs16", [70, 6, 33], 8, 2, 64, 6, 16, torch.float16, cfg(64, 32, 1)),
    # fp32 (exact IEEE dots): decode split and prefill
    ("fp32 decode g4 d64 bs16 split", [16, 41, 3], 8, 2, 64, 1, 16, torch.float32, cfg(16, 16, 3)),
    ("fp32 prefill g1 d80 bs8", [9, 4], 2, 2, 80, 9, 8, torch.float32, cfg(16, 16, 1)),
    # the launcher's own choice (pick_config: 64-key tiles, 3 stages; 1 sequence x 2 KV heads < the interpreter's 4
    # "SMs" and a 224-key table -> 4 one-tile splits of 64 keys), a context just past three 64-key tiles
    ("picked decode g4 d128 bs16", [193], 8, 2, 128, 1, 16, torch.float16, None),
    ("picked prefill g4 d64 bs16", [24, 11], 8, 2, 64, 24, 16, torch.float16, None),
    # the launcher's choice with enough programs to fill the interpreter's 4 "SMs" unsplit (5 sequences x 2 KV
    # heads): 128-key tiles, 8 warps; contexts ending on a tile (128), just past it (129), one token, and 193
    # (a full tile, then a masked one)
    ("picked batch decode g4 d128 bs16", [193, 40, 128, 129, 1], 8, 2, 128, 1, 16, torch.float16, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("alibi,causal", [(False, True), (True, True), (True, False), (False, False)])
def test_paged_attention_matches_reference(case, alibi, causal):
    _, lens, hq, hkv, d, sq, bs, dtype, config = case
    _check(lens, hq, hkv, d, sq, bs, dtype, config, alibi, causal)


def test_unused_table_entries_are_never_read():
    """Entries past each context point at other sequences' blocks: reading them would change the output."""
    _check([17, 40, 1], 8, 2, 64, 1, 8, torch.float16, cfg(16, 16, 3), alibi=True, causal=True, unused=None, spare=3)


def test_every_split_writes_its_partials(monkeypatch):
    """Scratch starts as NaN: splits that start past a context must still write a neutral partial."""
    monkeypatch.setattr(T, "_scratch", lambda shape, device: torch.full(shape, float("nan"), device=device))
    # 6 splits of 16 keys over a 96-key table; contexts 1 and 16 leave 5 of them empty
    out = _check([1, 16, 47], 8, 2, 64, 1, 16, torch.float16, cfg(16, 16, 6), alibi=False, causal=True, spare=3)
    assert torch.isfinite(out).all()


def test_split_count_from_shapes_only():
    """The number of splits depends on batch, heads and the table width, never on context_lens (CUDA graphs)."""
    assert T.num_splits(256, 8, max_context=4096, block_n=64, num_sms=132) == 1  # batch 32 x 8 KV heads: no split
    assert T.num_splits(8, 8, max_context=4096, block_n=64, num_sms=132) == 64  # batch 1: one tile a split
    assert T.num_splits(64, 8, max_context=4096, block_n=64, num_sms=132) == 64  # batch 8: split as batch 1
    assert T.num_splits(8, 8, max_context=8192, block_n=64, num_sms=132) == 33  # 128 tiles: ~2 programs per SM
    assert T.num_splits(8, 8, max_context=640, block_n=64, num_sms=132) == 10  # short context: one tile a split
    assert T.num_splits(8, 8, max_context=64, block_n=64, num_sms=132) == 1  # one tile: nothing to split
    batch = T.pick_config(32, 8, 1, 4, 128, 4096, torch.float16, num_sms=132)  # unsplit decode: 128-key tiles
    assert (batch["SPLITS"], batch["BLOCK_N"], batch["num_warps"]) == (1, 128, 8)
    assert T.pick_config(32, 8, 1, 4, 128, 4096, torch.float16, num_sms=132, hip=True)["BLOCK_N"] == 64  # 64 KB LDS
    small = T.pick_config(1, 8, 1, 4, 128, 8192, torch.float16, num_sms=132)
    assert small["SPLITS"] > 1 and small["BLOCK_M"] == 16
    picked = T.pick_config(1, 2, 1, 4, 128, 224, torch.float16, num_sms=T.num_sms())  # the "picked decode" case
    assert picked["SPLITS"] == 4


def test_dynamic_batch_compiles_twice():
    """Under torch.compile with a dynamic batch the launcher's choices guard on the batch once (split or not), so
    decode steps of every batch size share two compiled graphs instead of recompiling per size."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def attend(q, k_cache, v_cache, tables, lens):
        return torch.ops.optgptq.paged_attention_triton(q, k_cache, v_cache, tables, lens, None, True, 0.25) * 2

    compiled = torch.compile(attend, backend=counter, dynamic=True)
    k_cache, v_cache, tables, lens = _paged([9, 32, 17, 1, 30, 25, 8, 3, 12], 4, 1, 16, 8, torch.float16)
    for b in (2, 3, 5, 9, 6):  # the interpreter's 4 "SMs": batches 2-3 split, 4+ do not
        q = torch.randn(b, 4, 1, 16, dtype=torch.float16)
        args = (q, k_cache, v_cache, tables[:b], lens[:b])
        torch.testing.assert_close(compiled(*args), attend(*args), rtol=0, atol=0)
    torch._dynamo.reset()
    assert counter.frame_count == 2


def test_noncontiguous_query():
    """q as HF produces it: [B, Sq, Hq, D] transposed to [B, Hq, Sq, D]."""
    k_cache, v_cache, tables, lens = _paged([5, 19], 8, 2, 64, 8, torch.float16)
    q = torch.randn(2, 5, 8, 64, dtype=torch.float16).transpose(1, 2)
    out = T.paged_attention_fwd(q, k_cache, v_cache, tables, lens, None, True, 0.125, config=cfg(32, 16, 2))
    ref = torch_paged_attention(q.double(), k_cache.double(), v_cache.double(), tables, lens, None, True, 0.125)
    torch.testing.assert_close(out.double(), ref, rtol=3e-3, atol=3e-3)


# ----------------------------------------------------------------------------------------------------------------
# kv_write


@pytest.mark.parametrize("t,hkv,d,block_size,dtype,src_dtype", [
    (37, 2, 128, 16, torch.float16, torch.float16),  # 37 tokens: 2 full programs of 16 + a partial one
    (5, 3, 80, 8, torch.float16, torch.float32),  # head 80 (masked lanes); fp32 K/V cast into an fp16 pool
    (16, 1, 64, 32, torch.float32, torch.float32),  # exactly one program
])
def test_kv_write_matches_reference(t, hkv, d, block_size, dtype, src_dtype):
    g = torch.Generator().manual_seed(t)
    num_blocks = 9
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(src_dtype)
    v = torch.randn(t, hkv, d, generator=g).to(src_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]  # distinct, scattered over blocks
    slots[torch.rand(t, generator=g) < 0.3] = -1  # padding rows
    slots[0] = -1  # a padding row first: the reference then rewrites a later row's slot
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_before = k_cache.clone()
    torch_kv_write(k, v, k_ref, v_ref, slots)
    T.kv_write_launch(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    flat_before, flat_after = k_before.view(-1, hkv, d), k_cache.view(-1, hkv, d)
    assert torch.equal(flat_after[~written], flat_before[~written])  # every other slot untouched
    assert torch.equal(flat_after[slots[slots >= 0]], k[slots >= 0].to(dtype))


def test_kv_write_all_padding_and_strided_input():
    k_cache = torch.randn(4, 8, 2, 64, dtype=torch.float16)
    v_cache = torch.randn(4, 8, 2, 64, dtype=torch.float16)
    before = (k_cache.clone(), v_cache.clone())
    k = torch.randn(2, 6, 64, dtype=torch.float16).transpose(0, 1)  # [6, 2, 64], not contiguous
    v = torch.randn(2, 6, 64, dtype=torch.float16).transpose(0, 1)
    T.kv_write_launch(k, v, k_cache, v_cache, torch.full((6,), -1))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])  # CUDA-graph padding step
    slots = torch.tensor([3, -1, 17, 30, -1, 8])
    T.kv_write_launch(k, v, k_cache, v_cache, slots)
    torch_kv_write(k, v, *before, slots)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_kv_write_k_and_v_with_different_strides():
    # a decode batch's v is a view of the fused qkv output (row stride 3 x heads x dim) while k comes out of RoPE
    # contiguous; the kernel reads each with its own strides instead of copying both
    k_cache, v_cache = torch.randn(4, 8, 2, 64, dtype=torch.float16), torch.randn(4, 8, 2, 64, dtype=torch.float16)
    before = (k_cache.clone(), v_cache.clone())
    qkv = torch.randn(5, 3, 2, 64, dtype=torch.float16)
    k, v = torch.randn(5, 2, 64, dtype=torch.float16), qkv[:, 2]
    assert k.stride() != v.stride()
    slots = torch.tensor([3, 17, -1, 30, 8])
    T.kv_write_launch(k, v, k_cache, v_cache, slots)
    torch_kv_write(k, v, *before, slots)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# ----------------------------------------------------------------------------------------------------------------
# the ops: opcheck, errors, the runtime end to end


def test_opcheck_paged_attention():
    k_cache, v_cache, tables, lens = _paged([5, 12], 4, 2, 16, 8, torch.float16)
    args = (torch.randn(2, 4, 1, 16, dtype=torch.float16), k_cache, v_cache, tables, lens, torch.rand(4), True, 0.25)
    # test_aot_dispatch_*: an interpreted kernel cannot be recorded into AOTDispatcher's graph (wrap_triton records
    # JIT kernels only); Inductor's tracing of the JIT kernel runs on the GPU (benchmarks/bench_paged_attention.py)
    torch.library.opcheck(torch.ops.optgptq.paged_attention_triton.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_kv_write():
    k_cache, v_cache = torch.randn(3, 8, 2, 16), torch.randn(3, 8, 2, 16)
    args = (torch.randn(4, 2, 16), torch.randn(4, 2, 16), k_cache, v_cache, torch.tensor([5, -1, 20, 0]))
    torch.library.opcheck(torch.ops.optgptq.kv_write_triton.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_variants_have_the_base_schemas():
    for base, entry in T.VARIANTS.items():
        assert entry["prepare"] is None
        strip = str(base._schema).split("(", 1)[1]
        assert str(entry["triton"]._schema).split("(", 1)[1] == strip  # same arguments, mutation and result


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    k_cache, v_cache, tables, lens = _paged([5], 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="CUDA/ROCm device"):
        torch.ops.optgptq.paged_attention_triton(torch.randn(1, 4, 1, 16), k_cache, v_cache, tables, lens, None,
                                                 True, 0.25)
    with pytest.raises(ValueError, match="CUDA/ROCm device"):
        torch.ops.optgptq.kv_write_triton(torch.randn(1, 2, 16), torch.randn(1, 2, 16), k_cache, v_cache,
                                          torch.tensor([0]))


@pytest.mark.parametrize("make", [tiny_llama, tiny_bloom], ids=["llama", "bloom"])
def test_generate_with_triton_kernels_matches_reference(make):
    """The runtime end to end: prefill of left-padded prompts and decode steps through the Triton ops."""
    prompts = [[5, 9, 14, 3, 22], [7], [30, 31, 32, 33, 34, 35, 36, 37, 38]]  # ragged: left padding in prefill
    outs = {}
    for kernels in ("reference", "triton"):
        torch._dynamo.reset()
        model = make(layers=1)
        model = torch.compile(model, backend="optgptq", options={"bits": None, "kernels": kernels, "strict": True})
        with recording() as graphs:
            outs[kernels] = optgptq_compile.generate(model, prompts, 4, block_size=8)
        targets = {t for gm in graphs for t in call_targets(gm)}
        if kernels == "triton":
            # Llama: RoPE, KV write and attention in one op (fuse_rope_kv_write, then fuse_rope_attention); BLOOM
            # (ALiBi, no RoPE): the KV write and paged attention
            ops = torch.ops.optgptq
            wanted = ([ops.rope_paged_attention_triton] if make is tiny_llama
                      else [ops.kv_write_triton, ops.paged_attention_triton])
            assert {op.default for op in wanted} <= targets
            assert not {ops.paged_attention.default, ops.rope_paged_attention.default} & targets
    assert outs["triton"] == outs["reference"]
