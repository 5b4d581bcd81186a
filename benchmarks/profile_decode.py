"""Where the time goes: compile time by phase, and the GPU time of one decode step by kernel.

    PYTHONPATH=. python benchmarks/profile_decode.py --layers 4 --out DIR
    PYTHONPATH=. python benchmarks/profile_decode.py --layers 4 --inline-triton   # Inductor inlines our kernels

A Llama-2-7B-shaped random-weight model (fp16, --layers decoder layers), compiled with backend="optgptq" (int4 g128)
and run through the paged runtime: prefill one batch of --context-token prompts, then decode. Writes
``compile_profile.txt`` (Dynamo's compile-time table and our passes' times), ``decode_profile.txt`` (torch
profiler over --steps decode steps without CUDA graphs, kernels by GPU time) and ``profile.json`` (the headline
numbers) to --out.

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=5, help="decode steps profiled")
    ap.add_argument("--inline-triton", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA/ROCm GPU")
    os.makedirs(args.out, exist_ok=True)
    tag = "inlined" if args.inline_triton else "opaque"
    if args.inline_triton:
        os.environ["OPTGPTQ_INLINE_TRITON"] = "1"
    model = model_7b(args.layers)
    prompts = [list(range(3, 3 + args.context))] * args.batch
    result = {"layers": args.layers, "batch": args.batch, "context": args.context, "triton_ops": tag}
    log_text = []
    handler = logging.Handler()
    handler.emit = lambda record: log_text.append(record.getMessage())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)  # the backend logs each pass's time at debug level
    start = time.perf_counter()
    with torch.inference_mode():
        compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 128})
        engine = build_engine(compiled, prompts, 64, max_batch_size=args.batch, stop_at_eos=False, cuda_graphs=False)
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
    print(json.dumps(result, indent=1))
    print(table[:6000])
    with open(os.path.join(args.out, f"profile_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
