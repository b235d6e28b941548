"""The benchmark scripts start as the README runs them: `.venv/bin/python benchmarks/NAME.py` from the
repository root (a script by path: its own folder on sys.path, never the root), and the kernel bench as
`python -P -m lorabus.kernels.bench`. `--help` imports everything a script needs without running it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
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


def test_generation_bench_runs_its_smallest_settings(tmp_path):
    """Every part of benchmarks/generation.py runs end to end on the tiny model and reports its figures."""
    out = tmp_path / "generation.json"
    smallest = ["--model-shape", "tiny", "--repeats", "1", "--jobs", "2", "--max-new", "2", "--tp-prompt-len", "4",
                "--prompt-len", "8", "--n-new", "2", "--per-schema", "1", "--json", str(out)]
    done = subprocess.run([sys.executable, "benchmarks/generation.py", *smallest], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["throughput"]["ratio"]) == len(report["n"]["speedup"]) == 1, report
    for mode in ("base", "adapter"):
        rows = report["validity"][mode]["formats"]
        assert len(rows) == 5 and all(row["jobs"] == 1 and row["valid"] == row["stop"] for row in rows.values()), rows


def test_cold_tiers_bench_runs_its_smallest_settings(tmp_path):
    """benchmarks/cold_tiers.py times every tier end to end (S3Proxy, the disk tier, the engine) on the tiny model:
    the store tier downloads, the store, disk and host tiers load in the engine, the slot tier loads nothing."""
    out = tmp_path / "cold_tiers.json"
    smallest = ["--model", "tiny", "--adapters", "2", "--repeats", "1", "--slots", "2", "--workdir", str(tmp_path),
                "--json", str(out)]
    done = subprocess.run([sys.executable, "benchmarks/cold_tiers.py", *smallest], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    by_tier = {tier: [s for s in report["samples"] if s["tier"] == tier] for tier in ("store", "disk", "host", "slot")}
    assert all(len(samples) == 2 for samples in by_tier.values()), report["samples"]
    assert all(0 < s["fetch_s"] < s["first_token_s"] for s in by_tier["store"]), by_tier["store"]
    assert all(s["load_s"] > 0 for tier in ("store", "disk", "host") for s in by_tier[tier]), report["samples"]
    assert all(s["load_s"] == 0 < s["first_token_s"] for s in by_tier["slot"]), by_tier["slot"]
    assert "| store |" in done.stdout and "10 Gbit/s" in done.stdout, done.stdout
    assert not list(tmp_path.glob("cold-tiers-*")), "the run's store and disk tiers were left behind"
    assert (tmp_path / "cold_tiers.png").read_bytes()[:8] == PNG_MAGIC


def test_serving_bench_draws_its_chart_and_charts_redraws_it(tmp_path):
    """benchmarks/serving.py writes a PNG beside its JSON, and benchmarks/charts.py redraws it from the JSON alone."""
    out = tmp_path / "serving.json"
    smallest = ["--model-shape", "tiny", "--adapters", "1", "2", "--jobs", "4", "--max-new", "2", "--repeats", "1",
                "--no-poisson", "--cold-samples", "1", "--systems", "lorabus", "peft-mixed", "--workdir", str(tmp_path),
                "--json", str(out)]
    done = subprocess.run([sys.executable, "benchmarks/serving.py", *smallest], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    png = tmp_path / "serving.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    png.unlink()
    done = subprocess.run([sys.executable, "-P", "benchmarks/charts.py", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == str(png), done.stderr[-2000:]
    assert png.read_bytes()[:8] == PNG_MAGIC
