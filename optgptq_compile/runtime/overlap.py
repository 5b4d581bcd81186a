"""Keeping the GPU busy between decode steps: host-to-device inputs and device-to-host tokens without a sync.

A decode step's GPU work (a CUDA-graph replay) is a few milliseconds; the host's part (scheduling, building the
step's inputs, reading the new tokens back) is tenths of a millisecond to milliseconds. Done in turn they add up.
The engine overlaps them: it launches step k+1 -- its input ids taken on the device from step k's tokens --
before it reads step k's tokens back, so the host works while the GPU runs. That needs every copy on the way to be
asynchronous: a plain ``tensor.to("cuda")`` from pageable memory waits for the stream (the step in flight), and
``tensor.tolist()`` on a CUDA tensor waits for everything queued, the next step included.

``to_device_async`` sends a small int64 host list through pinned memory; ``InFlightStep`` holds a launched step's
tokens on the device with a pinned copy on its way back. On the CPU both fall back to plain synchronous
copies (same results; the tests run the overlapped schedule there).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


def to_device_async(values: list[int], device: torch.device) -> torch.Tensor:
    """A device tensor [len(values)] int64, copied without waiting for the stream. The pinned staging buffer comes
    from torch's caching host allocator, which keeps it until the copy has run (it records an event)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    """One stream per device for the token copies back to the host."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


@dataclasses.dataclass
class InFlightStep:
    """A launched decode step whose tokens have not been read on the host yet."""

    batch: list  # the Requests of the step, in row order
    ctx: list[int]  # each request's tokens in the pool once the step has run (its table length at launch)
    tokens: torch.Tensor  # [B] int64 on the device: the step's tokens, the next step's input ids
    host: torch.Tensor  # [B] int64 on the host (pinned on CUDA), filled by an asynchronous copy
    ready: Optional[torch.cuda.Event]

    @classmethod
    def launch(cls, batch: list, tokens: torch.Tensor) -> "InFlightStep":
        """Start copying ``tokens`` back right away, on a side stream: in the compute stream the copy and the switch
        to the copy engine and back cost ~8 us between two decode steps (H100 session 14), on the side stream
        nothing (the next step's inputs and graph go on queueing behind the step)."""
        ctx = [r.table.num_tokens for r in batch]
        if tokens.device.type != "cuda":
            return cls(batch, ctx, tokens, tokens.clone(), None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        side = _copy_stream(tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))  # after the step has made its tokens
        with torch.cuda.stream(side):
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        tokens.record_stream(side)  # the caching allocator must not hand its memory out before the copy ran
        return cls(batch, ctx, tokens, host, ready)

    def read(self) -> list[int]:
        """The step's tokens; waits for this step only (a step launched after it keeps running)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
