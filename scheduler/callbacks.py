"""Calls from the engine's threads into caller code: a job's answer (`on_done`) and the metrics hooks.

Caller code may raise; that is logged and goes no further, so no callback can take an engine thread down.
"""

from __future__ import annotations

import logging
from typing import Callable

from lorabus.scheduler.requests import Completion

log = logging.getLogger(__name__)


def deliver(on_done: Callable[[Completion], None], completion: Completion) -> None:
    try:
        on_done(completion)
    except Exception:
        log.exception("on_done for %s failed", completion.id)


def call_hook(hook: Callable | None, *args) -> None:
    """Metrics hooks are observers: their failure is logged, never the jobs' problem."""
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("engine hook %s failed", getattr(hook, "__name__", hook))
