"""benchmarks/wdot_ab.py loads another revision's dot-kernel module from a file: it must import outside the package
(its relative import rewritten) and expose the kernel the launcher calls."""

import pytest

pytest.importorskip("triton")

from benchmarks import wdot_ab  # noqa: E402
from optgptq_compile.lowering import triton_gptq_linear_kernel  # noqa: E402


def test_loads_a_kernel_module_from_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    mod = wdot_ab.load_kernel_module(triton_gptq_linear_kernel.__file__)
    assert mod is not triton_gptq_linear_kernel and callable(mod.gptq_dot_kernel)
    assert "from .triton_utils" not in open(tmp_path / "wdot_ab_old_kernel.py").read()
