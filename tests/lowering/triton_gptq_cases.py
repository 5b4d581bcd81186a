"""Cases for optgptq::gptq_linear_triton in the Triton interpreter (CPU) against the reference: every kernel variant,
bit width and group layout, and the compile-time act-order sort. Collected by test_triton_gptq_linear.py in a
process started with TRITON_INTERPRET=1. Shapes are small on purpose: the interpreter runs each program in numpy."""

import pytest
import torch
import torch.fx as fx

import optgptq_compile  # noqa: F401  (registers the ops and the backend)
from optgptq_compile.lowering import triton_gptq_linear as T
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear
from optgptq_compile.quant.format import default_g_idx, pack_weight
from tests.models import call_targets, recording, tiny_llama


def _weights(n, k, bits, group_size, act_order, seed=0, scale_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).to(scale_dtype)
    g_idx = default_g_idx(k, group_size)
    if act_order:  # channels of one group scattered over K, as GPTQ's act-order leaves them
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return pack_weight(q, zeros, scales, g_idx, bits, group_size)


def _check(w, x, bias, config=None, tol=2e-3):
    y = T.gptq_matmul(x, w.qweight, w.qzeros, w.scales, w.g_idx, bias, w.bits, w.group_size, config=config)
    ref = torch_gptq_linear(x.double(), w.qweight, w.qzeros, w.scales, w.g_idx,
                            None if bias is None else bias.double(), w.bits)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < tol, err  # fp16 outputs round at ~5e-4 relative; a wrong group or bit is >> 1e-2


# N=48: not a multiple of any BLOCK_N (masked columns); K=320: 10 groups of 32, or 2 of 128 plus a partial 64
@pytest.mark.parametrize("bits,group_size,act_order", [
    (4, 128, False), (4, 32, False), (4, -1, False), (4, 128, True),  # 4-bit: every group layout, act-order
    (8, 128, True), (8, 32, False),  # 8-bit: 4 values a word
    (3, 128, False), (3, 32, True),  # 3-bit: values straddle words (gather path)
    (2, -1, False), (2, 128, True),  # 2-bit: 16 values a word
])
@pytest.mark.parametrize("m", [1, 5, 16, 33, T.DEQUANT_MIN_M])  # gemv, dot (5: masked rows; 16: a full tile),
# dot with 64-row blocks, dequant + matmul
def test_matches_reference(bits, group_size, act_order, m):
    w = _weights(48, 320, bits, group_size, act_order)
    x = torch.randn(m, 320, dtype=torch.float16)
    _check(w, x, torch.randn(48, dtype=torch.float16) if m != 16 else None)


VARIANTS = {  # every kernel path, forced, on 4-bit g32 act-order-free weights
    "gemv one split": dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SPLIT_K=1),
    "gemv split-K": dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2, SPLIT_K=7),
    "gemv unpipelined": dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=1,
                             SPLIT_K=3),
    "dot interleaved": dict(KERNEL="dot", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4,
                            num_stages=2, SPLIT_K=2),
    "dot reshape": dict(KERNEL="dot", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2,
                        SPLIT_K=1, INTERLEAVE=False),
    "dot word gather": dict(KERNEL="dot", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4,
                            num_stages=2, SPLIT_K=3, UNPACK_RESHAPE=False, INTERLEAVE=False),
    "dot multi-tile grouped order": dict(KERNEL="dot", BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=2,
                                         num_warps=4, num_stages=2, SPLIT_K=1),
    # prefill's dequant kernel: 64-row tiles straddle two g32 groups (every row gathers its group) ...
    "dequant": dict(KERNEL="dequant", BLOCK_K=64, BLOCK_N=32, num_warps=4, num_stages=1),
    # ... one group per 32-row tile (one row of scales per tile, unless act-order g_idx fails the tile's check) ...
    "dequant tile per group": dict(KERNEL="dequant", BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=1),
    # ... and 32 columns at a time through one buffer (N=80: chunks of 32, 32 and a ragged 16)
    "dequant chunked": dict(KERNEL="dequant", BLOCK_K=32, BLOCK_N=32, CHUNK_N=32, num_warps=4, num_stages=1),
    # gptq_dot_kernel (M = 2..64): 3 row blocks of 16 (the last masked), ragged N (80 = 2.5 tiles of 32), split-K
    # reduced by the last program of each of the 9 output tiles
    "wdot split-K": dict(KERNEL="wdot", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SPLIT_K=3),
    # one split, a 64-row block holding all 40 rows, 64-column tiles (the second one mostly masked)
    "wdot one split bm64": dict(KERNEL="wdot", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3,
                                SPLIT_K=1),
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("act_order", [False, True])  # True: the per-row-group loop (unsorted g_idx at run time)
def test_every_kernel_variant(name, act_order):
    w = _weights(80, 448, 4, 32, act_order, seed=1)  # K=448: 14 groups, 3.5 tiles of 128 (a partial last tile)
    m = 1 if name.startswith("gemv") else 40
    _check(w, torch.randn(m, 448, dtype=torch.float16), torch.randn(80, dtype=torch.float16), VARIANTS[name])


