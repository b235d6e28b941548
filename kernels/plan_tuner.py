"""Choose among exact ways to run an op by timing them on the machine at hand, like Triton's autotuner.

A caller names a decision by a group (which op, e.g. a projection group) and a shape class (a coarse key
of the step's shapes) and hands `choose` the candidates, each a callable that runs the op on the step's
real inputs into scratch outputs. The first time a (group, shape) is seen every candidate runs once to
warm up, then `repeats` rounds run the candidates in turn; the fastest (minimum time) is kept and
returned for that key from then on. Choices persist in a JSON file whose path and identity (machine,
library versions, shapes) the caller passes in: a restart on the same machine and shapes times nothing,
and a file that cannot be read or was written for another identity is ignored (and replaced on the next
save), never fatal. A caller whose choice rests on several measurements (a step timed in parts) runs
`measure` itself and `record`s the derived times.

Modes: "startup" and "first-use" time what is missing when it is first asked for ("startup" only tells
the caller to tune its representative classes up front as well); "off" times nothing and returns the
first candidate, the caller's untuned default, unless a cached choice exists.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

MODES = ("startup", "first-use", "off")
FORMAT = "lorabus-plans/1"
# A candidate this many times slower than the best after a warm-up and one timed round is not timed further.
SLOW_FACTOR = 4.0


@dataclass(frozen=True)
class Choice:
    plan: str  # the fastest of every candidate measured for the key
    times_us: dict[str, float]  # each candidate's best time (µs) when it was measured
    source: str  # "measured" (this run) or "cache" (read from the file)


class PlanTuner:
    def __init__(self, mode: str = "first-use", path: str | None = None, identity: dict | None = None,
                 repeats: int = 5, sync: Callable[[], None] | None = None,
                 on_choice: Callable[[str, str, Choice], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"plan tuning mode must be one of {MODES}, got {mode!r}")
        self.mode, self.path, self.identity, self.repeats = mode, path, identity or {}, max(1, repeats)
        self.sync = sync or (lambda: None)  # the device's synchronize where kernels run asynchronously
        self.on_choice = on_choice
        self._choices: dict[tuple[str, str], Choice] = {}
        self.measured_s = 0.0  # time spent timing candidates
        if path is not None:
            self._load(path)

    def choose(self, group: str, shape: str, candidates: dict[str, Callable[[], None]]) -> str:
        """The fastest of `candidates` (name -> run) for (group, shape). Candidates without a time for the key
        yet are measured (steps of one class may offer different candidates: the key keeps every time seen);
        in mode "off", or with a single candidate, nothing is timed and the first one without a time loses to
        any with one."""
        names = list(candidates)
        known = self._choices.get((group, shape))
        times = dict(known.times_us) if known is not None else {}
        missing = [name for name in names if name not in times]
        if missing and len(names) > 1 and self.mode != "off":
            measured = self.measure({name: candidates[name] for name in missing})
            self.record(group, shape, {**times, **{name: seconds * 1e6 for name, seconds in measured.items()}})
            times = self.times(group, shape)
        return min((name for name in names if name in times), key=times.get, default=names[0])

    def record(self, group: str, shape: str, times_us: dict[str, float]) -> None:
        """Keep (and save) the choice for (group, shape) from times the caller derived from `measure`d ones
        (e.g. a whole step's from its parts')."""
        times = {name: round(t, 1) for name, t in times_us.items()}
        self._keep(group, shape, Choice(min(times, key=times.get), times, "measured"))
        self.save()

    def times(self, group: str, shape: str) -> dict[str, float]:
        """Each candidate's best time (µs) known for (group, shape): measured or read from the file."""
        known = self._choices.get((group, shape))
        return dict(known.times_us) if known is not None else {}

    def table(self, limit: int | None = None) -> list[dict]:
        """Every choice known (at most `limit`, taken from each group in turn: a cache file can hold hundreds of
        one group's shapes, which must not crowd out the others): group, shape, plan, source and the
        candidates' times (µs), sorted."""
        choices = dict(self._choices)  # one C-level copy: safe against the step thread adding a choice meanwhile
        keys = sorted(choices)
        if limit is not None and len(keys) > limit:
            by_group: dict[str, list[tuple[str, str]]] = {}
            for key in keys:
                by_group.setdefault(key[0], []).append(key)
            turns = [group[rank] for rank in range(max(map(len, by_group.values())))
                     for group in by_group.values() if rank < len(group)]
            keys = sorted(turns[:limit])
        return [dict(group=g, shape=s, plan=choices[g, s].plan, source=choices[g, s].source,
                     times_us=dict(choices[g, s].times_us)) for g, s in keys]

    def save(self) -> None:
        """Write the choices to the file (atomically); a failure is logged, not raised."""
        if self.path is None:
            return
        data = dict(format=FORMAT, identity=self.identity,
                    plans=[dict(group=g, shape=s, plan=c.plan, times_us=c.times_us)
                           for (g, s), c in sorted(self._choices.items())])
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path) or ".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("plan cache %s not written: %s", self.path, exc)

    def measure(self, runs: dict[str, Callable[[], None]]) -> dict[str, float]:
        """Each run's fastest time (s): a warm-up each (it counts), then `repeats` rounds over them in turn, so
        a stall of the machine hits every candidate of a round rather than all repeats of one. After the first
        round, a run whose best is over SLOW_FACTOR times the best of all is not timed further: such a plan
        cannot win, and timing it again costs."""
        started = time.perf_counter()
        best = {name: self._once(run) for name, run in runs.items()}  # first touches, lazily built caches
        for round_ in range(self.repeats):
            floor = min(best.values())
            for name, run in runs.items():
                if round_ == 0 or best[name] <= SLOW_FACTOR * floor:
                    best[name] = min(best[name], self._once(run))
        self.measured_s += time.perf_counter() - started
        return best

    def _once(self, run: Callable[[], None]) -> float:
        self.sync()
        t0 = time.perf_counter()
        run()
        self.sync()
        return time.perf_counter() - t0

    def _keep(self, group: str, shape: str, choice: Choice) -> None:
        self._choices[(group, shape)] = choice
        times = ", ".join(f"{n} {t:.0f}" for n, t in sorted(choice.times_us.items(), key=lambda kv: kv[1]))
        log.info("plan: group=%s shape=%s plan=%s (%s; µs: %s)", group, shape, choice.plan, choice.source,
                 times or "-")
        if self.on_choice is not None:
            self.on_choice(group, shape, choice)

    def _load(self, path: str) -> None:
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("identity") != self.identity:
                raise ValueError("written for another machine, version or shapes")
            entries = [(str(e["group"]), str(e["shape"]), str(e["plan"]),
                        {str(n): float(t) for n, t in e["times_us"].items()}) for e in data["plans"]]
            if not all(times and all(0 < t < math.inf for t in times.values()) for *_, times in entries):
                raise ValueError("a time that is not a positive finite number")  # callers divide by them
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("plan cache %s ignored: %s", path, exc)
            return
        for group, shape, plan, times in entries:
            self._keep(group, shape, Choice(plan, times, "cache"))
