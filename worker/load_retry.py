"""When a version that failed to load on this worker is tried again.

A failure is not final: the version's file may be restored to its published bytes, or a missing file
put back, with no new publish. So a failed version is tried again `first_s` after it failed, then after
twice the previous wait each time it fails again, up to `max_s`; a version that loads starts afresh.
Until a try succeeds the version stays failed here (worker/registry.py: its traffic stays where it
was). `first_s` of 0 turns tries off: a failed version then waits for a restart or a new publish.

Runs on the worker's event loop.
"""

from __future__ import annotations

import asyncio
from typing import Callable


class LoadRetries:
    def __init__(self, first_s: float, max_s: float, try_again: Callable[[str], None]):
        self.first_s, self.max_s = first_s, max(first_s, max_s)
        self._try_again = try_again
        self._waits: dict[str, float] = {}  # key → the wait before its next try
        self._due: dict[str, asyncio.TimerHandle] = {}  # key → its next try, scheduled

    def failed(self, key: str) -> None:
        """`key` failed to load: try it again later, unless a try is already scheduled."""
        if self.first_s <= 0 or key in self._due:
            return
        wait = self._waits.get(key, self.first_s)
        self._waits[key] = min(2 * wait, self.max_s)
        self._due[key] = asyncio.get_running_loop().call_later(wait, self._fire, key)

    def settled(self, key: str) -> None:
        """`key` loaded, or will not be tried again: forget its waits and its scheduled try."""
        self._waits.pop(key, None)
        due = self._due.pop(key, None)
        if due is not None:
            due.cancel()

    def _fire(self, key: str) -> None:
        del self._due[key]
        self._try_again(key)