@pytest.mark.parametrize("dtype,m", [
    (torch.float32, 6),  # fp32 through tl.dot: must be exact fp32 (IEEE), not tf32
    (torch.float32, 1),
    (torch.bfloat16, 1),  # bf16 activations and scales, as HF checkpoints have them: gemv ...
    (torch.bfloat16, T.DEQUANT_MIN_M),  # ... and dequant + matmul. (bf16 tl.dot is wrong in triton 3.9's
    # interpreter -- it returns ~1e11 for inputs the fp16 dot gets right -- so bf16 dot is checked on the GPU, in
    # benchmarks/bench_gptq_matmul.py, at full size.)
])
def test_activation_dtypes(dtype, m):
    w = _weights(40, 256, 4, 64, False, scale_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    x = torch.randn(m, 256, dtype=dtype)
    _check(w, x, None, tol=1e-5 if dtype == torch.float32 else 1e-2)


def test_three_dim_activation():
    w = _weights(40, 256, 4, 64, False)
    _check(w, torch.randn(2, 3, 256, dtype=torch.float16), None)  # [B, S, K] -> [B, S, N]


@pytest.mark.parametrize("m", [1, 3, 20])  # gemv, dot, dequant
def test_opcheck(m):
    w = _weights(32, 128, 4, 32, act_order=True)
    args = (torch.randn(m, 128, dtype=torch.float16), w.qweight, w.qzeros, w.scales, w.g_idx,
            torch.randn(32, dtype=torch.float16), 4, 32)
    # test_aot_dispatch_*: AOTDispatcher traces a triton_op's body, and an interpreted kernel cannot be recorded
    # into that graph (wrap_triton records JIT kernels only); Inductor's tracing of the JIT kernel is covered by
    # the GPU benchmark instead.
    torch.library.opcheck(torch.ops.optgptq.gptq_linear_triton.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    w = _weights(32, 128, 4, 32, act_order=False)
    with pytest.raises(ValueError, match="CUDA/ROCm device"):
        torch.ops.optgptq.gptq_linear_triton(torch.randn(1, 128), w.qweight, w.qzeros, w.scales, w.g_idx, None, 4,
                                             32)


class _Linear(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        for name, t in w.tensors().items():
            self.register_buffer(name, t)
        self.bits, self.group_size = w.bits, w.group_size

    def forward(self, x):
        return torch.ops.optgptq.gptq_linear.default(x, self.qweight, self.qzeros, self.scales, self.g_idx, None,
                                                     self.bits, self.group_size)


@pytest.mark.parametrize("bits", [4, 3])
def test_prepare_sorts_act_order_once(bits):
    w = _weights(40, 256, bits, 64, act_order=True)
    gm = fx.symbolic_trace(_Linear(w))
    x = torch.randn(4, 256, dtype=torch.float16)
    expected = gm(x)
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.optgptq.gptq_linear.default)
    T.prepare_node(gm, node)
    gm.recompile()
    g_idx = getattr(gm, node.args[4].target)
    assert bool((g_idx[1:] >= g_idx[:-1]).all())  # sorted: every tile of the kernel is one group
    assert torch.ops.aten.index_select.default in call_targets(gm)  # x[..., perm] at run time
    torch.testing.assert_close(gm(x), expected, rtol=2e-3, atol=2e-3)  # same function (fp16 matmul order)


def test_graphs_of_one_model_share_the_sorted_weights():
    """generate compiles a prefill and a decode graph over the same cached weights: one sorted copy, not one each."""
    w = _weights(40, 256, 4, 64, act_order=True)
    sorted_qweights = []
    for _ in range(2):
        gm = fx.symbolic_trace(_Linear(w))
        node = next(n for n in gm.graph.nodes if n.target == torch.ops.optgptq.gptq_linear.default)
        T.prepare_node(gm, node)
        sorted_qweights.append(getattr(gm, node.args[1].target))
    assert sorted_qweights[0] is sorted_qweights[1]


def test_sorted_weights_are_left_alone():
    gm = fx.symbolic_trace(_Linear(_weights(40, 256, 4, 64, act_order=False)))
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.optgptq.gptq_linear.default)
    before = [n.target for n in gm.graph.nodes]
    T.prepare_node(gm, node)
    assert [n.target for n in gm.graph.nodes] == before


def test_backend_kernels_triton_runs_the_triton_op():
    model = tiny_llama(layers=1)
    ids = torch.randint(3, 128, (1, 6))
    ref = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32, "kernels": "reference"})
    expected = ref(ids).logits
    torch._dynamo.reset()
    with recording() as graphs:
        compiled = torch.compile(model, backend="optgptq",
                                 options={"bits": 4, "group_size": 32, "kernels": "triton", "strict": True})
        logits = compiled(ids).logits
    targets = [t for g in graphs for t in call_targets(g)]
    # every linear of a Llama layer has a norm or a residual folded in (fuse_norm_residual)
    assert torch.ops.optgptq.gptq_linear_fused_triton.default in targets
    assert torch.ops.optgptq.gptq_linear.default not in targets
    assert torch.ops.optgptq.gptq_linear_fused.default not in targets
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_kernels_triton_without_a_device_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    model = tiny_llama(layers=1)
    compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "kernels": "triton", "strict": True})
    with pytest.raises(Exception, match="kernels='triton'.*cannot run on cpu"):
        compiled(torch.randint(3, 128, (1, 4)))


