"""Where the time goes: compile time by phase, and the GPU time of one decode step by kernel.

    PYTHONPATH=. python benchmarks/profile_decode.py --layers 4 --out DIR
    PYTHONPATH=. python benchmarks/profile_decode.py --layers 4 --inline-triton   # Inductor inlines our kernels
    PYTHONPATH=. python benchmarks/profile_decode.py --layers 4 --cuda-graphs     # the timeline of replayed steps
    PYTHONPATH=. python benchmarks/profile_decode.py --layers 4 --cuda-graphs --batch 8 \
        --optgptq-options '{"fuse_silu_mul": false}'                            # a decode batch, an option off

A Llama-2-7B-shaped random-weight model (fp16, --layers decoder layers), compiled with backend="optgptq" (int4 g128)
and run through the paged runtime: prefill one batch of --context-token prompts, then decode. Writes
``compile_profile.txt`` (Dynamo's compile-time table and our passes' times), ``decode_profile.txt`` (torch
profiler over --steps decode steps without CUDA graphs, kernels by GPU time) and ``profile.json`` (the headline
numbers) to --out.

Also ``prefill_profile_<tag>.txt``: one more prefill of the same prompts (graphs compiled already), its wall time
against its kernels' GPU time, its kernels by GPU time, and its host-side ops by CPU time (a prefill runs
eagerly: one launch per op).

``--cuda-graphs`` profiles decode steps replayed as CUDA graphs (what e2e.py times) and writes
``decode_timeline_<tag>.txt``: one step's kernels in launch order with their durations and the idle gaps between
them, and the step's span against the sum of its kernel times (the launch gaps a graph still pays).

``--inline-triton`` sets ``OPTGPTQ_INLINE_TRITON=1``: Inductor then inlines each ``triton_op``'s ``wrap_triton``
kernels (and analyses every call site's TTIR for mutations: a compile-time cost per call site) instead of calling
the ops as opaque custom ops (the backend's default).
"""

import argparse
import logging
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import optgptq_compile
from optgptq_compile.log import log
from optgptq_compile.runtime.generate import build_engine


