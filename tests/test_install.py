"""The install the README's two commands make: nothing shadows an installed package, transformers builds
a model, and the installed versions are the lock's (constraints.txt).

The repository's top-level kernels/ has the name of Hugging Face's package `kernels`, which transformers
(5.x) imports whenever a model class loads. With the repository root on sys.path (pytest's
`pythonpath = ["."]`, `python -m` from the root, `sys.path.insert`) ours wins and every model load fails.
"""

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
FIND_KERNELS = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"


def _inside_repository(path: str | None) -> bool:
    """A module file of the checkout's own folders (an installed package under .venv/ is not one)."""
    if path is None:
        return False
    resolved = Path(path).resolve()
    return resolved.is_relative_to(ROOT) and "site-packages" not in resolved.parts


def test_repository_root_is_not_on_sys_path():
    entries = [Path(p or os.getcwd()).resolve() for p in sys.path]
    assert ROOT not in entries, f"the repository root is on sys.path: {sys.path}"


def test_hugging_face_kernels_is_not_shadowed():
    spec = importlib.util.find_spec("kernels")
    assert not _inside_repository(spec and spec.origin), (
        f"`import kernels` finds {spec.origin}, the repository's folder, not Hugging Face's package")


def test_child_pythons_started_from_the_root_are_not_shadowed():
    """Tests start `python -m lorabus.worker.cli` and `python -c` with the root as working directory."""
    found = subprocess.run([sys.executable, "-c", FIND_KERNELS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and found.stdout.strip(), found.stderr
    assert not _inside_repository(None if found.stdout.strip() == "None" else found.stdout.strip()), found.stdout
    path = subprocess.run([sys.executable, "-m", "site"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert path.returncode == 0 and f"'{ROOT}'," not in path.stdout, path.stdout


# `python -m X` and `python -c ...` put the working directory first on sys.path; -P (PYTHONSAFEPATH) does not.
UNSAFE_PYTHON = re.compile(r"\bpython3?((?:\s+-[A-Za-z]+)*)\s+-[mc]\b")
DOCUMENTED = ["README.md", "Makefile", ".ci/run", "docs/*.md", "deploy/**/*.md", "benchmarks/*.py", "kernels/bench.py"]


def test_no_documented_or_automated_command_runs_python_with_the_root_first_on_sys_path():
    unsafe = []
    for pattern in DOCUMENTED:
        for path in sorted(ROOT.glob(pattern)):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                unsafe += [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                           for m in UNSAFE_PYTHON.finditer(line) if "-P" not in m.group(1).split()]
    assert not unsafe, "run as a script by path, a console script, or with -P:\n" + "\n".join(unsafe)

def test_transformers_builds_a_tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) > 0


def test_no_test_support_module_shares_a_name_with_an_installed_package():
    """tests/ is on sys.path (pyproject.toml): none of its modules may shadow an installed top-level name."""
    installed = set(importlib.metadata.packages_distributions())
    ours = {path.stem for path in TESTS.glob("*.py")}
    assert not ours & installed, f"tests/ would shadow installed packages: {sorted(ours & installed)}"


# ---- the lock ----------------------------------------------------------------------------------------

def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_normal(name)] = version.strip()
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]]


def test_lock_pins_every_declared_dependency_within_its_bounds():
    pins = _lock()
    for requirement in _declared():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = _normal(requirement.name)
        assert name in pins, f"{requirement.name} is in pyproject.toml but not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}: run `make lock`")


@pytest.mark.lock
def test_installed_versions_are_the_locked_ones():
    """What `make install` gives; the newest-versions check (.ci/newest.py) leaves this out."""
    different = {}
    for name, version in _lock().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # pinned for another extra or platform, not needed here
        if installed != version:
            different[name] = f"{installed} installed, {version} locked"
    assert not different, f"installed versions differ from constraints.txt: {different}; run `make install`"
