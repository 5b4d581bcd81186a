"""optgptq_compile.generate == HF greedy generate per prompt alone: eager and compiled, roomy and tight pools."""

import pytest
import torch

import optgptq_compile
from optgptq_compile.runtime.cuda_graphs import DecodeGraphs
from optgptq_compile.runtime.generate import build_engine, generate_stream, last_stats
from optgptq_compile.runtime.scheduler import cache_kwarg
from tests.models import call_targets, recording, tiny_bloom, tiny_llama

# prompt lengths 1..64 (1: nothing but the query; 64 spans 16 blocks of 4), max_new_tokens all different
LENS = [1, 5, 64, 17, 33, 2, 48, 9, 12]
NEW = [8, 20, 5, 16, 3, 12, 9, 1, 14]
BLOCK = 4  # small blocks: every sequence crosses block boundaries during decode
TIGHT = 20  # blocks: the longest request (69 tokens) needs 18, all together need ~60 -> preemption


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in LENS]  # ids >= 3: no pad/eos/bos


def _hf_greedy(model, prompts, news):
    out = []
    for p, n in zip(prompts, news):
        ids = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


MODELS = {"llama": tiny_llama, "bloom": tiny_bloom}  # GQA 4/2 + RoPE; ALiBi + fused QKV


@pytest.fixture(scope="module")
def references():
    refs = {}
    for name, make in MODELS.items():
        model, prompts = make(), _prompts()
        refs[name] = (prompts, _hf_greedy(model, prompts, NEW))
    return refs


# overlap: decode steps launched before the previous step's tokens are read back (the CUDA default), forced on here
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("num_blocks", [None, TIGHT])
@pytest.mark.parametrize("name", list(MODELS))
def test_eager_matches_hf(name, num_blocks, overlap, references):
    prompts, ref = references[name]
    out = generate_and_check(MODELS[name](), prompts, num_blocks, overlap=overlap)
    assert out == ref
    stats = last_stats()
    assert (stats["preemptions"] > 0) == (num_blocks == TIGHT)  # the tight pool did take the preemption path
    assert stats["peak_blocks_used"] <= (num_blocks or 10**9)
    assert (stats["overlapped_steps"] > 0) == overlap


def test_cache_goes_by_the_name_forward_takes(references):
    """transformers renamed forward's ``past_key_values`` to ``cache``: the engine passes the cache by the name the
    model's forward has. A forward with only the old name (as in transformers 5.17) must still be served."""
    model = tiny_llama()
    current = cache_kwarg(model)

    class OldName(type(model)):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep, **{current: past_key_values})

    model.__class__ = OldName
    assert cache_kwarg(model) == "past_key_values"
    prompts, ref = references["llama"]
    assert optgptq_compile.generate(model, prompts[:4], NEW[:4], block_size=BLOCK) == ref[:4]


def generate_and_check(model, prompts, num_blocks, **kw):
    return optgptq_compile.generate(model, prompts, NEW, num_blocks=num_blocks, block_size=BLOCK, **kw)


# both compile forms, torch.compile(model) and model.forward = torch.compile(...), one per model to save time
@pytest.mark.parametrize("name,form", [("llama", "module"), ("bloom", "forward")])
def test_compiled_matches_hf_and_reads_blocks(name, form, references):
    prompts, ref = references[name]
    model = MODELS[name]()
    if form == "module":
        model = torch.compile(model, backend="optgptq", options={"bits": None})
    else:
        model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": None})
    with recording() as graphs:
        out = generate_and_check(model, prompts, TIGHT, max_batch_size=4)  # requests join as others finish
    assert out == ref
    assert last_stats()["preemptions"] > 0
    targets = {t for g in graphs for t in call_targets(g)}
    # Llama's RoPE goes into the KV write (fuse_rope_kv_write), and that into the attention (fuse_rope_attention);
    # BLOOM (ALiBi) keeps the plain write and attention
    ops = torch.ops.optgptq
    paged_ops = {ops.kv_write.default, ops.rope_kv_write.default, ops.paged_attention.default,
                 ops.rope_paged_attention.default}
    expected = {ops.rope_paged_attention.default} if name == "llama" else {ops.kv_write.default,
                                                                           ops.paged_attention.default}
    assert targets & paged_ops == expected
    assert torch.ops.optgptq.kv_gather.default not in targets and torch.ops.optgptq.attention.default not in targets
    assert optgptq_compile.stats()["fallbacks"] == 0


