"""Continuous batching over a ``PagedKVCache``: requests, admission, preemption, and one model step at a time.

Each ``Engine.step()``: running requests get a slot for their next token (when the pool is full the newest
running request is preempted: its blocks are freed and it is recomputed later from its prompt + the tokens it
already produced, so nothing is dropped or corrupted); waiting requests are admitted FIFO while blocks, batch size
and the prefill token budget allow; prefills and decodes share a step when the padding that costs is small,
otherwise the prefills go first. The batch is left-padded to its longest new-token run (HF's layout).

With ``overlap`` (default on CUDA), decode steps run one ahead of the host: a step's tokens (argmax, or sampled on
the device with the request's own generator) stay on the device as the next step's input ids, and the host reads
them back (and learns which requests hit a stop token) while the next step runs; ``step()`` then returns the tokens
of the step before the one it launched (``overlap.py``). A request that stopped has its one extra token dropped.
Preemption and admission happen on steps whose tokens are all known.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
from typing import Optional

import torch

from .block_allocator import BlockTable, OutOfBlocks
from .overlap import InFlightStep, to_device_async
from .paged_cache import PagedKVCache
from .sampling import SamplingParams, greedy_tokens, make_generator, next_tokens, sample


@dataclasses.dataclass(eq=False)  # requests compare by identity (list membership, removal)
class Request:
    index: int  # position in the caller's list (or the id add_request returned)
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    stop_ids: frozenset
    generator: Optional[torch.Generator] = None
    output: list[int] = dataclasses.field(default_factory=list)
    table: BlockTable = dataclasses.field(default_factory=BlockTable)
    num_computed: int = 0  # leading tokens whose K/V are in the pool
    finish_reason: Optional[str] = None  # "stop", "length"
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_at(self, i: int) -> int:
        """``tokens[i]`` without building the list."""
        return self.prompt[i] if i < len(self.prompt) else self.output[i - len(self.prompt)]


@dataclasses.dataclass
class StepEvent:
    """One new token of one request (what streaming delivers)."""

    index: int
    token: int
    finished: bool


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    mixed_steps: int = 0
    graph_steps: int = 0
    overlapped_steps: int = 0  # decode steps launched before the previous step's tokens were read back
    preemptions: int = 0
    tokens_generated: int = 0
    prefix_shared_tokens: int = 0  # prompt tokens whose K/V were reused from another request's blocks
    peak_blocks_used: int = 0
    peak_tokens_live: int = 0


def model_config(model) -> object:
    """The HF config behind a model, an OptimizedModule (``torch.compile(model)``) or a model whose ``forward``
    was replaced by a compiled one."""
    return getattr(model, "_orig_mod", model).config


def _left_padded_mask(ctx: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L] int64 attention mask with each row's ``ctx`` keys last (HF's left padding), made on the device."""
    keys = torch.arange(length, device=ctx.device)
    return (keys >= length - ctx[:, None]).long()


def _forward_params(model) -> set:
    base = getattr(model, "_orig_mod", model)
    return set(inspect.signature(type(base).forward).parameters)


