"""Where a decode step's wall time goes beyond its graph: every GPU event over consecutive steps of the engine.

    PYTHONPATH=. python benchmarks/profile_steps.py [--layers 32] [--batch 1] [--steps 4] [--out DIR]

Builds the Llama-2-7B-shaped model of ``profile_decode.py`` (random weights, int4 g128 through ``backend="optgptq"``)
with a 512-token prompt per row, runs a few steps, prints the wall time per step (synchronised, no profiler), then
profiles ``--steps`` steps and writes ``steps_<layers>.txt``: every kernel and copy in start order with its gap to
the one before and its duration, us, so the work between two graph replays (input copies, argmax, token copies)
shows next to the graphs' own kernels. The listing printed leaves out the layers' GEMV and attention kernels.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_decode import model_7b, run_steps  # noqa: E402

from optgptq_compile.runtime.generate import build_engine  # noqa: E402

LAYER_KERNELS = ("gptq_gemv", "paged_attention", "rope_kv_write")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    model = model_7b(a.layers)
    prompts = [list(range(3, 515))] * a.batch
    with torch.inference_mode():
        compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 128})
        engine = build_engine(compiled, prompts, 120, max_batch_size=a.batch, stop_at_eos=False, cuda_graphs=True)
        for _ in range(4):  # prefill, then the decode graph's compile and capture
            engine.step()
        print(f"layers {a.layers}, batch {a.batch}: wall per step {run_steps(engine, 20) * 1e6:.1f} us", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_steps(engine, a.steps)
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    lines, end = [f"{'start':>10} {'gap':>7} {'dur':>7}  kernel"], None
    for e in events:  # a negative gap: the kernel started before the latest end so far (PDL overlap)
        gap = 0.0 if end is None else e.time_range.start - end
        end = e.time_range.end if end is None else max(end, e.time_range.end)
        lines.append(f"{e.time_range.start - events[0].time_range.start:10.1f} {gap:7.1f} "
                     f"{e.time_range.end - e.time_range.start:7.1f}  {e.name[:100]}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"steps_{a.layers}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(line for line in lines if not any(k in line for k in LAYER_KERNELS)))


if __name__ == "__main__":
    main()