def test_continuous_batching_mixes_prefill_and_decode():
    model = tiny_llama()
    prompts = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15], [16, 17]]  # short prompts: mixing pays
    news = [6, 2, 5, 3, 4, 7]
    out = optgptq_compile.generate(model, prompts, news, block_size=BLOCK, max_batch_size=2)
    assert out == _hf_greedy(model, prompts, news)
    assert last_stats()["mixed_steps"] > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_token_ends_early_and_eos_default(overlap):
    model = tiny_llama()
    prompt = _prompts()[3]
    free_run = optgptq_compile.generate(model, [prompt], 12, stop_at_eos=False)[0]
    stop = free_run[4]
    first = free_run.index(stop)
    out = optgptq_compile.generate(model, [prompt, prompt], [12, 12], stop_token_ids=[stop], stop_at_eos=False,
                                   overlap=overlap)
    assert out == [free_run[: first + 1]] * 2  # the stop token is returned, nothing after it
    model.config.eos_token_id = stop  # the model's EOS stops requests by default
    assert optgptq_compile.generate(model, [prompt], 12, overlap=overlap)[0] == free_run[: first + 1]


def test_overlapped_steps_drop_the_token_after_a_stop_and_free_every_block():
    """Requests stopping at different steps while the next step is already in flight: each one's extra token
    is dropped, the others go on from the device-side tokens (rows gathered when the batch shrinks), and the
    pool is whole at the end. Checked step by step against the allocator's invariants."""
    model = tiny_llama()
    prompts = _prompts()[:4]
    news = [12, 3, 12, 7]
    free_runs = _hf_greedy(model, prompts, news)
    stop = free_runs[0][5]  # request 0 stops at this token's first occurrence (others would at theirs)
    expect = [r[: r.index(stop) + 1] if stop in r else r for r in free_runs]
    engine = build_engine(model, prompts, news, block_size=BLOCK, stop_token_ids=[stop], stop_at_eos=False,
                          overlap=True)
    with torch.inference_mode():
        while engine.has_work:
            engine.step()
            live = [r.table for r in engine.running]
            engine.cache.allocator.check(live)
    assert [engine.finished[i].output for i in range(4)] == expect
    assert engine.finished[0].finish_reason == "stop" and engine.finished[1].finish_reason == "length"
    assert engine.stats.overlapped_steps > 0
    alloc = engine.cache.allocator
    assert alloc.num_free == alloc.num_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_sampling_is_per_request_reproducible(overlap):
    model = tiny_llama()
    prompts = _prompts()[:4]
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, block_size=BLOCK, overlap=overlap)
    a = optgptq_compile.generate(model, prompts, 10, seed=[1, 2, 3, 4], **kw)
    # same seed for request 0, but alone and in another batch: same tokens
    b = optgptq_compile.generate(model, [prompts[0]], 10, seed=1, **kw)
    assert b[0] == a[0]
    c = optgptq_compile.generate(model, prompts, 10, seed=[5, 2, 3, 4], **kw)
    assert c[0] != a[0] and c[1:] == a[1:]  # random logits of a random model: seeds 1 and 5 diverge
    # sampled on the device one step ahead (overlap) or read back every step: the same draws
    kw["overlap"] = not overlap
    mixed = dict(temperature=[0.8, 0.0, 0.8, 0.0], seed=[1, None, 3, None])  # greedy and sampled rows in one batch
    kw.update(mixed)
    assert optgptq_compile.generate(model, prompts, 10, **kw) == [a[0], _hf_greedy(model, [prompts[1]], [10])[0],
                                                                    a[2], _hf_greedy(model, [prompts[3]], [10])[0]]
    assert last_stats()["overlapped_steps"] > 0 or overlap


