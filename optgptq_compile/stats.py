"""Process-wide counters of what the backend did, behind ``optgptq_compile.stats()``."""

from __future__ import annotations

import collections
import threading

# Counters every release reports, present (as 0) even before the first compile.
CORE_COUNTERS = ("graphs_compiled", "linear_rewritten", "attention_rewritten", "fallbacks")

_lock = threading.Lock()
_counters: collections.Counter = collections.Counter()


def bump(name: str, n: int = 1) -> None:
    with _lock:
        _counters[name] += n


def stats() -> dict[str, int]:
    """A copy of the counters: at least ``graphs_compiled``, ``linear_rewritten``, ``attention_rewritten``, ``fallbacks``."""
    with _lock:
        out = {name: 0 for name in CORE_COUNTERS}
        out.update(_counters)
        return out


def reset_stats() -> None:
    with _lock:
        _counters.clear()
