"""The benchmark scripts start as the README runs them: `.venv/bin/python benchmarks/NAME.py` from the
repository root (a script by path: its own folder on sys.path, never the root), and the kernel bench as
`python -P -m lorabus.kernels.bench`. `--help` imports everything a script needs without running it."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path.name for path in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts_as_documented(script):
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


def test_kernel_bench_starts_as_documented():
    done = subprocess.run([sys.executable, "-P", "-m", "lorabus.kernels.bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