@pytest.mark.parametrize("act_order", [False, True])  # True: the gemv's per-channel-group fallback loop
@pytest.mark.parametrize("split", [1, 3])
def test_gemv_full_tiles_and_split_k_counters(act_order, split):
    """N and K multiples of the tile (the unmasked EVEN_N/EVEN_K build), and split-K's last-program reduction: three
    calls in a row give the same result, the bias is added once, and every tile counter is back to zero."""
    w = _weights(256, 512, 4, 128, act_order, seed=2)
    cfg = dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=128, BLOCK_K=64, num_warps=1, num_stages=2, SPLIT_K=split)
    x, bias = torch.randn(1, 512, dtype=torch.float16), torch.randn(256, dtype=torch.float16)
    ys = [T.gptq_matmul(x, w.qweight, w.qzeros, w.scales, w.g_idx, bias, 4, 128, config=cfg) for _ in range(3)]
    _check(w, x, bias, cfg)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])  # partial sums added in split order
    if split > 1:
        assert int(T._locks[x.device].count_nonzero()) == 0


@pytest.mark.parametrize("acc_rows,reduce_rows", [(False, 2), (True, 4), (False, 32)])
def test_gemv_sweep_options(acc_rows, reduce_rows):
    """The gemv config keys the benchmark sweep varies: per-column or per-row accumulators (ACC_ROWS), the split-K
    reduction in chunks of REDUCE_ROWS partial rows (7 splits: 2+2+2+1 or 4+3, the last chunk masked; or one
    chunk); bf16 x loaded as pairs and widened by a shift and a mask."""
    w = _weights(256, 896, 4, 128, False, seed=4, scale_dtype=torch.bfloat16)
    cfg = dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=128, BLOCK_K=64, num_warps=2, num_stages=2, SPLIT_K=7,
               ACC_ROWS=acc_rows, REDUCE_ROWS=reduce_rows)
    x, bias = torch.randn(1, 896, dtype=torch.bfloat16), torch.randn(256, dtype=torch.bfloat16)
    ys = [T.gptq_matmul(x, w.qweight, w.qzeros, w.scales, w.g_idx, bias, 4, 128, config=cfg) for _ in range(2)]
    _check(w, x, bias, cfg, tol=1e-2)
    assert torch.equal(ys[0], ys[1])
    assert int(T._locks[x.device].count_nonzero()) == 0


