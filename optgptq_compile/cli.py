"""The ``optgptq`` command: quantize a model to a GPTQ checkpoint, generate from one, benchmark, dump graphs.

    optgptq quantize smollm2 --calibration /usr/share/common-licenses/GPL-3 --out smol-gptq
    optgptq generate smol-gptq --prompt "The capital of France is"
    optgptq bench linear --shape 4096x4096 --m 1 16
    optgptq bench e2e --out results/       # end-to-end decode on a Llama-2-7B shape (GPU; --tiny on a CPU)
    optgptq dump smollm2 --out dumps/ --bits 4

MODEL is ``smollm2`` (the offline SmolLM2-135M), a HF model directory or a ``.gguf`` file; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="weight bit width (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size, -1 = per channel")
    p.add_argument("--no-act-order", dest="act_order", action="store_false", help="disable act-order (desc_act)")
    p.add_argument("--asym", dest="sym", action="store_false", help="asymmetric (zero-point) quantization")


def _read_calibration(tokenizer, path: str, windows: int, length: int) -> torch.Tensor:
    if not os.path.isfile(path):
        raise SystemExit(f"optgptq: calibration text file not found: {path}")
    ids = tokenizer(open(path, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
    count = min(windows, ids.numel() // length)
    if count == 0:
        raise SystemExit(f"optgptq: {path} has {ids.numel()} tokens, fewer than one window of {length}")
    return ids[: count * length].reshape(count, length)


def cmd_quantize(args) -> None:
    import optgptq_compile
    from optgptq_compile.data import load_pretrained

    model, tokenizer = load_pretrained(args.model)
    calibration = _read_calibration(tokenizer, args.calibration, args.windows, args.length)
    start = time.perf_counter()
    optgptq_compile.quantize(model, calibration, bits=args.bits, group_size=args.group_size,
                             act_order=args.act_order, sym=args.sym)
    optgptq_compile.save_quantized(model, args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.bits}-bit GPTQ checkpoint to {args.out} in {time.perf_counter() - start:.1f} s")


def cmd_generate(args) -> None:
    import optgptq_compile
    from transformers import AutoTokenizer

    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"optgptq: checkpoint directory not found: {args.checkpoint}")
    model = optgptq_compile.load_quantized(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    model.forward = torch.compile(model.forward, backend="optgptq", options={"kernels": args.kernels})
    prompts = [tokenizer(p).input_ids for p in args.prompt]
    outputs = optgptq_compile.generate(model, prompts, max_new_tokens=args.max_new_tokens)
    for prompt, tokens in zip(args.prompt, outputs):
        print(f"{prompt!r} -> {tokenizer.decode(tokens, skip_special_tokens=True)!r}")


def cmd_bench(args) -> None:
    from optgptq_compile.quant.rtn import quantize_rtn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    n, k = args.shape
    weight = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    q = quantize_rtn(weight, args.bits, args.group_size, sym=True)
    from optgptq_compile.lowering import KERNEL_VARIANTS

    base = torch.ops.optgptq.gptq_linear.default  # on a GPU, time the Triton kernel a compiled graph would use
    op = KERNEL_VARIANTS.get(base, {}).get("triton") if device == "cuda" else None
    op = op or base
    print(f"| M | dense linear (ms) | gptq_linear {args.bits}-bit (ms) | speed-up |  [{n}x{k}, {device}]")
    print("|---|---|---|---|")
    for m in args.m:
        x = torch.randn(m, k, device=device, dtype=dtype)
        dense = _time(lambda: torch.nn.functional.linear(x, weight))
        quant = _time(lambda: op(x, *q.tensors().values(), None, q.bits, q.group_size))
        print(f"| {m} | {dense:.3f} | {quant:.3f} | {dense / quant:.2f}x |")


def _time(fn, reps: int = 20) -> float:
    """Median milliseconds: CUDA events through triton.testing.do_bench on a GPU, perf_counter on a CPU."""
    if torch.cuda.is_available():
        import triton

        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def cmd_dump(args) -> None:
    import optgptq_compile
    from optgptq_compile.data import load_pretrained

    model, tokenizer = load_pretrained(args.model)
    options = {"bits": None if args.bits == 0 else args.bits, "group_size": args.group_size, "dump_dir": args.out}
    compiled = torch.compile(model, backend="optgptq", options=options)
    with torch.no_grad():
        compiled(tokenizer(args.prompt, return_tensors="pt").input_ids)
    for root, _, files in sorted(os.walk(args.out)):
        for f in sorted(files):
            print(os.path.join(root, f))
    print(optgptq_compile.stats())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optgptq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="GPTQ-quantize a model with calibration text and save a checkpoint")
    p.add_argument("model", help="smollm2, a HF model directory, or a .gguf file")
    p.add_argument("--calibration", required=True, help="a UTF-8 text file of calibration text")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--windows", type=_positive, default=32, help="calibration windows (default 32)")
    p.add_argument("--length", type=_positive, default=512, help="tokens per window (default 512)")
    _add_quant_flags(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("generate", help="generate from a GPTQ checkpoint with the paged-KV runtime")
    p.add_argument("checkpoint", help="a GPTQ checkpoint directory (ours or a community one)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--max-new-tokens", type=_positive, default=32)
    p.add_argument("--kernels", choices=("auto", "triton", "reference"), default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmarks: gptq_linear vs a dense linear, or end-to-end decode (e2e)")
    kinds = p.add_subparsers(dest="what", required=True)
    p = kinds.add_parser("linear", help="time gptq_linear against a dense linear on this machine")
    p.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split("x")), default=(4096, 4096),
                   help="NxK of the weight (default 4096x4096)")
    p.add_argument("--m", type=_positive, nargs="+", default=[1, 16, 256], help="activation rows to time")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=128)
    p.set_defaults(func=cmd_bench)

    from .bench import e2e

    p = kinds.add_parser("e2e", help="end-to-end decode: HF eager / static + Inductor / int4 tinygemm / optgptq",
                         description=e2e.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e2e.add_arguments(p, default_out=".")
    p.set_defaults(func=e2e.run)

    p = sub.add_parser("dump", help="compile a model with graph dumps and list the files written")
    p.add_argument("model", help="smollm2, a HF model directory, or a .gguf file")
    p.add_argument("--out", required=True, help="dump directory")
    p.add_argument("--bits", type=int, default=4, choices=(0, 2, 3, 4, 8), help="0 keeps weights dense")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--prompt", default="The capital of France is")
    p.set_defaults(func=cmd_dump)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"optgptq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
