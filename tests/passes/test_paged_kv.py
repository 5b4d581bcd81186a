"""paged_kv pass on hand-built graphs: kv_gather + attention -> paged_attention with equal numerics; the cases
where it must not fire. (End to end through generate: tests/runtime/test_generate.py, compiled cases.)"""

import math

import pytest
import torch
import torch.fx as fx

import optgptq_compile
from optgptq_compile.config import OptGPTQConfig
from optgptq_compile.context import PassContext
from optgptq_compile.passes.paged_kv import paged_kv

OPS = torch.ops.optgptq
B, HQ, HKV, D, BS, NB = 3, 4, 2, 16, 4, 24  # GQA 2:1, 3 sequences over 24 blocks of 4
LENS = [9, 2, 14]  # ragged contexts: the gather left-pads rows 0 and 1


def _inputs(sq, alibi, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = torch.randn(2, NB, BS, HKV, D, generator=g)  # random everywhere: stale slots must not leak
    tables = torch.randperm(NB, generator=g)[: B * 5].reshape(B, 5).int()
    lens = torch.tensor(LENS, dtype=torch.int32)
    out_len = max(LENS)
    padding = torch.arange(out_len) >= out_len - lens[:, None].long()  # [B, L], True = attend
    q = torch.randn(B, HQ, sq, D, generator=g)
    slopes = torch.rand(HQ, generator=g) if alibi else None
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, lens=lens, padding=padding,
                slopes=slopes, out_len=out_len)


def _graph(inp, lengths_are_mask=True, with_padding=True, k_from_gather=True, separate_v_tables=False):
    """q, gathered K/V -> optgptq::attention, spelled the way PagedKVCache + match_attention leave it."""
    g = fx.Graph()
    ph = {name: g.placeholder(name) for name in ("q", "k_cache", "v_cache", "tables", "v_tables", "lens",
                                                  "padding", "slopes", "k_plain")}
    for name in ("q", "k_cache", "v_cache"):
        ph[name].meta["val"] = inp[name]
    k = (g.call_function(OPS.kv_gather, (ph["k_cache"], ph["tables"], ph["lens"], inp["out_len"],
                                         lengths_are_mask)) if k_from_gather else ph["k_plain"])
    k = g.call_method("to", (k, torch.float32))  # PagedKVCache hands HF a dtype-matched tensor: a no-op copy
    k.meta["val"] = torch.empty(B, HKV, inp["out_len"], D)
    k.args[0].meta["val"] = k.meta["val"]
    v_tables = ph["v_tables"] if separate_v_tables else ph["tables"]
    v = g.call_function(OPS.kv_gather.default, (ph["v_cache"], v_tables, ph["lens"], inp["out_len"],
                                                lengths_are_mask))
    out = g.call_function(OPS.attention.default, (ph["q"], k, v, ph["slopes"] if inp["slopes"] is not None else None,
                                                  ph["padding"] if with_padding else None, True,
                                                  1 / math.sqrt(D)))
    g.output(out)
    return fx.GraphModule(torch.nn.Module(), g)


def _run(gm, inp):
    k_plain = OPS.kv_gather(inp["k_cache"], inp["tables"], inp["lens"], inp["out_len"], True)
    return gm(inp["q"], inp["k_cache"], inp["v_cache"], inp["tables"], inp["tables"], inp["lens"], inp["padding"],
              inp["slopes"], k_plain)


def _ctx():
    return PassContext(config=OptGPTQConfig(), example_inputs=[])


@pytest.mark.parametrize("sq", [1, 2])  # decode, and a two-token chunk (causal inside the new tokens)
@pytest.mark.parametrize("alibi", [False, True])
def test_rewrites_and_keeps_numerics(sq, alibi):
    inp = _inputs(sq, alibi)
    gm = _graph(inp)
    before = _run(gm, inp)
    ctx = _ctx()
    assert paged_kv(gm, ctx)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [OPS.paged_attention.default]  # the gathers and the no-op copy are gone
    torch.testing.assert_close(_run(gm, inp), before, rtol=1e-5, atol=1e-5)
    assert optgptq_compile.stats()["paged_attention_rewritten"] == 1


def test_no_padding_mask_rewrites_even_without_the_flag():
    inp = _inputs(1, False)
    inp["lens"][:] = inp["out_len"]  # HF generate without padding: every row as long as the gather
    inp["padding"][:] = True
    gm = _graph(inp, lengths_are_mask=False, with_padding=False)
    before = _run(gm, inp)
    assert paged_kv(gm, _ctx())
    torch.testing.assert_close(_run(gm, inp), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,reason", [
    (dict(lengths_are_mask=False), "padding mask the cache does not vouch for"),
    (dict(k_from_gather=False), "only one of K and V"),
    (dict(separate_v_tables=True), "different block tables"),
])
def test_does_not_fire(case, reason):
    inp = _inputs(1, False)
    gm = _graph(inp, **case)
    code = gm.code
    ctx = _ctx()
    assert not paged_kv(gm, ctx)
    assert gm.code == code
    assert len(ctx.report) == 1 and not ctx.report[0].matched and reason in ctx.report[0].detail
    assert optgptq_compile.stats()["paged_kv_skipped"] == 1


def test_ignores_attention_that_is_not_paged():
    g = fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    g.output(g.call_function(OPS.attention.default, (q, k, v, None, None, True, 0.25)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    ctx = _ctx()
    assert not paged_kv(gm, ctx) and ctx.report == []