@pytest.mark.parametrize("bits,split", [(4, 1), (4, 3), (8, 3), (2, 3)])
def test_wdot_full_tiles_and_split_k_counters(bits, split):
    """gptq_dot_kernel with N and K multiples of the tile (the unmasked EVEN_N/EVEN_K build) for every whole-value
    bit width (the joined value tree differs: 4, 8 or 16 values a word), BLOCK_M 32 over 20 rows, and split-K's
    last-program reduction: three calls in a row agree bit for bit, the bias is added once, the counters end at
    zero. (The per-input-channel fallback for a failed g_idx check runs in the act-order cases above.)"""
    w = _weights(128, 512, bits, 128, False, seed=3)
    cfg = dict(KERNEL="wdot", BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2, SPLIT_K=split)
    x, bias = torch.randn(20, 512, dtype=torch.float16), torch.randn(128, dtype=torch.float16)
    ys = [T.gptq_matmul(x, w.qweight, w.qzeros, w.scales, w.g_idx, bias, bits, 128, config=cfg) for _ in range(3)]
    _check(w, x, bias, cfg)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])  # partial sums added in split order
    if split > 1:
        assert int(T._locks[x.device].count_nonzero()) == 0


@pytest.mark.parametrize("bits,group_size,bk,split", [
    (4, 128, 128, 1),  # the launcher's M <= 16 tile: 32 half-words a column, 4 value positions
    (4, 64, 64, 3),  # 16 half-words (the smallest dot), a split-K reduction
    (2, 128, 128, 3),  # 8 value positions a half-word (three levels of splits of x)
    (8, 128, 32, 1),  # fp16 only (8 bits do not fit bf16's mantissa): 2 value positions
])
def test_wdot_half_words(bits, group_size, bk, split):
    """gptq_dot_kernel's half-word dequant (MAGIC16) against the word path and the reference: K = 448 ends in a
    partial tile, N = 80 in a partial column tile, 7 rows of a 16-row block. (fp16 here: the interpreter's bf16
    dot is wrong; the bf16 magic is checked on the GPU by tests/lowering/test_gptq_linear_op.py and the benchmark.)"""
    w = _weights(80, 448, bits, group_size, False, seed=5)
    x, bias = torch.randn(7, 448, dtype=torch.float16), torch.randn(80, dtype=torch.float16)
    base = dict(KERNEL="wdot", BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, num_warps=4, num_stages=2, SPLIT_K=split)
    assert T.half_word_magic(torch.float16, bits, bk) == 0x6400
    _check(w, x, bias, base)  # the launcher picks half-words here ...
    _check(w, x, bias, dict(base, MAGIC16=0))  # ... and words when told to
    halves = T.gptq_matmul(x, w.qweight, w.qzeros, w.scales, w.g_idx, bias, bits, group_size, config=base)
    words = T.gptq_matmul(x, w.qweight, w.qzeros, w.scales, w.g_idx, bias, bits, group_size,
                          config=dict(base, MAGIC16=0))
    torch.testing.assert_close(halves, words, rtol=2e-3, atol=2e-3)


def test_half_word_magic_domain():
    """Half-words where q fits the 16-bit float's mantissa next to the magic and a tile has >= 16 half-words."""
    assert T.half_word_magic(torch.bfloat16, 4, 128) == 0x4300 and T.half_word_magic(torch.bfloat16, 2, 128) == 0x4300
    assert T.half_word_magic(torch.bfloat16, 8, 128) == 0  # 8 bits > bf16's 7 mantissa bits: words
    assert T.half_word_magic(torch.float16, 8, 32) == 0x6400
    assert T.half_word_magic(torch.float16, 4, 32) == 0  # 8 half-words a column: below the smallest dot
    assert T.half_word_magic(torch.float32, 4, 128) == 0


def test_decode_batches_pick_the_fused_dot_kernel():
    """M = 2..64 (decode batches) with 2/4/8 bits run gptq_dot_kernel, whose BLOCK_M covers the rows in one block
    (16 rows up to 16, 64 rows up to 64); 3 bits stay on gptq_matmul_kernel; from DEQUANT_MIN_M on, dequantize +
    matmul."""
    for m, bm in ((2, 16), (16, 16), (17, 64), (32, 64), (33, 64), (64, 64)):
        for bits in (2, 4, 8):
            cfg = T.pick_config(m, 11008, 4096, bits, 128)
            assert cfg["KERNEL"] == "wdot" and cfg["BLOCK_M"] == bm, (m, bits, cfg)
        assert T.pick_config(m, 11008, 4096, 3, 128)["KERNEL"] == "dot"
    assert T.pick_config(T.DEQUANT_MIN_M, 11008, 4096, 4, 128)["KERNEL"] == "dequant"


