"""The one timing method of the kernel benchmarks: the median of ``triton.testing.do_bench`` over a CUDA graph that
replays the calls, divided by the number of calls (launch overhead out of the number, as in a captured decode step).

``fns`` are closures over different copies of the data (enough copies that together they exceed the L2, so the
weights / KV come from HBM as in a real step); the graph calls every copy at least once. On a machine without CUDA
(the scripts' ``--smoke`` runs in the Triton interpreter) it returns the wall clock of one pass, which only shows
that the script runs.
"""

from __future__ import annotations

import time

import torch


def time_graph(fns, replays: int = 20, warmup: int = 25, rep: int = 100) -> float:
    """Median microseconds per call of a CUDA graph replaying ``max(replays, len(fns))`` calls, cycling over ``fns``."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - start) * 1e6 / len(fns)
    import triton

    for f in fns:  # compile / autotune outside the capture
        f()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()  # warm up on a side stream, as CUDA-graph capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    replays = max(replays, len(fns))  # every copy once per replay, or the small ones would sit in L2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(replays):
            fns[i % len(fns)]()
    ms = triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    del graph
    return ms * 1e3 / replays
