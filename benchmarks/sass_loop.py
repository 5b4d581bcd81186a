"""Instructions per weight in a kernel's SASS main loop, registers, spills and theoretical occupancy, without a GPU:
the CPU-side proxy for the GEMV's issue rate and latency hiding.

    python benchmarks/sass_loop.py                      # the launcher's gemv config for 11008x4096
    python benchmarks/sass_loop.py --config '{"BLOCK_N": 512, "BLOCK_K": 64, "num_warps": 2, "num_stages": 3}'
    python benchmarks/sass_loop.py --candidates         # every M=1 config the benchmark sweep times
    python benchmarks/sass_loop.py --fused              # with the RMSNorm and residual folded in

Compiles ``gptq_gemv_kernel`` ahead of time for sm_90 (with the divisibility attributes the JIT infers from real
tensors, so the build is the pipelined one), disassembles the cubin with the ``nvdisasm`` that ships with Triton,
finds the largest loop (a backward branch), and counts its instructions by opcode; ``ptxas -v`` on the PTX gives the
registers and spills. Use the Triton version the GPU runs (its ptxas allocates registers differently). At full issue
rate an H100 retires ~33 T lane-instructions/s, so an 11008x4096 GEMV (45 M weights) at the 7.8 us bandwidth floor
can afford ~5.8 instructions per weight; RESULTS.md records what each kernel version had.

Theoretical occupancy (H100): 65536 registers per SM allocated per warp in units of 256 (registers per thread
rounded up to a multiple of 8), at most 64 warps and 32 programs per SM, 228 KB of shared memory (1 KB reserved per
program); whole programs only.
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


def tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def nvdisasm() -> str:
    return tool("nvdisasm")


def compile_spec(spec):
    label, fn, signature, constexprs, options, *extra = spec
    attrs = extra[0].get("attrs") if extra else None
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def disassemble(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm(), "-c", f.name], check=True, capture_output=True, text=True).stdout


def sass(spec) -> str:
    return disassemble(compile_spec(spec))


def registers(kernel) -> dict:
    """Registers per thread and spill bytes from ``ptxas -v`` on the kernel's PTX (the cubin's own allocation)."""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        arch = "sm_90a" if ".target sm_90a" in kernel.asm["ptx"] else "sm_90"
        out = subprocess.run([tool("ptxas"), "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(d, "k.cubin")],
                             check=True, capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return dict(regs=regs, spill_bytes=spills)


def warps_per_sm(regs: int, num_warps: int, shared: int = 0) -> int:
    """Theoretical resident warps per H100 SM (see the module docstring)."""
    per_warp = 32 * -(-regs // 8) * 8
    programs = min(32, 65536 // (per_warp * num_warps), 64 // num_warps)
    if shared:
        programs = min(programs, 233472 // (shared + 1024))
    return programs * num_warps


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


def report(spec, weights_per_iteration: int, num_warps: int = 1, quiet: bool = False) -> dict:
    kernel = compile_spec(spec)
    ops = main_loop(disassemble(kernel))
    counts = collections.Counter(op.split(".")[0] for op in ops)
    per_weight = len(ops) / weights_per_iteration
    res = registers(kernel)
    shared = kernel.metadata.shared
    res.update(label=spec[0], instructions=len(ops), per_weight=per_weight, opcodes=dict(counts), shared=shared,
               warps_per_sm=warps_per_sm(res["regs"], num_warps, shared))
    if not quiet:
        print(f"{spec[0]}: {len(ops)} instructions / {weights_per_iteration} weights per thread per iteration = "
              f"{per_weight:.2f} per weight; {res['regs']} registers, {res['spill_bytes']} spill bytes, "
              f"{shared} B shared, {res['warps_per_sm']} warps/SM")
        print("   ", ", ".join(f"{op} {n}" for op, n in counts.most_common(16)))
    return res


def gemv_report(n, k, bits, group, cfg, quiet=False, fused=False) -> dict:
    spec = T.gemv_aot_spec(n, k, bits, group, cfg, fused=fused)
    threads = 32 * cfg["num_warps"]
    return report(spec, cfg["BLOCK_K"] * cfg["BLOCK_N"] // threads, cfg["num_warps"], quiet)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="JSON overrides of the gemv config (BLOCK_N, BLOCK_K, ...)")
    ap.add_argument("--candidates", action="store_true", help="every M=1 config of bench_gptq_matmul's sweep")
    ap.add_argument("--shape", default="11008,4096", help="N,K")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--fused", action="store_true", help="with the RMSNorm and residual folded in (gptq_linear_fused)")
    a = ap.parse_args()
    n, k = (int(v) for v in a.shape.split(","))
    if a.candidates:
        from bench_gptq_matmul import candidates

        print(f"{'config':100s} regs spill warps/SM instr/weight")
        for c in candidates(1):
            cfg = {key: v for key, v in c.items() if key not in ("KERNEL", "BLOCK_M")}
            r = gemv_report(n, k, a.bits, a.group, cfg, quiet=True)
            print(f"{json.dumps(cfg):100s} {r['regs']:4d} {r['spill_bytes']:5d} {r['warps_per_sm']:8d} "
                  f"{r['per_weight']:12.2f}", flush=True)
        return
    cfg = T.pick_config(1, n, k, a.bits, a.group)
    cfg.update(json.loads(a.config) if a.config else {})
    gemv_report(n, k, a.bits, a.group, cfg, fused=a.fused)


if __name__ == "__main__":
    main()
