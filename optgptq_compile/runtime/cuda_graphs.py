"""Decode steps as captured CUDA graphs, one per padded batch size (launch overhead dominates small decode steps).

A graph replays fixed addresses, so each captured size owns static input buffers; a step copies its batch into
the smallest size that holds it. Rows past the batch are padding: slot -1 (nothing written), context length 0
(paged attention gives zeros), one visible key so no attention row is empty. The key length of every captured
step is the engine's full ``max_seq_len``: free for ``paged_attention`` (it reads only ``context_lens``), a real
cost only for a model whose attention was not rewritten (it then gathers that many positions).
"""

from __future__ import annotations

import torch

from ..log import log

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64)


class DecodeGraphs:
    def __init__(self, sizes=DEFAULT_SIZES):
        self.sizes = sorted(sizes)
        self.graphs: dict[int, tuple] = {}  # size -> (replay, static inputs, logits buffer)
        self.pool = None
        self.disabled = False  # set when a capture failed: the engine then runs decode steps without graphs

    def fits(self, batch: int) -> bool:
        return not self.disabled and batch <= self.sizes[-1]

    def _static_inputs(self, engine, size: int) -> dict[str, torch.Tensor]:
        dev, length = engine.device, engine.max_seq_len
        mask = torch.zeros(size, length, dtype=torch.long, device=dev)
        mask[:, -1] = 1
        return dict(
            input_ids=torch.full((size, 1), engine.pad_token_id, dtype=torch.long, device=dev),
            position_ids=torch.zeros(size, 1, dtype=torch.long, device=dev),
            slot_mapping=torch.full((size, 1), -1, dtype=torch.long, device=dev),
            block_tables=torch.zeros(size, engine.table_width, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(size, dtype=torch.int32, device=dev),
            attention_mask=mask,
        )

    def _record(self, engine, static: dict):
        """Warm up and capture one decode step on ``static``; return (replay, logits buffer)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compiles (if the model is compiled) and settles allocator / autotuning
                engine.run_model(static)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = engine.run_model(static)
        return graph.replay, logits

    def _capture(self, engine, size: int):
        static = self._static_inputs(engine, size)  # all padding: warm-up and capture write nothing to the pool
        replay, logits = self._record(engine, static)
        self.graphs[size] = (replay, static, logits)

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
        replay, static, logits = self.graphs[size]
        real = engine._decode_tensors(batch, step_len=engine.max_seq_len, input_ids=input_ids)
        b = len(batch)
        for name, buf in static.items():  # device-to-device: nothing here waits for the GPU
            buf[:b].copy_(real[name], non_blocking=True)
        static["slot_mapping"][b:].fill_(-1)
        static["context_lens"][b:].zero_()
        static["attention_mask"][b:].zero_()
        static["attention_mask"][b:, -1] = 1
        engine.cache.set_plan(static["slot_mapping"], static["block_tables"], static["context_lens"],
                              static["attention_mask"])
        replay()
        return logits[:b]
