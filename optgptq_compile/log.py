"""The project's logger, registered with torch._logging so ``TORCH_LOGS="optgptq"`` turns it on."""

from __future__ import annotations

import logging

LOGGER_NAME = "optgptq_compile"

try:  # private API, stable since torch 2.1; without it the plain logging module still works
    from torch._logging._internal import register_log

    register_log("optgptq", LOGGER_NAME)
except Exception:  # pragma: no cover - depends on the torch build
    pass

log = logging.getLogger(LOGGER_NAME)
