"""End-to-end decode benchmark (issue 7): a Llama-2-7B-shaped random-weight model through HF eager fp16, HF static
cache + Inductor, an int4 tinygemm + Inductor baseline (what torchao / gpt-fast run) and optgptq (int4 g128,
Triton kernels, paged-KV runtime): decode tok/s, time to first token, peak GPU memory and KV bytes per batch size.

    PYTHONPATH=. python benchmarks/e2e.py                  # GPU: 32 layers, batches 1,32,8,64, 512-token prompts
    python benchmarks/e2e.py --layers 4                    # quick check of the whole script
    python benchmarks/e2e.py --tiny                        # CPU smoke test (tiny model, reference kernels, < 1 min)
    python benchmarks/e2e.py --plot-only run1/e2e.json run2/e2e.json   # table + plots from saved runs (merged)

Writes e2e.json, e2e.md and e2e_*.png to --out (default $OUT, else this directory). The benchmark itself lives in
the package (``optgptq_compile/bench/e2e.py``) so that ``optgptq bench e2e`` runs it from an installed copy too;
its docstring defines every metric (``--help`` prints it).
"""

import os
import sys

from optgptq_compile.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main(default_out=os.path.dirname(os.path.abspath(__file__))))
