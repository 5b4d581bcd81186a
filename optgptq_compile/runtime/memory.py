"""KV memory: pool sizing from a budget, and accounting (allocated vs live bytes, vs HF's contiguous caches)."""

from __future__ import annotations

import torch

from .paged_cache import kv_shape


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    layers, kv_heads, head_dim = kv_shape(config)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(config, dtype: torch.dtype, block_size: int, budget, device: torch.device) -> int:
    """Blocks that fit ``budget``: bytes (int) or a fraction (float in (0, 1]) of the device's free memory."""
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"memory_budget={budget}: a fraction must be in (0, 1]")
        if device.type != "cuda":
            raise ValueError("memory_budget as a fraction of free memory needs a CUDA device; give bytes instead")
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * budget)
    if not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"memory_budget={budget!r} must be a positive number of bytes or a fraction in (0, 1]")
    blocks = budget // (kv_bytes_per_token(config, dtype) * block_size)
    if blocks < 1:
        raise ValueError(f"memory_budget={budget} bytes holds no KV block of {block_size} tokens")
    return int(blocks)


def memory_report(config, dtype: torch.dtype, block_size: int, num_blocks: int, peak_blocks_used: int,
                  peak_tokens_live: int, requests: list[tuple[int, int]]) -> dict:
    """Bytes the paged pool reserved and used vs HF's caches for the same requests [(prompt_len, generated)].

    HF ``generate`` on the whole list as one batch pads every row to the longest prompt + max generated length
    (DynamicCache grows to it; a static cache reserves it from the start)."""
    per_token = kv_bytes_per_token(config, dtype)
    block_bytes = per_token * block_size
    longest = max(p for p, _ in requests) + max(g for _, g in requests)
    used_peak = peak_blocks_used * block_bytes
    return {
        "kv_bytes_per_token": per_token,
        "pool_bytes": num_blocks * block_bytes,
        "peak_allocated_bytes": used_peak,
        "peak_live_token_bytes": peak_tokens_live * per_token,
        # the part of allocated blocks holding no token: at most block_size - 1 tokens per live sequence
        "fragmentation": 1 - peak_tokens_live * per_token / used_peak if used_peak else 0.0,
        "hf_padded_batch_bytes": len(requests) * longest * per_token,
        "exact_token_bytes": sum(p + g for p, g in requests) * per_token,
    }