def cache_kwarg(model) -> str:
    """The keyword a HF model's ``forward`` (and ``generate``) takes its KV cache by: ``cache`` in the transformers
    releases that renamed it (5.24 has it and warns that ``past_key_values`` goes in 5.40), ``past_key_values``
    before (5.17)."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


class Engine:
    """Serves requests on ``model`` with a paged cache of ``num_blocks`` blocks (see module docstring)."""

    def __init__(self, model, cache: PagedKVCache, max_seq_len: int, *, max_batch_size: int = 64,
                 max_prefill_tokens: int = 4096, pad_token_id: int = 0, graphs=None, overlap: Optional[bool] = None):
        self.model, self.cache = model, cache
        self.config = model_config(model)
        self.max_context = getattr(self.config, "max_position_embeddings", None)
        self.block_size = cache.block_size
        self.table_width = -(-max_seq_len // self.block_size)  # block-table columns: fixed, so shapes stay put
        self.max_seq_len = self.table_width * self.block_size
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.pad_token_id = pad_token_id
        self.device = cache.device
        params = _forward_params(model)
        self._pass_positions = "position_ids" in params
        self._pass_logits_to_keep = "logits_to_keep" in params
        self._cache_kwarg = cache_kwarg(model)
        self.graphs = graphs  # cuda_graphs.DecodeGraphs or None
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._in_flight: Optional[InFlightStep] = None
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.stats = EngineStats()
        self._next_index = 0

    # --- requests ----------------------------------------------------------------------------------------------
    def check_request(self, prompt, max_new_tokens: int) -> list[int]:
        """A request's prompt as a list of ints; a ValueError naming what is wrong otherwise."""
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point():
                raise ValueError(f"prompt must be a 1-D tensor of token ids, got {prompt.dtype} {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        prompt = list(prompt)
        if not prompt:
            raise ValueError("empty prompt: a request needs at least one token")
        vocab = self.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt holds token ids outside [0, {vocab})")
        if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
        if self.max_context is not None and len(prompt) > self.max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than the model's context "
                             f"({self.max_context} tokens)")
        total = len(prompt) + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} tokens exceeds this engine's max_seq_len "
                             f"{self.max_seq_len}")
        if -(-total // self.block_size) > self.cache.allocator.num_blocks:
            raise ValueError(f"a request of {total} tokens cannot fit the KV pool of "
                             f"{self.cache.allocator.num_blocks} blocks of {self.block_size}")
        return prompt

    def add_request(self, prompt, max_new_tokens: int, params: SamplingParams = SamplingParams(),
                    stop_ids=(), index: Optional[int] = None) -> int:
        """Queue a request (checked first: a bad one raises ValueError and leaves the others untouched)."""
        prompt = self.check_request(prompt, max_new_tokens)
        if index is None:
            index = self._next_index
        self._next_index = max(self._next_index, index + 1)
        self.waiting.append(Request(index, prompt, max_new_tokens, params, frozenset(stop_ids),
                                    make_generator(params, self.device)))
        return index

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    # --- scheduling --------------------------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.cache.allocator.free(req.table)
        req.num_computed = 0
        req.preemptions += 1
        self.stats.preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def _reserve_decodes(self) -> list[Request]:
        """One slot per running request, oldest first; preempt the newest while the pool is full."""
        alloc, batch = self.cache.allocator, []
        for req in list(self.running):
            if req not in self.running:
                continue  # preempted while making room for an older request
            while True:
                try:
                    slots, copies = alloc.append(req.table, 1)
                    self.cache.copy_blocks(copies)
                    batch.append(req)
                    break
                except OutOfBlocks:
                    self._preempt(self.running[-1])
                    if req not in self.running:
                        break
        return batch

    def _share_prefix(self, req: Request) -> None:
        """Start ``req`` on the full blocks a running request already computed for the same leading tokens."""
        if req.table.blocks or req.num_computed:
            return
        bs, tokens, best, donor = self.block_size, req.tokens, 0, None
        for other in self.running:
            limit = min(other.num_computed, len(tokens) - 1)  # the last prompt token is always computed anew
            common = 0
            for a, b in zip(tokens[:limit], other.tokens[:limit]):
                if a != b:
                    break
                common += 1
            if common // bs > best:
                best, donor = common // bs, other
        if donor is not None:
            req.table = self.cache.allocator.share_prefix(donor.table, best)
            req.num_computed = best * bs
            self.stats.prefix_shared_tokens += best * bs

    def _pick_prefills(self, decodes: int) -> list[Request]:
        """Waiting requests that fit now (FIFO: a request that does not fit blocks those behind it)."""
        alloc, picked, tokens = self.cache.allocator, [], 0
        free = alloc.num_free - decodes  # every decode may need a fresh block
        for req in self.waiting:
            n = len(req.tokens) - req.num_computed
            need = alloc.blocks_needed(req.table, n)
            if decodes + len(picked) >= self.max_batch_size or need > free:
                break
            if picked and tokens + n > self.max_prefill_tokens:
                break
            picked.append(req)
            tokens, free = tokens + n, free - need
        return picked

    def _mixing_pays(self, decodes: int, prefills: list[Request]) -> bool:
        """Padding every row to the longest prefill: worth it while it at most doubles the real token count."""
        lens = [len(r.tokens) - r.num_computed for r in prefills]
        return (decodes + len(prefills)) * max(lens) <= 2 * (decodes + sum(lens))

    def _schedule(self) -> list[Request]:
        prefills = self._pick_prefills(len(self.running))
        if prefills and self.running and not self._mixing_pays(len(self.running), prefills):
            decodes = []  # prefill first (it unblocks waiting requests), decodes next step
            self.stats.prefill_steps += 1
        else:
            decodes = self._reserve_decodes() if self.running else []
            if prefills and decodes:
                self.stats.mixed_steps += 1
            elif prefills:
                self.stats.prefill_steps += 1
            else:
                self.stats.decode_steps += 1
        batch = list(decodes)
        for req in prefills:
            if req not in self.waiting:
                continue
            self._share_prefix(req)
            try:
                slots, copies = self.cache.allocator.append(req.table, len(req.tokens) - req.num_computed)
            except OutOfBlocks:  # decodes took more than foreseen; try again next step
                break
            self.cache.copy_blocks(copies)
            self.waiting.remove(req)
            self.running.append(req)
            batch.append(req)
        if not batch and self.running:  # the prefills did not fit after all: decode instead
            batch = self._reserve_decodes()
        if not batch and self.waiting and not self.running:
            raise RuntimeError("scheduler: an empty pool cannot hold the next request (checked at submission)")
        return batch

    # --- one step ----------------------------------------------------------------------------------------------
    def _batch_tensors(self, batch: list[Request], step_len: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Left-padded inputs for ``batch``; ``step_len`` fixes the key length L (CUDA graphs) instead of the
        longest context."""
        bs, width = self.block_size, self.table_width
        feeds = [r.tokens[r.num_computed:r.table.num_tokens] for r in batch]
        sq = max(len(f) for f in feeds)
        ctx = [r.table.num_tokens for r in batch]
        length = step_len or max(ctx)
        ids, pos, slots, tables = [], [], [], []
        for req, feed, n in zip(batch, feeds, ctx):
            pad = sq - len(feed)
            first = req.num_computed
            ids.append([self.pad_token_id] * pad + feed)
            pos.append([0] * pad + list(range(first, n)))
            blocks = req.table.blocks
            slots.append([-1] * pad + [blocks[t // bs] * bs + t % bs for t in range(first, n)])
            tables.append(blocks + [0] * (width - len(blocks)))
        # one host-to-device copy for the whole step (a decode step is short: separate copies would show)
        fields = dict(input_ids=ids, position_ids=pos, slot_mapping=slots, block_tables=tables,
                      context_lens=[[n] for n in ctx])
        widths = [len(rows[0]) for rows in fields.values()]
        flat = torch.tensor([v for rows in fields.values() for row in rows for v in row], dtype=torch.long)
        parts = flat.to(self.device).split([len(batch) * w for w in widths])  # field by field, row-major
        # input_ids / position_ids / slot_mapping [B, Sq]: contiguous views
        t = {name: part.view(len(batch), w) for name, part, w in zip(fields, parts, widths)}
        t["block_tables"] = t["block_tables"].int()  # [B, width]
        t["attention_mask"] = _left_padded_mask(t["context_lens"][:, 0], length)
        t["context_lens"] = t["context_lens"][:, 0].int()  # [B]
        return t

    def decode_lists(self, batch: list[Request], with_ids: bool = True) -> tuple[list[int], ...]:
        """A decode step's inputs as host lists: input ids (empty without ``with_ids``), positions, slots, context
        lengths [B] each, and the block tables [B * table_width], row-major, zero-padded."""
        bs, width = self.block_size, self.table_width
        ctx = [r.table.num_tokens for r in batch]
        pos = [n - 1 for n in ctx]
        slots = [r.table.blocks[t // bs] * bs + t % bs for r, t in zip(batch, pos)]
        tables = [blk for r in batch for blk in r.table.blocks + [0] * (width - len(r.table.blocks))]
        ids = [r.token_at(t) for r, t in zip(batch, pos)] if with_ids else []
        return ids, pos, slots, ctx, tables

    def _decode_tensors(self, batch: list[Request], step_len: Optional[int] = None,
                        input_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``_batch_tensors`` for a decode step (one new token per request), built without per-position Python
        lists and copied without waiting for the GPU; ``input_ids`` [B] on the device replaces the known tokens
        (an overlapped step's inputs are the step in flight's outputs)."""
        width, b = self.table_width, len(batch)
        ids, pos, slots, ctx, tables = self.decode_lists(batch, with_ids=input_ids is None)
        flat = to_device_async(ids + pos + slots + ctx + tables, self.device)
        parts = flat.split([len(ids), b, b, b, b * width])
        t = dict(input_ids=parts[0].view(b, 1) if input_ids is None else input_ids.view(b, 1),
                 position_ids=parts[1].view(b, 1), slot_mapping=parts[2].view(b, 1),
                 block_tables=parts[4].view(b, width).int(), context_lens=parts[3].int())
        t["attention_mask"] = _left_padded_mask(parts[3], step_len or max(ctx))
        return t

    def run_model(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """One forward over planned inputs; logits of the last position of every row, [B, V]."""
        for name in ("input_ids", "position_ids", "slot_mapping", "attention_mask", "context_lens", "block_tables"):
            # batch, new-token and key lengths vary every step: say so up front rather than recompile to learn it
            for dim in range(t[name].dim() if name != "block_tables" else 1):
                torch._dynamo.maybe_mark_dynamic(t[name], dim)
        self.cache.set_plan(t["slot_mapping"], t["block_tables"], t["context_lens"], t["attention_mask"])
        kwargs = {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"], self._cache_kwarg: self.cache,
                  "use_cache": True}
        if self._pass_positions:
            kwargs["position_ids"] = t["position_ids"]
        if self._pass_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits[:, -1]

    def _forward(self, batch: list[Request], decode_only: bool,
                 input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, V] of one step over ``batch`` (slots already reserved): a CUDA graph when one fits."""
        self.stats.steps += 1
        if self.graphs is not None and decode_only and self.graphs.fits(len(batch)):
            logits = self.graphs.run(self, batch, input_ids)
            self.stats.graph_steps += 1
        elif decode_only:
            logits = self.run_model(self._decode_tensors(batch, input_ids=input_ids))
        else:
            logits = self.run_model(self._batch_tensors(batch))
        alloc = self.cache.allocator
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, alloc.num_blocks - alloc.num_free)
        self.stats.peak_tokens_live = max(self.stats.peak_tokens_live, sum(r.table.num_tokens for r in self.running))
        return logits

    def _next_overlapped(self, prev: InFlightStep) -> Optional[list[int]]:
        """Rows of ``prev`` whose requests can take the next decode step before ``prev``'s tokens are known, with
        their slots reserved; None when that step needs the tokens (a request may join, the pool is too full to go
        on without preempting, or a running request was not in ``prev``)."""
        if len(self.running) != len(prev.batch):
            return None
        rows = [i for i, r in enumerate(prev.batch) if len(r.output) + 1 < r.max_new_tokens]  # others end now
        batch = [prev.batch[i] for i in rows]
        if not batch or (self.waiting and len(batch) < self.max_batch_size):
            return None
        alloc = self.cache.allocator
        if sum(alloc.blocks_needed(r.table, 1) for r in batch) > alloc.num_free:
            return None
        for req in batch:
            _, copies = alloc.append(req.table, 1)
            self.cache.copy_blocks(copies)
        return rows

    def step(self) -> list[StepEvent]:
        """Run one batch; return the tokens produced. With ``overlap`` these may be the tokens of the step
        launched by the previous call (see the module docstring)."""
        prev, self._in_flight = self._in_flight, None
        if prev is not None:
            rows = self._next_overlapped(prev)
            if rows is not None:
                batch = [prev.batch[i] for i in rows]
                same = len(rows) == len(prev.batch)
                ids = prev.tokens if same else prev.tokens[to_device_async(rows, self.device)]
                self.stats.decode_steps += 1
                self.stats.overlapped_steps += 1
                logits = self._forward(batch, True, ids)
                self._in_flight = InFlightStep.launch(batch, self._device_tokens(batch, logits))
            return self._accept(prev.batch, prev.ctx, prev.read())
        batch = self._schedule()
        if not batch:
            return []
        decode_only = all(r.table.num_tokens - r.num_computed == 1 for r in batch)
        logits = self._forward(batch, decode_only)
        if self.overlap and decode_only:
            self._in_flight = InFlightStep.launch(batch, self._device_tokens(batch, logits))
            return []
        greedy = [r.params.greedy for r in batch]
        argmax = greedy_tokens(logits).tolist() if any(greedy) else []
        tokens = [argmax[i] if greedy[i] else sample(logits[i], req.params, req.generator)
                  for i, req in enumerate(batch)]
        return self._accept(batch, [r.table.num_tokens for r in batch], tokens)

    @staticmethod
    def _device_tokens(batch: list[Request], logits: torch.Tensor) -> torch.Tensor:
        return next_tokens(logits, [r.params for r in batch], [r.generator for r in batch])

    def _accept(self, batch: list[Request], ctx: list[int], tokens: list[int]) -> list[StepEvent]:
        """Append each request's new token (``ctx``: its tokens in the pool after the step); end and free the
        requests that reached a stop token or their length."""
        alloc, events = self.cache.allocator, []
        for req, n, token in zip(batch, ctx, tokens):
            if req.finish_reason is not None:
                continue  # stopped while this (overlapped) step was in flight: its extra token is dropped
            req.num_computed = n
            req.output.append(token)
            self.stats.tokens_generated += 1
            if token in req.stop_ids:
                req.finish_reason = "stop"
            elif len(req.output) >= req.max_new_tokens:
                req.finish_reason = "length"
            if req.finish_reason:
                alloc.free(req.table)
                self.running.remove(req)
                self.finished[req.index] = req
            events.append(StepEvent(req.index, token, req.finish_reason is not None))
        return events
