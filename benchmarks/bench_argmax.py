"""Greedy decoding's argmax (``lowering/triton_argmax``) against ``torch.argmax`` on a decode step's logits.

    PYTHONPATH=. python benchmarks/bench_argmax.py [--vocab 32000,49152,250880] [--batches 1,8,64] [--out DIR]

Checks the kernel's tokens against torch.argmax (equal) on random fp16 logits, then times both per call
(``timing.time_graph``: a CUDA graph of back-to-back calls, as a captured decode step launches them) beside the
bandwidth floor (the logits' bytes at 3.0 TB/s; the logits were just written by the lm_head, so they come from L2
in a real step). Writes ``bench_argmax.json`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import time_graph  # noqa: E402

from optgptq_compile.lowering.triton_argmax import argmax_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", default="32000,49152,250880", help="vocabulary sizes (Llama-2, SmolLM2, BLOOM)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    rows = []
    for v in map(int, a.vocab.split(",")):
        for b in map(int, a.batches.split(",")):
            g = torch.Generator().manual_seed(v + b)
            copies = [(torch.randn(b, v, generator=g) * 4).half().cuda() for _ in range(4)]
            same = all(torch.equal(argmax_rows(x), torch.argmax(x, -1)) for x in copies)
            ours = time_graph([lambda x=x: argmax_rows(x) for x in copies])
            aten = time_graph([lambda x=x: torch.argmax(x, -1) for x in copies])
            floor = b * v * 2 / 3.0e12 * 1e6
            rows.append(dict(vocab=v, batch=b, ours_us=ours, torch_us=aten, floor_us=floor, equal=same))
            print(f"vocab {v:6d} batch {b:3d}: ours {ours:6.1f} us, torch.argmax {aten:6.1f} us "
                  f"({aten / ours:.2f}x), floor {floor:5.2f} us, tokens {'equal' if same else 'DIFFER'}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_argmax.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    if not all(r["equal"] for r in rows):
        sys.exit("the kernel's tokens differ from torch.argmax")


if __name__ == "__main__":
    main()
