"""Compile with graph dumps and walk through what the backend wrote.

    python examples/debug_dump.py --out dumps/          # a tiny random-init Llama, one forward
    python examples/debug_dump.py --model smollm2 --out dumps/

Per compiled graph, ``dumps/graph_NNN/`` holds:
  00_captured.py          the FX graph Dynamo handed to the backend, as readable Python
  NN_after_<pass>.py      the graph after each pass that changed it (match_attention, quantize_linear, ...)
  NN_final.py             the graph that runs (after kernel selection)
  report.txt              every candidate each pass looked at: REWROTE, or LEFT with the reason
  final.raw.mlir / final.linalg.mlir   the final graph as MLIR (torch-mlir installed), or final.mlir.txt saying
                          how to install it
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import optgptq_compile
from optgptq_compile.data import load_pretrained


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="dumps", help="dump directory")
    p.add_argument("--model", default=None, help="smollm2, a HF model dir or a .gguf file; default: tiny Llama")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    args = p.parse_args(argv)
    if args.model:
        model, _ = load_pretrained(args.model)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    compiled = torch.compile(model, backend="optgptq", options={"bits": args.bits, "group_size": 32,
                                                                 "dump_dir": args.out})
    with torch.no_grad():
        compiled(torch.randint(3, 200, (1, 8)))
    files = {}
    for graph in sorted(os.listdir(args.out)):
        files[graph] = sorted(os.listdir(os.path.join(args.out, graph)))
        print(f"{graph}/")
        for name in files[graph]:
            print(f"  {name}")
        report = open(os.path.join(args.out, graph, "report.txt")).read().splitlines()
        print("\nreport.txt (first lines):\n  " + "\n  ".join(report[:12]))
    print("\ncounters:", optgptq_compile.stats())
    return files


if __name__ == "__main__":
    main()