def model_7b(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    return model


def run_steps(engine, n: int) -> float:
    """Seconds per engine step over ``n`` steps (synchronised)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def kernel_timeline(prof, steps: int) -> tuple[str, dict]:
    """One replayed decode step's kernels in start order: start offset, idle gap before each and duration, in us;
    plus the mean span of a step's graph against the mean sum of its kernel durations. A graph's kernels run back
    to back (gaps well under 5 us); the host's work between steps (reading tokens back, preparing the next step's
    inputs) leaves larger gaps, so the stream is cut there and the segments with many kernels are the steps. With
    programmatic dependent launch kernels overlap (a kernel starts before the previous one ends and waits inside):
    gaps and spans are taken against the latest end so far, so a negative gap is an overlap."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    segments, current, end = [], [], None
    for e in kernels:
        if current and e.time_range.start - end > 5.0:
            segments.append(current)
            current = []
        end = e.time_range.end if not current else max(end, e.time_range.end)
        current.append(e)
    segments.append(current)
    graphs = [g for g in segments if len(g) >= 10]
    if not graphs:
        return "no decode-step graph found in the profile\n", {}
    span = [max(e.time_range.end for e in g) - g[0].time_range.start for g in graphs]
    busy = [sum(e.time_range.end - e.time_range.start for e in g) for g in graphs]
    median = sorted(range(len(graphs)), key=lambda i: span[i])[len(graphs) // 2]
    step = graphs[median]
    t0 = step[0].time_range.start
    lines = [f"{len(graphs)} step graphs; median span {span[median]:.1f} us (its kernel time {busy[median]:.1f} us, "
             f"{len(step)} kernels: below); mean span {sum(span) / len(span):.1f} us", "",
             f"{'start':>9} {'gap':>6} {'dur':>7} {'end':>9}  kernel"]
    prev_end = t0
    for e in step:
        lines.append(f"{e.time_range.start - t0:9.1f} {e.time_range.start - prev_end:6.1f} "
                     f"{e.time_range.end - e.time_range.start:7.1f} {e.time_range.end - t0:9.1f}  {e.name[:110]}")
        prev_end = max(prev_end, e.time_range.end)
    return "\n".join(lines) + "\n", {"step_span_us": span[median], "step_kernel_us": busy[median],
                                     "mean_span_us": sum(span) / len(span)}


def profile_prefill(compiled, prompts, cuda_graphs: bool, result: dict) -> str:
    """One more prefill of the same prompts through a fresh engine (the graph is compiled already): its wall time
    (the time to first token, launches included) against its kernels' GPU time, and the kernels by GPU time."""
    engine = build_engine(compiled, prompts, 64, max_batch_size=len(prompts), stop_at_eos=False,
                          cuda_graphs=cuda_graphs)
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    result["prefill_wall_ms"] = 1e3 * (time.perf_counter() - t)
    engine = build_engine(compiled, prompts, 64, max_batch_size=len(prompts), stop_at_eos=False,
                          cuda_graphs=cuda_graphs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    result["prefill_gpu_ms"] = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    engine = build_engine(compiled, prompts, 64, max_batch_size=len(prompts), stop_at_eos=False,
                          cuda_graphs=cuda_graphs)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as host:  # the host's side (a prefill runs eagerly)
        with torch.profiler.record_function("engine.step"):
            engine.step()
        torch.cuda.synchronize()
    result["prefill_host_profile"] = host.key_averages().table(sort_by="self_cpu_time_total", row_limit=40,
                                                               max_name_column_width=70)
    return (f"prefill of {len(prompts)} x {len(prompts[0])} tokens: wall {result['prefill_wall_ms']:.2f} ms, kernels "
            f"{result['prefill_gpu_ms']:.2f} ms of GPU time\n\n"
            + prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
            + "\n\nhost (a third prefill, ops by their own CPU time):\n" + result.pop("prefill_host_profile"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=5, help="decode steps profiled")
    ap.add_argument("--inline-triton", action="store_true")
    ap.add_argument("--cuda-graphs", action="store_true", help="profile graph replays; write the kernel timeline")
    ap.add_argument("--optgptq-options", default="{}", help="JSON merged into the backend options, e.g. "
                    "'{\"fuse_norm_residual\": false}'")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    extra_options = json.loads(args.optgptq_options)
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA/ROCm GPU")
    os.makedirs(args.out, exist_ok=True)
    tag = ("inlined" if args.inline_triton else "opaque") + ("_graphs" if args.cuda_graphs else "") + f"_b{args.batch}"
    tag += "".join(f"_{k}-{v}" for k, v in sorted(extra_options.items()))  # no "=": the device tool drops it
    if args.inline_triton:
        os.environ["OPTGPTQ_INLINE_TRITON"] = "1"
    model = model_7b(args.layers)
    prompts = [list(range(3, 3 + args.context))] * args.batch
    result = {"layers": args.layers, "batch": args.batch, "context": args.context, "triton_ops": tag,
              "options": extra_options}
    log_text = []
    handler = logging.Handler()
    handler.emit = lambda record: log_text.append(record.getMessage())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)  # the backend logs each pass's time at debug level
    start = time.perf_counter()
    with torch.inference_mode():
        compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 128, **extra_options})
        engine = build_engine(compiled, prompts, 64, max_batch_size=args.batch, stop_at_eos=False,
                              cuda_graphs=args.cuda_graphs)
        for step in ("prefill", "first_decode", "second_decode"):  # the first two compile a graph each
            t = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            result[f"{step}_step_s"] = time.perf_counter() - t
        result["compile_and_first_steps_s"] = time.perf_counter() - start
        result["stats"] = optgptq_compile.stats()
        with open(os.path.join(args.out, f"compile_profile_{tag}.txt"), "w") as f:
            f.write(torch._dynamo.utils.compile_times(repr="str", aggregate=True) + "\n\noptgptq log:\n")
            f.write("\n".join(log_text))
        result["decode_step_ms_eager_launch"] = 1e3 * run_steps(engine, 10)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_steps(engine, args.steps)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        with open(os.path.join(args.out, f"decode_profile_{tag}.txt"), "w") as f:
            f.write(table)
        gpu_us = sum(e.self_device_time_total for e in prof.key_averages()) / args.steps
        result["decode_step_gpu_ms"] = gpu_us / 1e3
        timeline, spans = kernel_timeline(prof, args.steps)
        result.update(spans)
        with open(os.path.join(args.out, f"decode_timeline_{tag}.txt"), "w") as f:
            f.write(timeline)
        prefill_table = profile_prefill(compiled, prompts, args.cuda_graphs, result)
        with open(os.path.join(args.out, f"prefill_profile_{tag}.txt"), "w") as f:
            f.write(prefill_table)
    print(json.dumps(result, indent=1))
    print(prefill_table[:5000])
    print(table[:6000])
    print(timeline[:8000])
    with open(os.path.join(args.out, f"profile_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
