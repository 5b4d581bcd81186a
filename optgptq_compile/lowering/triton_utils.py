"""What the Triton kernel modules share: loading kernels for the GPU or the interpreter, device checks.

Kernels live in their own modules (``triton_*_kernel.py``, nothing but ``@triton.jit`` functions) so that a test can
switch to the Triton interpreter at run time: ``@triton.jit`` picks JIT or interpreter when it decorates, and
helper functions called from a kernel must be decorated the same way as the kernel. ``kernels(name)`` returns the
imported module, or, under ``TRITON_INTERPRET=1``, a private copy of it executed with the interpreter on.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _interpreted_copy(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(f"{__package__}.{name}")
    module = importlib.util.module_from_spec(spec)
    module.__name__ = f"{__package__}.{name}__interpreted"
    sys.modules[module.__name__] = module  # dataclasses/inspect look modules up by name
    spec.loader.exec_module(module)  # TRITON_INTERPRET=1 is set: @triton.jit makes InterpretedFunctions
    return module


def kernels(name: str) -> types.ModuleType:
    """The kernel module ``lowering.<name>`` for the current mode (GPU JIT or interpreter)."""
    module = importlib.import_module(f"{__package__}.{name}")
    if interpreting():
        from triton.runtime.jit import JITFunction

        if any(isinstance(v, JITFunction) for v in vars(module).values()):  # imported before the env var was set
            return _interpreted_copy(name)
    return module


def check_device(t: torch.Tensor, op: str) -> None:
    """A clear error instead of Triton's for a CPU tensor outside the interpreter."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: the Triton kernel needs a CUDA/ROCm device (or TRITON_INTERPRET=1), got a {t.device.type} tensor; "
            "use options={'kernels': 'reference'} (or 'auto') on this machine"
        )


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 4  # the interpreter on a CPU: a few programs are enough


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.type == "cuda" and t.device.index is not None else 0


def tracing_interpreted(t: torch.Tensor) -> bool:
    """Fake/functional tracing (opcheck, aot_autograd) of an op whose kernels run in the interpreter: skip the
    launch (a JIT kernel is recorded by ``wrap_triton`` instead, but an interpreted one would run on fake data)."""
    from torch._subclasses.fake_tensor import is_fake

    return interpreting() and is_fake(t)


def pdl(t: torch.Tensor) -> bool:
    """Launch this kernel with programmatic dependent launch (PDL): on CUDA sm90+ a kernel may then start while the
    previous one on the stream finishes; ours call ``gdc_launch_dependents`` first thing (the next kernel may start)
    and ``gdc_wait`` before they touch anything an earlier kernel wrote (the gemv loads its first weight tile
    before). Only for direct launches of real tensors: not on ROCm (no such launch attribute), not in the
    interpreter, not while a graph is traced (Inductor inlining a ``wrap_triton`` kernel takes no launch options).
    ``OPTGPTQ_PDL=0`` turns it off (for measuring what it is worth). Pass ``PDL=pdl`` and ``**launch_options(pdl)``
    to the kernel."""
    from torch._subclasses.fake_tensor import is_fake

    if os.environ.get("OPTGPTQ_PDL", "1") == "0" or interpreting() or t.device.type != "cuda" or torch.version.hip:
        return False
    if is_fake(t):
        return False
    return _pdl_supported(device_index(t))


@functools.lru_cache(maxsize=None)
def _pdl_supported(index: int) -> bool:
    """sm90+ and a Triton with grid dependency control (3.4 on; torch 2.11 ships 3.6)."""
    import triton.language as tl

    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def launch_options(pdl: bool) -> dict:
    """Triton's launch option for PDL (a compile option of the kernel in Triton 3.6, read by its CUDA launcher)."""
    return {"launch_pdl": True} if pdl else {}


def per_backend(spec: tuple) -> list[tuple]:
    """An ahead-of-time compile spec (label, kernel, signature, constexprs, options[, extra]) of a kernel with a PDL
    constexpr, as each backend's launcher builds it: with PDL for CUDA (sm90), without for ROCm."""
    label, fn, sig, const, opts, *extra = spec
    extra = extra[0] if extra else {}
    return [(f"{label} {backend}", fn, {**sig, "PDL": "constexpr"}, {**const, "PDL": backend == "cuda"}, opts,
             {**extra, "backends": (backend,)}) for backend in ("cuda", "hip")]
