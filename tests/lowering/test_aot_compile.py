"""Ahead-of-time compiles of every Triton kernel variant the launchers pick, without a GPU, for the H100 and for AMD
MI200/MI300: proves the kernels are portable (no inline PTX, tl.extra.cuda only behind the CUDA-only PDL constexpr,
dot tiles >= 16, no lane-count assumptions) and fit the targets' shared memory, and reports which AMD builds use MFMA
for their dots."""

import re

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import importlib

from optgptq_compile import lowering
from tests.lowering.interpreter import interpreter_on

TARGETS = {  # target -> shared memory (LDS) a program may use
    "cuda sm90": (GPUTarget("cuda", 90, 32), 232448),  # H100: 227 KB per block
    "hip gfx90a": (GPUTarget("hip", "gfx90a", 64), 65536),  # MI200: 64 KB LDS
    "hip gfx942": (GPUTarget("hip", "gfx942", 64), 65536),  # MI300: 64 KB LDS
}
SPECS = {spec[0]: spec for name in lowering.TRITON_MODULES  # every kernel module's specs, labels unique
         for spec in importlib.import_module(f"optgptq_compile.lowering.{name}").aot_specs()} if not interpreter_on() else {}
REPORT: dict = {}


@pytest.mark.skipif(interpreter_on(), reason="TRITON_INTERPRET=1: @triton.jit made interpreter functions")
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("spec", list(SPECS) or ["none"])
def test_compiles(target, spec):
    # optional 6th element: {"attrs": ASTSource attrs (the divisibility the JIT infers from real arguments, which
    # decides vectorized / async loads and so the shared memory a pipelined build takes), "backends": the backends a
    # launcher picks this config for (e.g. an H100 tile that only CUDA uses)}
    label, fn, signature, constexprs, options, *extra = SPECS[spec]
    extra = extra[0] if extra else {}
    assert isinstance(fn, JITFunction)
    gpu, shared_limit = TARGETS[target]
    if gpu.backend not in extra.get("backends", (gpu.backend,)):
        pytest.skip(f"{label}: a {'/'.join(extra['backends'])} config")
    kernel = triton.compile(ASTSource(fn, signature, constexprs, extra.get("attrs")), target=gpu, options=options)
    asm = kernel.asm
    if gpu.backend == "cuda":
        assert asm["cubin"] and "ptx" in asm
        text = asm["ptx"]
    else:
        assert asm["hsaco"] and "amdgcn" in asm
        text = asm["amdgcn"]
    assert kernel.metadata.shared <= shared_limit, f"{label}: {kernel.metadata.shared} B of shared memory"
    # programmatic dependent launch (triton_utils.pdl): CUDA builds wait for the previous kernel (and release the
    # next one) with griddepcontrol; a ROCm build must not carry it
    if constexprs.get("PDL"):
        assert gpu.backend == "cuda", f"{label}: PDL on {target}"
        assert "griddepcontrol.wait" in text and "griddepcontrol.launch_dependents" in text, label
    elif gpu.backend == "cuda":
        assert "griddepcontrol" not in text, label
    if "dot" in label.split():  # a kernel built on tl.dot (its label says so): MFMA on AMD, mma/wgmma on the H100
        if gpu.backend == "hip":
            assert re.search(r"v_mfma", text), f"{label} on {target}: no MFMA instruction"
        else:
            assert re.search(r"mma\.sync|wgmma", text), f"{label}: no tensor-core instruction"
    REPORT[(target, label)] = dict(shared=kernel.metadata.shared, mfma=len(re.findall(r"v_mfma\w*", text)),
                                   mma=len(re.findall(r"mma\.sync|wgmma\.mma_async", text)))
    print(f"{target:11s} {label:26s} shared {kernel.metadata.shared:6d} B  MFMA {REPORT[(target, label)]['mfma']:3d}"
          f"  mma/wgmma {REPORT[(target, label)]['mma']:3d}")


FLOAT_SPECS = [label for label, spec in SPECS.items() if "fp32" in spec[2].values()]


@pytest.mark.skipif(interpreter_on(), reason="TRITON_INTERPRET=1: @triton.jit made interpreter functions")
@pytest.mark.parametrize("spec", FLOAT_SPECS or ["none"])
def test_float_scalars_typed_fp64(spec):
    """Inductor's launcher for wrap_triton kernels (torch 2.11) types a Python float argument as fp64; a kernel must
    still build (found on the H100: an fp64 scale promoted a loop-carried fp32 accumulator and failed to compile)."""
    if spec == "none":
        pytest.skip("no kernel takes a float scalar")
    label, fn, signature, constexprs, options, *extra = SPECS[spec]
    extra = extra[0] if extra else {}
    signature = {name: "fp64" if kind == "fp32" else kind for name, kind in signature.items()}
    triton.compile(ASTSource(fn, signature, constexprs, extra.get("attrs")), target=TARGETS["cuda sm90"][0],
                   options=options)