def test_decode_batches_launch_one_wave():
    """M = 2..16 half-word dot programs (3 fit an H100 SM) launch one wave at most: more splits, 1.3-1.5 waves, ran
    up to 1.3x slower on the H100 (session 18)."""
    for n, k in ((11008, 4096), (4096, 11008), (4096, 4096), (12288, 4096), (22016, 4096)):
        for m in (2, 8, 16):
            cfg = T.pick_config(m, n, k, 4, 128, 132)
            assert cfg["BLOCK_M"] == 16 and cfg["BLOCK_K"] == 128 and cfg["ONE_WAVE"], (m, n, k, cfg)
            assert cfg["SPLIT_K"] == min(k // 128 // 2, 3 * 132 // (n // 128)), (m, n, k, cfg)


def _gemv_programs(n, k, cfg):
    """Programs the M=1 launcher starts for cfg: column tiles x splits, after the splits are rounded to whole tiles
    (as ``_gemv`` does)."""
    k_per_split = -(-k // (cfg["SPLIT_K"] * cfg["BLOCK_K"])) * cfg["BLOCK_K"]
    return -(-n // cfg["BLOCK_N"]) * -(-k // k_per_split)


@pytest.mark.parametrize("n,k", [(22016, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (28672, 8192),
                                 (8192, 28672), (10240, 8192), (1536, 576)])
def test_gemv_split_k_stays_within_one_wave(n, k):
    """M=1 splits K into as many programs as the SMs hold at once (GEMV_RESIDENT: fewer with the RMSNorm folded in,
    a bigger build), never more: a second, partial wave cost the fused gate/up GEMV of a 7B layer 2.7 us, and
    filling the whole wave took down 4096x11008 14.0 -> 12.6 us (RESULTS.md, session 16). 7B gate/up (172 column
    tiles, 132 SMs): 6 splits fused, 9 plain; down (32 tiles, 172 K tiles): 43 splits of 4 tiles."""
    for norm in (False, True):
        cfg = T.pick_config(1, n, k, 4, 128, 132, norm=norm)
        slots = T.GEMV_RESIDENT[norm] * 132
        assert cfg["KERNEL"] == "gemv" and cfg["PER_SM"] == T.GEMV_RESIDENT[norm]
        assert _gemv_programs(n, k, cfg) <= slots, (norm, cfg)
        one_more = dict(cfg, SPLIT_K=cfg["SPLIT_K"] + 1)  # the next split count overflows the wave (or K's tiles)
        assert (_gemv_programs(n, k, one_more) > slots or cfg["SPLIT_K"] == -(-k // cfg["BLOCK_K"]) // 2
                or _gemv_programs(n, k, one_more) == _gemv_programs(n, k, cfg)), (norm, cfg)
    if (n, k) == (22016, 4096):
        assert T.pick_config(1, n, k, 4, 128, 132, norm=True)["SPLIT_K"] == 6
        assert T.pick_config(1, n, k, 4, 128, 132, norm=False)["SPLIT_K"] == 9
    if (n, k) == (4096, 11008):
        assert _gemv_programs(n, k, T.pick_config(1, n, k, 4, 128, 132)) == 32 * 43


def test_long_prompts_dequantize_in_chunks():
    """From CHUNK_MIN_M rows on, prefill dequantizes CHUNK_N columns at a time (each chunk's GEMM large enough to fill
    the GPU); shorter prompts, and weights no wider than a chunk, in one pass."""
    assert T.pick_config(T.CHUNK_MIN_M, 11008, 4096, 4, 128)["CHUNK_N"] == T.CHUNK_N
    assert T.pick_config(T.CHUNK_MIN_M - 1, 11008, 4096, 4, 128)["CHUNK_N"] == 0
    assert T.pick_config(T.CHUNK_MIN_M, T.CHUNK_N, 4096, 4, 128)["CHUNK_N"] == 0


# optgptq::gptq_linear_fused_triton: the gemv folds RMSNorm (x * w, 1/rms from the splits' sums of x**2) and the
# residual; other kernels get them as torch ops around the matmul


def _check_fused(w, x, norm_weight, residual, bias, config=None, tol=1e-2, eps=1e-5, act="none"):
    y = T.gptq_matmul(x, w.qweight, w.qzeros, w.scales, w.g_idx, bias, w.bits, w.group_size, config=config,
                      norm_weight=norm_weight, eps=eps, residual=residual, act=act)
    xd = x.double()
    if norm_weight is not None:  # in fp64: the kernel never rounds the normalized x, so neither does the check
        xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    ref = torch_gptq_linear(xd, w.qweight, w.qzeros, w.scales, w.g_idx, None if bias is None else bias.double(),
                            w.bits)
    if act == "silu_mul":  # in fp64 too: the kernel rounds gate, up and silu(gate) as HF does, within tol
        gate, up = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
    if residual is not None:
        ref = ref + residual.double()
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < tol, err
    return y


FUSED_GEMV = {  # name: (N, K, act_order, dtype, config); x scaled by 3: an rms far from 1, so a wrong norm shows
    # bf16 x and weight as int32 pairs, 7 splits: the last program sums partials and sums of x**2 in chunks of 4
    "bf16 pairs split-K": (256, 896, False, torch.bfloat16,
                           dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=128, BLOCK_K=64, num_warps=1, num_stages=1,
                                SPLIT_K=7, REDUCE_ROWS=4)),
    # fp16, one split (the norm from the program's own sum), ragged N (80 = 1.25 tiles of 64)
    "fp16 one split ragged N": (80, 448, False, torch.float16,
                                dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=32, num_warps=2, num_stages=1,
                                     SPLIT_K=1)),
    # unsorted act-order g_idx at run time: the per-row-group loop computes the sums of x**2 itself
    "act-order per-row loop split-K": (80, 448, True, torch.float16,
                                       dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=32, num_warps=2,
                                            num_stages=1, SPLIT_K=3)),
    # fp32 x: no pairs, element loads of x and of the norm weight
    "fp32 split-K": (64, 320, False, torch.float32,
                     dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=32, num_warps=1, num_stages=1, SPLIT_K=3)),
}


@pytest.mark.parametrize("name", list(FUSED_GEMV))
@pytest.mark.parametrize("norm,residual,bias", [(True, True, True), (True, False, False), (False, True, False)])
def test_fused_gemv(name, norm, residual, bias):
    n, k, act_order, dtype, cfg = FUSED_GEMV[name]
    w = _weights(n, k, 4, 32, act_order, seed=5, scale_dtype=torch.bfloat16 if dtype == torch.bfloat16 else
                 torch.float16)
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(1, k, generator=g) * 3).to(dtype)
    nw = (torch.rand(k, generator=g) + 0.5).to(dtype) if norm else None
    res = torch.randn(1, n, generator=g).to(dtype) if residual else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ys = [_check_fused(w, x, nw, res, b, cfg, tol=1e-5 if dtype == torch.float32 else 1e-2) for _ in range(2)]
    assert torch.equal(ys[0], ys[1])  # deterministic: partials and sums of squares added in split order
    if cfg["SPLIT_K"] > 1:
        assert int(T._locks[x.device].count_nonzero()) == 0


