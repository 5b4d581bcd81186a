"""``optgptq_compile.generate``: many prompts of different lengths through the paged-KV runtime.

    out = optgptq_compile.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=[32, 8])

``model`` is a HF causal LM, ``torch.compile(model, backend="optgptq", ...)`` (an OptimizedModule: its config is
read from ``_orig_mod``, the compiled module is what runs) or a model whose ``forward`` was replaced by a compiled
one. Returns the generated token ids per prompt (stop token included, prompt excluded), in prompt order.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from .cuda_graphs import DEFAULT_SIZES, DecodeGraphs
from .memory import memory_report, num_blocks_for_budget
from .paged_cache import PagedKVCache
from .sampling import SamplingParams
from .scheduler import Engine, StepEvent, model_config

_LAST_STATS: dict = {}


def _per_request(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _prompts_list(prompts) -> list:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts tensor must be [N, S] token ids, got shape {tuple(prompts.shape)}")
        return list(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists or a LongTensor [N, S]")
    if all(isinstance(t, int) for t in prompts):
        raise ValueError("prompts is a flat list of ints: wrap one prompt in a list ([[...]])")
    return list(prompts)


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    base = getattr(model, "_orig_mod", model)
    emb = base.get_input_embeddings().weight
    return emb.device, emb.dtype


def _stop_ids(config, stop_token_ids, eos: bool) -> set:
    ids = set(stop_token_ids or ())
    eos_id = getattr(config, "eos_token_id", None) if eos else None
    if isinstance(eos_id, int):
        ids.add(eos_id)
    elif eos_id:
        ids.update(eos_id)
    return ids


def build_engine(model, prompts, max_new_tokens, *, num_blocks=None, memory_budget=None, block_size=16,
                 max_batch_size=64, max_prefill_tokens=4096, cuda_graphs=None, graph_sizes=DEFAULT_SIZES,
                 temperature=0.0, top_k=0, top_p=1.0, seed=None, stop_token_ids=None, stop_at_eos=True,
                 max_seq_len=None, overlap=None):
    """The engine ``generate`` runs, with every request already checked and queued (exposed for tests and
    benchmarks that want its stats, its cache, or to add requests later: ``max_seq_len`` then sizes the block
    tables for the longest request to come)."""
    config = model_config(model)
    prompts = _prompts_list(prompts)
    n = len(prompts)
    max_new = _per_request(max_new_tokens, n, "max_new_tokens")
    seeds = _per_request(seed, n, "seed")
    params = [SamplingParams(t, k, p, s) for t, k, p, s in zip(_per_request(temperature, n, "temperature"),
                                                               _per_request(top_k, n, "top_k"),
                                                               _per_request(top_p, n, "top_p"), seeds)]
    device, dtype = _model_device_dtype(model)
    lens = [len(p) for p in prompts]
    for i, m in enumerate(max_new):
        if not (isinstance(m, int) and m > 0):
            raise ValueError(f"max_new_tokens={m!r} for prompt {i} must be a positive int")
    max_seq_len = max(max_seq_len or 0, *(ln + m for ln, m in zip(lens, max_new)))
    if num_blocks is None:
        # enough for every request at once; capped by the budget when one is given
        num_blocks = sum(-(-(ln + m) // block_size) for ln, m in zip(lens, max_new))
        if memory_budget is not None:
            num_blocks = min(num_blocks, num_blocks_for_budget(config, dtype, block_size, memory_budget, device))
    cache = PagedKVCache(config, num_blocks=num_blocks, block_size=block_size, dtype=dtype, device=device)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    graphs = DecodeGraphs([s for s in graph_sizes if s <= max_batch_size] or [1]) if cuda_graphs else None
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    engine = Engine(model, cache, max_seq_len, max_batch_size=max_batch_size,
                    max_prefill_tokens=max_prefill_tokens, pad_token_id=pad, graphs=graphs, overlap=overlap)
    stops = _stop_ids(config, stop_token_ids, stop_at_eos)
    checked = [engine.check_request(p, m) for p, m in zip(prompts, max_new)]  # all checked before any is queued
    for i, (p, m, prm) in enumerate(zip(checked, max_new, params)):
        engine.add_request(p, m, prm, stops, index=i)
    return engine


def generate_stream(model, prompts, max_new_tokens: Union[int, Sequence[int]], **options) -> Iterator[StepEvent]:
    """Like ``generate`` but yields ``StepEvent(index, token, finished)`` as tokens are produced."""
    engine = build_engine(model, prompts, max_new_tokens, **options)
    with torch.inference_mode():
        while engine.has_work:
            yield from engine.step()
    _record_stats(engine)


def _record_stats(engine: Engine) -> None:
    reqs = [(len(r.prompt), len(r.output)) for r in engine.finished.values()]
    cache = engine.cache
    _LAST_STATS.clear()
    _LAST_STATS.update(vars(engine.stats))
    if reqs:
        _LAST_STATS["memory"] = memory_report(engine.config, cache.k_pools[0].dtype, cache.block_size,
                                              cache.allocator.num_blocks, engine.stats.peak_blocks_used,
                                              engine.stats.peak_tokens_live, reqs)


def last_stats() -> dict:
    """Scheduler counters and the memory report of the last finished ``generate`` call."""
    return dict(_LAST_STATS)


def generate(
    model,
    prompts,
    max_new_tokens: Union[int, Sequence[int]],
    *,
    temperature: Union[float, Sequence[float]] = 0.0,
    top_k: Union[int, Sequence[int]] = 0,
    top_p: Union[float, Sequence[float]] = 1.0,
    seed: Union[None, int, Sequence[Optional[int]]] = None,
    stop_token_ids: Optional[Sequence[int]] = None,
    stop_at_eos: bool = True,
    num_blocks: Optional[int] = None,
    memory_budget: Union[None, int, float] = None,
    block_size: int = 16,
    max_batch_size: int = 64,
    max_prefill_tokens: int = 4096,
    cuda_graphs: Optional[bool] = None,
    overlap: Optional[bool] = None,
    stream: Optional[Callable[[int, int, bool], None]] = None,
    progress: Optional[bool] = None,
) -> list[list[int]]:
    """Generate for every prompt with continuous batching over a paged KV pool.

    Per-request lists are accepted for ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p`` and ``seed``
    (temperature 0 = greedy). A request ends at ``max_new_tokens``, at the model's EOS (``stop_at_eos``) or at any
    of ``stop_token_ids`` (the stop token is returned). ``num_blocks`` / ``memory_budget`` (bytes, or a fraction
    of free GPU memory) size the pool; by default it holds every request at once. When it is smaller, requests
    are preempted and recomputed, never dropped. ``stream(index, token, finished)`` is called for every token;
    ``progress`` shows a tqdm bar (default: when there are more than 16 prompts). ``cuda_graphs`` (default: on
    CUDA) replays decode steps as CUDA graphs; ``overlap`` (default: on CUDA) launches each decode step before the
    previous step's tokens are read back, so host work hides behind the GPU's. Bad requests raise ``ValueError``
    before any work starts.
    """
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids,
                   stop_at_eos=stop_at_eos, num_blocks=num_blocks, memory_budget=memory_budget,
                   block_size=block_size, max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens,
                   cuda_graphs=cuda_graphs, overlap=overlap)
    engine = build_engine(model, prompts, max_new_tokens, **options)
    n = len(engine.waiting)
    if progress is None:
        progress = n > 16
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="optgptq generate", unit="req")
    outputs: list[list[int]] = [[] for _ in range(n)]
    with torch.inference_mode():
        while engine.has_work:
            for ev in engine.step():
                outputs[ev.index].append(ev.token)
                if stream is not None:
                    stream(ev.index, ev.token, ev.finished)
                if bar is not None and ev.finished:
                    bar.update(1)
    if bar is not None:
        bar.close()
    for i, req in engine.finished.items():  # preempted requests streamed tokens once; the request holds the truth
        assert outputs[i] == req.output, f"request {i}: streamed tokens disagree with its output"
    _record_stats(engine)
    return outputs