def test_streaming_yields_every_token_in_order():
    model = tiny_bloom()
    prompts = _prompts()[:3]
    events = list(generate_stream(model, prompts, [4, 6, 2], block_size=BLOCK))
    streamed = [[e.token for e in events if e.index == i] for i in range(3)]
    assert streamed == _hf_greedy(model, prompts, [4, 6, 2])
    assert [e.index for e in events if e.finished] == [2, 0, 1]  # shortest first
    seen = []
    optgptq_compile.generate(model, prompts, [4, 6, 2], stream=lambda i, t, done: seen.append((i, t)),
                             progress=True)  # the tqdm bar must not disturb anything
    assert sorted(seen) == sorted((e.index, e.token) for e in events)


@pytest.mark.parametrize("prompt,max_new,match", [
    ([], 4, "empty prompt"),
    ([7] * 300, 4, "longer than the model's context"),  # tiny_llama: 256 positions
    ([5, 6], 0, "max_new_tokens"),
    ([5, 6], -3, "max_new_tokens"),
    ([5, 999], 4, "token ids outside"),
])
def test_bad_request_raises_before_any_work(prompt, max_new, match):
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        optgptq_compile.generate(model, [[5, 6, 7], prompt], [4, max_new])


def test_bad_request_leaves_running_requests_alone():
    model = tiny_llama()
    prompts = _prompts()[:3]
    engine = build_engine(model, prompts, [6, 6, 6], block_size=BLOCK)
    engine.step()
    engine.step()
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.add_request([5] * 40, 500)  # longer than the block tables this engine was built for
    late = engine.add_request(prompts[0], 3)
    while engine.has_work:
        engine.step()
    ref = _hf_greedy(model, prompts, [6, 6, 6])
    assert [engine.finished[i].output for i in range(3)] == ref
    assert engine.finished[late].output == ref[0][:3]
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks  # every block came back


def test_memory_report_counts_fragmentation_and_beats_padded_hf():
    model = tiny_llama()
    optgptq_compile.generate(model, _prompts(), NEW, block_size=BLOCK)
    mem = last_stats()["memory"]
    per_token = 2 * 2 * 2 * 16 * 4  # K+V, 2 layers, 2 KV heads, head_dim 16, fp32
    assert mem["kv_bytes_per_token"] == per_token
    assert mem["peak_live_token_bytes"] <= mem["peak_allocated_bytes"] <= mem["pool_bytes"]
    assert 0 <= mem["fragmentation"] < BLOCK / (BLOCK + 1)
    assert mem["hf_padded_batch_bytes"] == len(LENS) * (64 + 20) * per_token
    assert mem["peak_allocated_bytes"] < mem["hf_padded_batch_bytes"] / 2


def test_prompts_as_tensor_and_bad_containers():
    model = tiny_llama()
    prompts = torch.tensor(_prompts()[3:4] * 2)
    assert optgptq_compile.generate(model, prompts, 3) == _hf_greedy(model, prompts.tolist(), [3, 3])
    with pytest.raises(ValueError, match="flat list"):
        optgptq_compile.generate(model, [1, 2, 3], 3)
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        optgptq_compile.generate(model, [[5], [6], [7]], [3, 3])


def test_pool_too_small_for_one_request_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fit the KV pool of 3 blocks"):
        optgptq_compile.generate(tiny_llama(), [[5] * 10, [6] * 3], 5, num_blocks=3, block_size=BLOCK)