@pytest.mark.parametrize("m", [5, T.DEQUANT_MIN_M])  # the dot kernel, dequant + matmul: norm and add around them
def test_fused_other_kernels(m):
    w = _weights(48, 320, 4, 32, True)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, m, 320, generator=g) * 3).half()
    _check_fused(w, x, (torch.rand(320, generator=g) + 0.5).half(), torch.randn(2, m, 48, generator=g).half(),
                 torch.randn(48, generator=g).half())


@pytest.mark.parametrize("m", [1, 3])
def test_fused_opcheck(m):
    w = _weights(32, 128, 4, 32, act_order=True)
    args = (torch.randn(m, 128, dtype=torch.float16), torch.rand(128, dtype=torch.float16), 1e-6, w.qweight,
            w.qzeros, w.scales, w.g_idx, None, torch.randn(m, 32, dtype=torch.float16), 4, 32)
    torch.library.opcheck(torch.ops.optgptq.gptq_linear_fused_triton.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("split", [1, 3])
def test_fused_residual_in_the_decode_batch_dot(split):
    """gptq_dot_kernel (M = 2..64) adds the residual in its epilogue (both the split-K last program and one split);
    the norm runs as rms_norm_kernel before it."""
    w = _weights(80, 448, 4, 32, False, seed=8)
    cfg = dict(KERNEL="wdot", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SPLIT_K=split)
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(20, 448, generator=g) * 3).half()
    _check_fused(w, x, (torch.rand(448, generator=g) + 0.5).half(), torch.randn(20, 80, generator=g).half(),
                 torch.randn(80, generator=g).half(), cfg)


