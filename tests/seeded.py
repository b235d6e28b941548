"""What the kernel tests share: one seed per session (LORABUS_TEST_SEED=<seed> replays a run), a random
stream per test drawn from it, and a table of the largest error seen per (op, dtype, backend), printed
with the seed at the end of the session."""

from __future__ import annotations

import os
import time
import zlib
from collections import defaultdict

import torch

SEED = int(os.environ.get("LORABUS_TEST_SEED", time.time_ns() % 2**31))


def generator_for(request) -> torch.Generator:
    """A stream of its own per test, so one test reproduces alone under the same seed."""
    return torch.Generator().manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))


def ri(g: torch.Generator, lo: int, hi: int) -> int:
    """Random int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


class ErrorTable:
    """Largest error per (op, dtype, backend); a pytest plugin once `register`ed, printing it at the end."""

    def __init__(self, title: str, per_dtype: bool = False):
        self.title, self.per_dtype = title, per_dtype
        self.errors: dict[tuple, float] = defaultdict(float)

    def record(self, op: str, dtype: torch.dtype, backend: str, err: float) -> None:
        key = (op, dtype, backend)
        self.errors[key] = max(self.errors[key], err)

    def register(self, config) -> None:
        if not config.pluginmanager.is_registered(self):
            config.pluginmanager.register(self)

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("-", f"{self.title}: LORABUS_TEST_SEED={SEED}; largest relative error seen")
        per_dtype: dict[torch.dtype, float] = defaultdict(float)
        for (op, dtype, backend), err in sorted(self.errors.items(), key=str):
            terminalreporter.write_line(f"  {op:8s} {str(dtype):15s} {backend:7s} {err:.3e}")
            per_dtype[dtype] = max(per_dtype[dtype], err)
        if self.per_dtype:
            terminalreporter.write_line("  max per dtype: " + ", ".join(f"{d}={e:.2e}" for d, e in per_dtype.items()))
