"""Decode steps as captured CUDA graphs, one per padded batch size (launch overhead dominates small decode steps).

A graph replays fixed addresses, so each captured size owns its inputs in one device buffer (``StepInputs``):
input ids, positions, slots and where each row's keys start as int64, context lengths and block tables as int32,
side by side. A step packs its batch into pinned host memory and sends it with one host-to-device copy (plus one
device-to-device copy of the input ids when they are the tokens of the step in flight); the attention mask is one
comparison inside the graph. Before, a batch-1 step ran 13 small kernels and copies outside the graph (mask, int32
casts, six copies into static buffers): 45 us of its 2.36 ms on the H100 (session 14, RESULTS.md).

Rows past the batch are padding: slot -1 (nothing written), context length 0 (paged attention gives zeros), one
visible key so no attention row is empty. The key length of every captured step is the engine's full
``max_seq_len``: free for ``paged_attention`` (it reads only ``context_lens``), a real cost only for a model whose
attention was not rewritten (it then gathers that many positions).
"""

from __future__ import annotations

import torch

from ..log import log

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64)


class StepInputs:
    """A captured size's step inputs in one byte buffer: [ids | positions | slots | first visible key] int64 [size]
    each, then [context lengths] int32 [size] and [block tables] int32 [size, width]. ``views`` are typed views of
    it (the graph's inputs); ``pack`` builds the host bytes of one step for a key length of ``length``."""

    def __init__(self, size: int, width: int, length: int, pad_token_id: int, device: torch.device):
        self.size, self.width, self.length, self.pad_token_id = size, width, length, pad_token_id
        self.buffer = torch.empty(self.nbytes(size, width), dtype=torch.uint8, device=device)
        self.views = self.unpack(self.buffer, size, width)
        self.keys = torch.arange(length, device=device)  # [L] key positions, for the mask
        self.mask = torch.empty(size, length, dtype=torch.int64, device=device)  # [size, L], written in the graph
        self.buffer.copy_(self.pack([], [], [], [], []))  # all padding: warm-up and capture write nothing

    @staticmethod
    def nbytes(size: int, width: int) -> int:
        return 8 * 4 * size + 4 * (size + size * width)

    @staticmethod
    def unpack(buffer: torch.Tensor, size: int, width: int) -> dict[str, torch.Tensor]:
        """Typed views of a packed buffer (host or device): input_ids / position_ids / slot_mapping [size, 1] and
        mask_start [size] int64, context_lens [size] and block_tables [size, width] int32."""
        wide = buffer[:32 * size].view(torch.int64)  # [4 * size]
        narrow = buffer[32 * size:].view(torch.int32)  # [size + size * width]
        return dict(input_ids=wide[:size].view(size, 1), position_ids=wide[size:2 * size].view(size, 1),
                    slot_mapping=wide[2 * size:3 * size].view(size, 1), mask_start=wide[3 * size:],
                    context_lens=narrow[:size], block_tables=narrow[size:].view(size, width))

    def pack(self, ids: list[int], pos: list[int], slots: list[int], ctx: list[int], tables: list[int]
             ) -> torch.Tensor:
        """The host bytes of a step of ``len(pos)`` rows (``Engine.decode_lists``; ``ids`` may be empty: the
        device fills them), padded to ``size`` rows."""
        b, pad = len(pos), self.size - len(pos)
        ids = ids or [self.pad_token_id] * b
        # each row's context last, at least one key visible (a padding row sees the last position)
        start = [self.length - max(n, 1) for n in ctx] + [self.length - 1] * pad
        wide = torch.tensor(ids + [self.pad_token_id] * pad + pos + [0] * pad + slots + [-1] * pad + start,
                            dtype=torch.int64)
        narrow = torch.tensor(ctx + [0] * pad + tables + [0] * (pad * self.width), dtype=torch.int32)
        return torch.cat([wide.view(torch.uint8), narrow.view(torch.uint8)])

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The forward's inputs from the views; the [size, L] attention mask is written here, one comparison kernel
        (inside the graph when captured)."""
        torch.ge(self.keys, self.views["mask_start"][:, None], out=self.mask)  # [size, L] 0/1, HF's left padding
        inputs = {name: t for name, t in self.views.items() if name != "mask_start"}
        return dict(inputs, attention_mask=self.mask)


class DecodeGraphs:
    def __init__(self, sizes=DEFAULT_SIZES):
        self.sizes = sorted(sizes)
        self.graphs: dict[int, tuple] = {}  # size -> (replay, the captured inputs, logits buffer, StepInputs)
        self.pool = None
        self.disabled = False  # set when a capture failed: the engine then runs decode steps without graphs

    def fits(self, batch: int) -> bool:
        return not self.disabled and batch <= self.sizes[-1]

    def _record(self, engine, inputs: StepInputs):
        """Warm up and capture one decode step on ``inputs``; return (replay, captured inputs, logits buffer)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compiles (if the model is compiled) and settles allocator / autotuning
                engine.run_model(inputs.model_inputs())
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            captured = inputs.model_inputs()
            logits = engine.run_model(captured)
        return graph.replay, captured, logits

    def _capture(self, engine, size: int):
        inputs = StepInputs(size, engine.table_width, engine.max_seq_len, engine.pad_token_id, engine.device)
        self.graphs[size] = (*self._record(engine, inputs), inputs)

    def run(self, engine, batch, input_ids=None) -> torch.Tensor:
        """Logits [len(batch), V] of one decode step for ``batch`` (every request has one new token; ``input_ids``
        [B] on the device replaces the requests' last known tokens)."""
        size = next(s for s in self.sizes if s >= len(batch))
        if size not in self.graphs:
            try:
                self._capture(engine, size)
            except RuntimeError as exc:  # e.g. an uncompiled HF forward copies host scalars to the GPU
                self.disabled = True
                log.warning("CUDA-graph capture of the decode step failed, running without graphs: %s", exc)
                torch.cuda.synchronize()
                return engine.run_model(engine._decode_tensors(batch, input_ids=input_ids))
        replay, captured, logits, inputs = self.graphs[size]
        host = inputs.pack(*engine.decode_lists(batch, with_ids=input_ids is None))
        if inputs.buffer.is_cuda:  # pinned (the caching host allocator keeps it until the copy has run): no wait
            host = host.pin_memory()
        inputs.buffer.copy_(host, non_blocking=True)
        b = len(batch)
        if input_ids is not None:  # the tokens of the step in flight, still on the device
            inputs.views["input_ids"][:b, 0].copy_(input_ids, non_blocking=True)
        engine.cache.set_plan(captured["slot_mapping"], captured["block_tables"], captured["context_lens"],
                              captured["attention_mask"])
        replay()
        return logits[:b]