# K: 320 and 4096 (one chunk, masked / exact), 700 with 256-wide chunks (3 passes, a ragged last one); rows of a
# wider buffer (stride != K); x scaled so its rms is far from 1 and eps large enough to change the result
@pytest.mark.parametrize("m,k,block,dtype", [(1, 320, 4096, torch.float16), (5, 4096, 4096, torch.float16),
                                             (3, 700, 256, torch.float32), (4, 320, 128, torch.bfloat16)])
def test_rms_norm_kernel(m, k, block, dtype, monkeypatch):
    from optgptq_compile.lowering.gptq_linear import torch_rms_norm

    monkeypatch.setattr(T, "RMS_NORM_BLOCK", block)
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k + 16, generator=g) * 0.3).to(dtype)[:, 8:8 + k]  # row stride k + 16
    w = (torch.rand(k, generator=g) + 0.5).to(dtype)
    eps = 0.05
    y = T.rms_norm(x, w, eps)
    ref = torch_rms_norm(x, w, eps)
    assert y.dtype == dtype and y.shape == (m, k) and y.is_contiguous()
    # fp32 sums in another order: one rounding step of the activation dtype apart; two for bf16, which the
    # interpreter converts by truncation (the GPU rounds to nearest)
    torch.testing.assert_close(y, ref, rtol={torch.float32: 1e-5, torch.float16: 1e-3}.get(dtype, 2**-6), atol=0)
    far = torch_rms_norm(x, w, 1e-6)
    assert (far - ref).abs().max() > 10 * (y.double() - ref.double()).abs().max()  # eps is visible in the check


SILU_MUL = {  # name: (M, N = 2 x the output's features, K, dtype, config, norm, bias); x scaled by 3
    # gemv, 3 splits: gate tile t and up tile t + 2 count 6 arrivals on one counter; the norm's sums of squares too
    "gemv split-K norm": (1, 512, 448, torch.float16,
                          dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=128, BLOCK_K=32, num_warps=1, num_stages=1,
                               SPLIT_K=3, REDUCE_ROWS=2), True, False),
    # gemv, one split: the split-K path all the same (the gate and up programs meet there); bias on both halves
    "gemv one split bias": (1, 256, 320, torch.float16,
                            dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=32, num_warps=2, num_stages=1,
                                 SPLIT_K=1), False, True),
    # half of N (80) not a multiple of the tile (64): silu * mul as torch ops after the kernel
    "gemv half not whole tiles": (1, 160, 320, torch.float16,
                                  dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=32, num_warps=2, num_stages=1,
                                       SPLIT_K=2), True, False),
    # decode batch, 2 row blocks (M = 20), 3 splits: pairs counted per (row block, column tile)
    "wdot split-K": (20, 256, 448, torch.float16,
                     dict(KERNEL="wdot", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SPLIT_K=3),
                     True, True),
    "wdot one split": (5, 128, 320, torch.float16,
                       dict(KERNEL="wdot", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SPLIT_K=1),
                       False, False),
    "dequant + matmul": (T.DEQUANT_MIN_M, 128, 320, torch.float16, None, True, False),
}


@pytest.mark.parametrize("name", list(SILU_MUL))
def test_fused_silu_mul(name):
    m, n, k, dtype, cfg, norm, bias = SILU_MUL[name]
    w = _weights(n, k, 4, 32, False, seed=11)
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    nw = (torch.rand(k, generator=g) + 0.5).to(dtype) if norm else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ys = [_check_fused(w, x, nw, None, b, cfg, act="silu_mul") for _ in range(2)]
    assert ys[0].shape == (m, n // 2) and torch.equal(ys[0], ys[1])  # deterministic, and the counters reset:
    assert int(T._locks[x.device].count_nonzero()) == 0  # a second call counts from zero again
    # against HF's own rounding (gate and up in fp16, silu in fp16): at most a few fp16 rounding steps apart
    from optgptq_compile.lowering.gptq_linear import torch_gptq_linear_fused

    hf = torch_gptq_linear_fused(x, nw, 1e-5, w.qweight, w.qzeros, w.scales, w.g_idx, b, None, w.bits, "silu_mul")
    torch.testing.assert_close(ys[0], hf, rtol=2e-2, atol=2e-2)
