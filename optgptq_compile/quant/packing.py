"""Bit packing of the HF GPTQ format: values are a little-endian bit stream cut into int32 words.

For ``bits`` in (2, 4, 8) a word holds 32/bits whole values; for 3 bits, 32 values fill 3 words and some values
straddle two words (AutoGPTQ's layout). Both cases are the same rule: value ``j`` of a run of 32 occupies bits
``[j*bits, (j+1)*bits)`` of the concatenated words. ``qweight`` packs along K (rows), ``qzeros`` along N (columns).
"""

from __future__ import annotations

import functools

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")


@functools.lru_cache(maxsize=None)
def _layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For value j of a run of 32: the word it starts in and its bit offset there, made on ``device`` once (a copy
    from the host on every call broke CUDA-graph capture of the reference ops on a GPU)."""
    start = torch.arange(32, dtype=torch.int64, device=device) * bits
    return start // 32, start % 32


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] ints in [0, 2**bits) -> int32 [ceil(R*bits/32), C], packed along R."""
    _check_bits(bits)
    rows, cols = values.shape
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(v.min())}, {int(v.max())}]")
    padded = -(-rows // 32) * 32  # pad to whole runs of 32 values; the unused tail words are dropped below
    v = torch.nn.functional.pad(v, (0, 0, 0, padded - rows)).reshape(padded // 32, 32, cols)  # [runs, 32, C]
    word, offset = _layout(bits, v.device)
    words = torch.zeros(padded // 32, bits + 1, cols, dtype=torch.int64, device=v.device)  # +1: spill word
    low = (v << offset[None, :, None]) & 0xFFFFFFFF
    high = v >> (32 - offset)[None, :, None]  # the bits that spill into the next word (0 unless straddling)
    words.index_add_(1, word, low)  # disjoint bit ranges: adding is OR
    words.index_add_(1, word + 1, high)
    words = words[:, :bits].reshape(padded * bits // 32, cols)[: -(-rows * bits // 32)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [W, C] -> int32 [W*32/bits rounded up to whole runs of 32, C]; callers slice off padding."""
    _check_bits(bits)
    nwords, cols = packed.shape
    w = packed.to(torch.int64) & 0xFFFFFFFF
    padded = -(-nwords // bits) * bits
    w = torch.nn.functional.pad(w, (0, 0, 0, padded - nwords)).reshape(padded // bits, bits, cols)
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)  # a zero spill word keeps the indexing uniform
    word, offset = _layout(bits, w.device)
    low = w[:, word] >> offset[None, :, None]
    high = w[:, word + 1] << (32 - offset)[None, :, None]
    values = (low | high) & (2**bits - 1)  # [runs, 32, C]
    return values.reshape(padded // bits * 32, cols).to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] -> int32 [R, C*bits/32], packed along C (the ``qzeros`` layout)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C*bits/32] -> int32 [R, C'] with C' >= C (whole runs of 32); callers slice to C."""
    return unpack_rows(packed.t(), bits).t().contiguous()
