"""Running Triton kernel tests in the interpreter on a CPU.

TRITON_INTERPRET=1 must be set before triton is first imported (triton.language's own helpers such as ``tl.zeros``
are ``@triton.jit`` functions, decorated for the interpreter only then), and the test session has imported it long
before a test file runs. So each ``test_triton_*.py`` collects its cases directly when the interpreter is on, and
otherwise runs itself in a fresh pytest process with TRITON_INTERPRET=1 (one test whose output names any failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def interpreter_on() -> bool:
    """True when triton.language was loaded for the interpreter (the env var was set before triton's import)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def run_in_interpreter(test_file: str, timeout: int = 600) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter run of {test_file} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
