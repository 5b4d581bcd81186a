"""The runtime on a GPU (skipped without one; run on the device machine): CUDA graphs, Triton kernels and the
overlapped decode schedule, whose copies between host and device are asynchronous -- a missing wait would show
here as wrong tokens, not on the CPU."""

import pytest
import torch

import optgptq_compile
from optgptq_compile.runtime.generate import last_stats
from tests.models import tiny_bloom, tiny_llama
from tests.runtime.test_generate import BLOCK, LENS, NEW, TIGHT, _hf_greedy, _prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")


@pytest.mark.parametrize("make", [tiny_llama, tiny_bloom], ids=["llama", "bloom"])
@pytest.mark.parametrize("num_blocks", [None, TIGHT])
def test_overlapped_graph_decode_matches_hf_alone(make, num_blocks):
    model = make().cuda()  # fp32: greedy tokens equal HF's exactly
    prompts = _prompts()
    ref = _hf_greedy(model.cpu(), prompts, NEW)
    model.cuda()
    compiled = torch.compile(model, backend="optgptq", options={"bits": None, "strict": True})
    outs = {}
    for overlap in (False, True):
        outs[overlap] = optgptq_compile.generate(compiled, prompts, NEW, num_blocks=num_blocks, block_size=BLOCK,
                                                 overlap=overlap, max_batch_size=len(LENS))
        stats = last_stats()
        assert stats["graph_steps"] > 0
        assert (stats["overlapped_steps"] > 0) == overlap
    assert outs[False] == ref
    assert outs[True] == ref


def test_overlapped_stop_tokens_on_gpu():
    model = tiny_llama().cuda()
    prompts = _prompts()[:6]
    news = [24] * 6
    free = optgptq_compile.generate(model, prompts, news, stop_at_eos=False, overlap=False)
    stop = free[0][7]
    expect = [r[: r.index(stop) + 1] if stop in r else r for r in free]
    out = optgptq_compile.generate(model, prompts, news, stop_token_ids=[stop], stop_at_eos=False, overlap=True)
    assert out == expect


def test_overlapped_sampling_on_gpu_draws_what_the_synchronous_schedule_draws():
    model = tiny_llama().cuda()
    prompts = _prompts()[:6]
    kw = dict(temperature=[0.9, 0.0, 0.7, 0.9, 0.0, 1.2], top_k=[0, 0, 20, 0, 0, 5],
              top_p=[1.0, 1.0, 0.9, 0.8, 1.0, 1.0], seed=[1, None, 2, 3, None, 4], stop_at_eos=False)
    sync = optgptq_compile.generate(model, prompts, 16, overlap=False, **kw)
    ahead = optgptq_compile.generate(model, prompts, 16, overlap=True, **kw)
    assert last_stats()["overlapped_steps"] > 0
    assert ahead == sync
