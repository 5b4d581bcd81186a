"""One GPTQ matmul call per shape, for Nsight Compute: where the kernel's warps stall, its occupancy and bandwidth.

    ncu --kernel-name regex:gptq --launch-skip 2 --launch-count 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        python benchmarks/ncu_gptq.py --m 1 --shape 11008,4096

Runs the launcher's config (``pick_config``) three times (the first compiles) on random 4-bit g128 weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gptq_matmul import random_gptq  # noqa: E402

from optgptq_compile.lowering import triton_gptq_linear as T  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--shape", default="11008,4096", help="N,K")
    a = ap.parse_args()
    n, k = (int(v) for v in a.shape.split(","))
    w = random_gptq(n, k)
    x = torch.randn(a.m, k, device="cuda", dtype=torch.bfloat16)
    print("config", T.pick_config(a.m, n, k, 4, 128))
    for _ in range(3):
        T.gptq_matmul(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], None, 4, 128)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
