"""Programmatic dependent launch (``triton_utils.pdl``): when the launchers ask for it, and, on a CUDA GPU (skipped
elsewhere; run on the device machine), that kernels launched with it compute bitwise what they compute without it,
captured in a CUDA graph where consecutive kernels overlap."""

import pytest
import torch

from optgptq_compile.lowering.triton_utils import launch_options, pdl

needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None
                                or torch.cuda.get_device_capability()[0] < 9, reason="needs an sm90+ CUDA GPU")


def test_no_pdl_off_cuda_or_when_turned_off(monkeypatch):
    assert not pdl(torch.ones(2))  # a CPU tensor (the interpreter's case too)
    assert not pdl(torch.ones(2, device="meta"))
    monkeypatch.setenv("OPTGPTQ_PDL", "0")
    if torch.cuda.is_available():
        assert not pdl(torch.ones(2, device="cuda"))
    assert launch_options(False) == {} and launch_options(True) == {"launch_pdl": True}


def test_no_pdl_while_traced():
    """A fake tensor means the op is being traced (Inductor inlining the kernel), where launch options cannot go."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        t = torch.empty(2, device="cuda" if torch.cuda.is_available() else "cpu")
    assert not pdl(t)


@needs_sm90
def test_pdl_is_on_for_sm90_cuda_tensors():
    assert pdl(torch.ones(2, device="cuda"))


def _chain(layers, x0, nw):
    """A decode layer's GEMVs and attention kernels back to back: every kernel reads what the one before wrote."""
    from optgptq_compile.lowering import triton_gptq_linear as T
    from optgptq_compile.lowering.triton_paged_attention import kv_write_launch, paged_attention_fwd

    h = x0
    for w, (k_cache, v_cache, tables, lens, slots) in layers:
        qkv = T.gptq_matmul(h, *w["qkv"], None, 4, 128, norm_weight=nw, eps=1e-5)  # [1, 3 * 256]
        q, k, v = qkv.view(1, 3, 2, 128).unbind(1)  # 2 heads of 128
        kv_write_launch(k, v, k_cache, v_cache, slots)
        a = paged_attention_fwd(q.view(1, 2, 1, 128), k_cache, v_cache, tables, lens, None, True, 128 ** -0.5)
        h = T.gptq_matmul(a.view(1, 256), *w["o"], None, 4, 128, residual=h)
        g = T.gptq_matmul(h, *w["gate/up"], None, 4, 128, norm_weight=nw, eps=1e-5, act="silu_mul")
        h = T.gptq_matmul(g, *w["down"], None, 4, 128, residual=h)
    return h


@needs_sm90
def test_pdl_chain_in_a_cuda_graph_is_bitwise_the_plain_chain(monkeypatch):
    from optgptq_compile.quant.format import default_g_idx, pack_weight

    def weights(n, k, seed):
        g = torch.Generator().manual_seed(seed)
        q = torch.randint(0, 16, (n, k), generator=g)
        zeros = torch.randint(0, 16, (k // 128, n), generator=g)
        scales = (torch.rand(k // 128, n, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
        w = pack_weight(q, zeros, scales, default_g_idx(k, 128), 4, 128)
        return [t.cuda() for t in (w.qweight, w.qzeros, w.scales, w.g_idx)]

    g = torch.Generator().manual_seed(0)
    shapes = {"qkv": (768, 256), "o": (256, 256), "gate/up": (1024, 256), "down": (256, 512)}
    # tokens cached, the new one included: ragged, in a 128-key table; the launcher splits it into two 64-key tiles,
    # the first read before the wait for kv_write (EARLY_KV), the second, with the new key, after it
    ctx = 100
    table = [5, 1, 7, 0, 9, 2, 8, 3]
    layers = []
    for i in range(3):
        k_cache = torch.randn(10, 16, 2, 128, generator=g).to(torch.bfloat16).cuda()
        v_cache = torch.randn(10, 16, 2, 128, generator=g).to(torch.bfloat16).cuda()
        tables = torch.tensor([table], dtype=torch.int32).cuda()
        lens = torch.tensor([ctx], dtype=torch.int32).cuda()
        slots = torch.tensor([table[(ctx - 1) // 16] * 16 + (ctx - 1) % 16], dtype=torch.int64).cuda()
        layers.append(({name: weights(n, k, 10 * i + j) for j, (name, (n, k)) in enumerate(shapes.items())},
                       (k_cache, v_cache, tables, lens, slots)))
    x0 = torch.randn(1, 256, generator=g).to(torch.bfloat16).cuda()
    nw = (torch.rand(256, generator=g) + 0.5).to(torch.bfloat16).cuda()

    results = {}
    for on in ("1", "0"):
        monkeypatch.setenv("OPTGPTQ_PDL", on)
        _chain(layers, x0, nw)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(layers, x0, nw)
        for _ in range(3):  # replays: the split-K counters must come back to zero every time
            graph.replay()
        torch.cuda.synchronize()
        results[on] = out.clone()
    assert results["1"].abs().sum() > 0
    assert torch.equal(results["1"], results["0"])
