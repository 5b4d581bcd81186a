"""Instructions per weight in a kernel's SASS main loop, without a GPU: the CPU-side proxy for the GEMV's issue rate.

    python benchmarks/sass_loop.py                      # the launcher's gemv configs for the 7B shapes
    python benchmarks/sass_loop.py --config '{"BLOCK_N": 512, "BLOCK_K": 64, "num_warps": 2, "num_stages": 3}'

Compiles ``gptq_gemv_kernel`` ahead of time for sm_90 (with the divisibility attributes the JIT infers from real
tensors, so the build is the pipelined one), disassembles the cubin with the ``nvdisasm`` that ships with Triton,
finds the largest loop (a backward branch), and counts its instructions by opcode. At full issue rate an H100
retires ~33 T lane-instructions/s, so an 11008x4096 GEMV (45 M weights) at the 7.8 us bandwidth floor can afford
~5.8 instructions per weight; RESULTS.md records what each kernel version had.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from optgptq_compile.lowering import triton_gptq_linear as T  # noqa: E402


def nvdisasm() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def sass(spec) -> str:
    label, fn, signature, constexprs, options, *extra = spec
    attrs = extra[0].get("attrs") if extra else None
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm(), "-c", f.name], check=True, capture_output=True, text=True).stdout


def loops(text: str) -> list[list[str]]:
    """Opcodes of every loop body (a label up to the last backward branch to it), largest first."""
    labels, instrs = {}, []  # label -> index of its first instruction; (opcode, branch target)
    for line in text.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
        if m:
            target = re.search(r"`\(\.(L_x_\d+)\)", m.group(3))
            instrs.append((m.group(2), target.group(1) if target else None))
    spans = {}
    for end, (op, target) in enumerate(instrs):
        if op.startswith("BRA") and target in labels and labels[target] <= end:
            spans[target] = (labels[target], end)
    return sorted(([op for op, _ in instrs[a:b + 1]] for a, b in spans.values()), key=len, reverse=True)


def main_loop(text: str) -> list[str]:
    """The software-pipelined K loop: the largest loop that issues asynchronous copies (LDGSTS), so the kernel's
    slow per-row-group fallback loop (not pipelined) is not the one counted."""
    found = loops(text)
    return next((ops for ops in found if any(op.startswith("LDGSTS") for op in ops)), found[0])


def report(spec, weights_per_iteration: int) -> dict:
    ops = main_loop(sass(spec))
    counts = collections.Counter(op.split(".")[0] for op in ops)
    per_weight = len(ops) / weights_per_iteration
    print(f"{spec[0]}: {len(ops)} instructions / {weights_per_iteration} weights per thread per iteration = "
          f"{per_weight:.2f} per weight")
    print("   ", ", ".join(f"{op} {n}" for op, n in counts.most_common(16)))
    return dict(label=spec[0], instructions=len(ops), per_weight=per_weight, opcodes=dict(counts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="JSON overrides of the gemv config (BLOCK_N, BLOCK_K, ...)")
    ap.add_argument("--shape", default="11008,4096", help="N,K")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    a = ap.parse_args()
    n, k = (int(v) for v in a.shape.split(","))
    cfg = T.pick_config(1, n, k, a.bits, a.group)
    cfg.update(json.loads(a.config) if a.config else {})
    spec = T.gemv_aot_spec(n, k, a.bits, a.group, cfg)
    threads = 32 * cfg["num_warps"]
    report(spec, cfg["BLOCK_K"] * cfg["BLOCK_N"] // threads)


if __name__ == "__main__":
    main()