class ReplayWithoutCuda(DecodeGraphs):
    """The CUDA-graph runner with capture replaced by re-running the step from the same packed input buffer (the
    mask made from it again, as a replay does): checks on the CPU everything but the capture itself (packing,
    padding rows, fixed key length, buffer reuse across steps)."""

    def _record(self, engine, inputs):
        captured = inputs.model_inputs()
        logits = engine.run_model(captured).clone()
        return (lambda: logits.copy_(engine.run_model(inputs.model_inputs()))), captured, logits


@pytest.mark.parametrize("compiled,overlap", [(False, False), (False, True), (True, True)])
def test_decode_graph_runner_pads_batches(compiled, overlap, references):
    prompts, ref = references["llama"]
    model = tiny_llama()
    if compiled:
        model = torch.compile(model, backend="optgptq", options={"bits": None})
    engine = build_engine(model, prompts, NEW, block_size=BLOCK, num_blocks=TIGHT, cuda_graphs=False,
                          overlap=overlap)
    engine.graphs = ReplayWithoutCuda([1, 2, 4, 8])  # 9 requests: batches of 1..8 pad up to these sizes
    with torch.inference_mode():
        while engine.has_work:
            engine.step()
    assert [engine.finished[i].output for i in range(len(prompts))] == ref
    assert engine.stats.graph_steps > 0 and set(engine.graphs.graphs) > {1}


def test_step_inputs_pack_a_decode_step_with_padding_rows():
    """One decode step's inputs packed for a captured size of 4: the views read back what _decode_tensors builds
    for the 3 real rows, padding rows have slot -1, context 0 and a mask with only the last key visible."""
    from optgptq_compile.runtime.cuda_graphs import StepInputs

    prompts = _prompts()[:3]
    engine = build_engine(tiny_llama(), prompts, 8, block_size=BLOCK, cuda_graphs=False, overlap=False)
    with torch.inference_mode():
        engine.step()  # the prefills: every request now takes decode steps
        batch = list(engine.running)
        inputs = StepInputs(4, engine.table_width, 40, 7, torch.device("cpu"))
        inputs.buffer.copy_(inputs.pack(*engine.decode_lists(batch)))
        got = inputs.model_inputs()
        want = engine._decode_tensors(batch, step_len=40)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name][:3], t), name
    assert got["input_ids"][3].item() == 7 and got["slot_mapping"][3].item() == -1
    assert got["context_lens"][3].item() == 0 and not got["block_tables"][3].any()
    assert got["attention_mask"][3].tolist() == [0] * 39 + [1]
    assert StepInputs.nbytes(4, engine.table_width) == inputs.buffer.numel()


@pytest.mark.parametrize("name", list(MODELS))
def test_shared_prompt_prefix_is_stored_once(name):
    model = MODELS[name]()
    g = torch.Generator().manual_seed(1)
    system = torch.randint(3, 128, (37,), generator=g).tolist()  # 2 full blocks of 16 + 5 tokens
    prompts = [system + torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 0, 9, 20, 1)]
    prompts[1] = system[:33]  # shares 2 blocks, and its last prompt token is still computed by itself
    news = [6, 9, 4, 7, 5]
    out = optgptq_compile.generate(model, prompts, news, max_batch_size=2)  # later requests join running ones
    assert out == _hf_greedy(model, prompts, news)
    assert last_stats()["prefix_shared_tokens"] >= 32 * 3


def test_memory_budget_in_bytes_sizes_the_pool():
    model = tiny_llama()
    per_block = 2 * 2 * 2 * 16 * 4 * BLOCK  # K+V, layers, KV heads, head_dim, fp32 bytes, tokens per block
    engine = build_engine(model, _prompts(), NEW, block_size=BLOCK, memory_budget=25 * per_block + 7)
    assert engine.cache.allocator.num_blocks == 25
    with pytest.raises(ValueError, match="holds no KV block"):
        build_engine(model, _prompts(), NEW, block_size=BLOCK, memory_budget=per_block - 1)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_engine(model, _prompts(), NEW, block_size=BLOCK, memory_budget=0.5)
