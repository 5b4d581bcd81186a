"""``PagedKVCache``: a transformers ``Cache`` whose K/V live in a block pool shared by every sequence.

``update`` writes the new tokens with ``optgptq::kv_write`` and hands HF attention a left-padded contiguous view
built by ``optgptq::kv_gather`` (sequence b's tokens right-aligned in the step's key length L, HF's own padded
layout), so every HF attention implementation (eager, sdpa, BLOOM's baddbmm) works unchanged with HF's own masks.
In graphs compiled with ``backend="optgptq"``, the ``paged_kv`` pass replaces that gather + attention with
``optgptq::paged_attention``, which reads the blocks directly.

Two ways to drive it:
- the runtime (``generate``) plans every step: ``set_plan`` gives the slots of the new tokens, block tables,
  context lengths and the [B, L] attention mask it also passes to the model; graphs see only tensors, so B, Sq and
  L are symbolic and decoding does not recompile;
- plain HF ``generate(cache=PagedKVCache(...))`` (``past_key_values=`` before transformers renamed it;
  ``scheduler.cache_kwarg(model)`` says which): with no plan, the cache allocates blocks itself on each
  layer-0 update, the same number of tokens for every row (like ``DynamicCache``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .block_allocator import BlockAllocator, BlockTable
from .overlap import to_device_async


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a HF Llama-family or BLOOM config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


class PagedLayer(CacheLayerMixin):
    """One layer's pool: ``keys``/``values`` [num_blocks, block_size, kv_heads, head_dim]. Bookkeeping lives in the
    cache, which updates all layers together; this class only satisfies HF's per-layer interface."""

    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("PagedLayer is updated through PagedKVCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise NotImplementedError("PagedLayer: ask PagedKVCache")

    def get_seq_length(self) -> int:
        raise NotImplementedError("PagedLayer: ask PagedKVCache")

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class PagedKVCache(Cache):
    """K/V for every layer in ``num_blocks`` blocks of ``block_size`` tokens (see the module docstring)."""

    def __init__(self, config, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        num_layers, kv_heads, head_dim = kv_shape(config)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        layers = [PagedLayer(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype,
                                                                                            device=device))
                  for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.k_pools = [layer.keys for layer in layers]  # [num_blocks, block_size, kv_heads, head_dim] each
        self.v_pools = [layer.values for layer in layers]
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size, self.kv_heads, self.head_dim = block_size, kv_heads, head_dim
        self.device = torch.device(device)
        # The step plan, read by update(): tensors only, so compiled graphs take them as inputs.
        self.planned = False
        self.slot_mapping: Optional[torch.Tensor] = None  # int64 [B, Sq], -1 = padding token
        self.block_tables: Optional[torch.Tensor] = None  # int32 [B, max_blocks]
        self.context_lens: Optional[torch.Tensor] = None  # int32 [B], including this step's tokens
        self.step_mask: Optional[torch.Tensor] = None  # bool [B, L], the attention mask the model gets
        self._hf_tables: list[BlockTable] = []  # HF-generate mode: one table per batch row
        self._hf_len = 0

    # --- the runtime's interface -------------------------------------------------------------------------------
    def set_plan(self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 step_mask: torch.Tensor) -> None:
        """Describe the next forward: which slots the new tokens go to and what every sequence can see."""
        self.planned = True
        self.slot_mapping, self.block_tables = slot_mapping, block_tables
        self.context_lens, self.step_mask = context_lens, step_mask
        # HF's masks place queries at get_query_offset() + i. A shape read off a tensor keeps that offset a plain
        # symbol under compile (as DynamicCache's keys.shape[-2] is), where L - Sq would be an expression.
        past = step_mask.shape[1] - slot_mapping.shape[1]
        self.past_marker = torch.empty((), device=step_mask.device).expand(past)  # [L - Sq], no storage

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate block src into dst in every layer."""
        if not copies:
            return
        both = to_device_async([s for s, _ in copies] + [d for _, d in copies], self.device)  # no stream wait
        src, dst = both[:len(copies)], both[len(copies):]
        for pool in (*self.k_pools, *self.v_pools):
            pool[dst] = pool[src]

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes over all layers, K and V."""
        pool = self.k_pools[0]
        return 2 * len(self.k_pools) * pool[0].numel() * pool.element_size()

    # --- HF's Cache interface ----------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value_states [B, Hkv, Sq, D] -> write them to the pool; return [B, Hkv, L, D] views for attention."""
        b, hkv, sq, d = key_states.shape
        if not self.planned and layer_idx == 0:
            self._plan_hf_step(b, sq)
        k = key_states.transpose(1, 2).reshape(b * sq, hkv, d)  # [B*Sq, Hkv, D], token-major like slot_mapping
        v = value_states.transpose(1, 2).reshape(b * sq, hkv, d)
        kc, vc = self.k_pools[layer_idx], self.v_pools[layer_idx]
        torch.ops.optgptq.kv_write.default(k, v, kc, vc, self.slot_mapping.reshape(-1))
        out_len = self.step_mask.shape[1]
        keys = torch.ops.optgptq.kv_gather.default(kc, self.block_tables, self.context_lens, out_len, self.planned)
        values = torch.ops.optgptq.kv_gather.default(vc, self.block_tables, self.context_lens, out_len, self.planned)
        return keys, values

    def _plan_hf_step(self, batch: int, new_tokens: int) -> None:
        """HF-generate mode: every row grows by ``new_tokens`` (HF stores its left-pad tokens too)."""
        if not self._hf_tables:
            self._hf_tables = [BlockTable() for _ in range(batch)]
        if len(self._hf_tables) != batch:
            raise ValueError(f"PagedKVCache: batch size changed from {len(self._hf_tables)} to {batch}; "
                             "use one cache per generate call (or optgptq_compile.generate)")
        slots = []
        for table in self._hf_tables:
            new_slots, copies = self.allocator.append(table, new_tokens)
            self.copy_blocks(copies)
            slots.append(new_slots)
        self._hf_len += new_tokens
        width = max(len(t.blocks) for t in self._hf_tables)
        tables = [t.blocks + [0] * (width - len(t.blocks)) for t in self._hf_tables]
        dev = self.device
        self.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        self.block_tables = torch.tensor(tables, dtype=torch.int32, device=dev)
        self.context_lens = torch.full((batch,), self._hf_len, dtype=torch.int32, device=dev)
        self.step_mask = torch.ones(batch, self._hf_len, dtype=torch.bool, device=dev)

    def _seen_before_step(self) -> int:
        """Tokens stored before the current forward's new ones (symbolic under compile in planned mode)."""
        if self.planned:
            return self.past_marker.shape[0]
        return self._hf_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.planned:
            return self.step_mask.shape[1]
        return self._hf_len

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._seen_before_step()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self.planned:
            return self.step_mask.shape[1], 0
        return self._hf_len + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        """Free every block of HF mode's sequences and drop the plan."""
        for table in self._hf_tables:
            self.allocator.free(table)
        self._hf_tables, self._hf_len = [], 0
        self.planned = False
