"""The GPU benchmark in one go: kernels, the decode step's breakdown, and serving at 1/64/512 adapters.

    .venv/bin/python benchmarks/gpu.py [--out DIR] [--device cuda] [--quick] [--budget-s 540]

Runs, one subprocess each (a part that fails or runs out of time does not stop the others), writing
each part's markdown and JSON under --out as soon as it ends, then `summary.md` with all of them:

1. kernels: `.venv/bin/python -P -m lorabus.kernels.bench` (LoRA shrink/expand and the paged-attention decode kernel,
   every backend, against the memory roofline);
2. step: `benchmarks/step.py --device cuda` three times over the small shape, batch 64: the engine as
   configured by default on CUDA (triton attention, CUDA graphs: totals only), without CUDA graphs
   (the phase breakdown), and with the torch attention (block-table gather + SDPA) for comparison;
3. serving: `benchmarks/serving.py --device cuda` on the small shape at N = 1, 64 and 512 adapters,
   saturated, lorabus against per-adapter switching and PEFT mixed batches (baselines up to N = 64:
   PEFT's adapter loading is quadratic in N).

--quick with --device cpu runs the same parts at toy sizes (tiny model, a few sequences, one repeat,
the paged-attention kernel's CPU correctness smoke) in a couple of minutes: the check that the script
runs, not a measurement. --budget-s bounds the whole run (each part gets its share; a part that
overruns is stopped and reported as such). --out defaults to $OUT (the folder a device run brings back)
when set. On a machine where lorabus is not installed, the parts import it from this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> list[str]:
    """A benchmark script run by path: its own folder goes on sys.path, not the repository root."""
    return [sys.executable, str(ROOT / "benchmarks" / f"{name}.py")]


def parts(device: str, quick: bool, out: Path, workdir: str) -> list[tuple[str, list[str], float]]:
    """(name, command, share of the time budget) of each part."""
    # -P: the parts run from the repository root, which must not come first on sys.path (see README).
    bench = [sys.executable, "-P", "-m", "lorabus.kernels.bench"]
    if quick:
        kernels = [*bench, "--quick", "--op", "paged_attention_decode"]
        step = ["--model-shape", "tiny", "--batch", "4", "--prompt-len", "8", "--repeats", "1", "--steps", "1",
                "--prefill-prompts", "4", "--prefill-len", "6"]
        serving = ["--model-shape", "tiny", "--adapters", "1", "2", "--jobs", "4", "--repeats", "1",
                   "--prompt-len", "8", "--max-new", "4", "--max-batch", "4", "--systems", "lorabus", "peft-mixed",
                   "--cold-samples", "1"]
    else:
        kernels = [*bench, "--quick"]
        step = ["--model-shape", "small", "--batch", "64", "--prompt-len", "128", "--repeats", "3", "--steps", "4"]
        serving = ["--model-shape", "small", "--adapters", "1", "64", "512", "--repeats", "3",
                   "--systems", "lorabus", "per-adapter", "peft-mixed", "--baseline-max-adapters", "64",
                   "--cold-samples", "5"]
    step_cmd = [*_script("step"), "--device", device, "--workdir", workdir, *step]
    return [
        ("kernels", [*kernels, "--json", str(out / "kernels.json")], 0.2),
        ("step-default", [*step_cmd, "--json", str(out / "step-default.json")], 0.2),
        ("step-no-graphs", [*step_cmd, "--no-cuda-graphs", "--no-prefill", "--json", str(out / "step-no-graphs.json")],
         0.15),
        ("step-torch-attention", [*step_cmd, "--no-cuda-graphs", "--no-prefill", "--attention-backend", "torch",
                                  "--json", str(out / "step-torch-attention.json")], 0.15),
        ("serving", [*_script("serving"), "--device", device, "--no-poisson", "--workdir", workdir, *serving,
                     "--json", str(out / "serving.json")], 0.3),
    ]


def checkout_path() -> str | None:
    """A PYTHONPATH entry that makes `lorabus.*` importable from this checkout, when it is not installed:
    a temporary `lorabus/` folder linking the checkout's package folders (as pyproject.toml maps them)."""
    probe = subprocess.run([sys.executable, "-P", "-c", "import lorabus.scheduler"], capture_output=True)
    if probe.returncode == 0:
        return None
    shim = Path(tempfile.mkdtemp(prefix="lorabus-path-")) / "lorabus"
    shim.mkdir()
    for package in ("schemas", "kernels", "scheduler", "worker"):
        (shim / package).symlink_to(ROOT / package)
    return str(shim.parent)


def run_part(name: str, cmd: list[str], timeout_s: float, out: Path, env: dict) -> dict:
    """Run one part; its stdout (the markdown tables) goes to <name>.md, its stderr to <name>.log."""
    started = time.monotonic()
    print(f"[{name}] {' '.join(cmd[1:])} (at most {timeout_s:.0f}s)", file=sys.stderr, flush=True)
    with open(out / f"{name}.md", "w") as md, open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=md, stderr=log, timeout=timeout_s).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"stopped after {timeout_s:.0f}s"
    seconds = time.monotonic() - started
    print(f"[{name}] {status} in {seconds:.0f}s", file=sys.stderr, flush=True)
    return {"part": name, "status": status, "seconds": round(seconds, 1), "command": " ".join(cmd[1:])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="toy sizes: checks that every part runs (minutes on CPU)")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/lorabus-bench-gpu/out",
                   help="directory for each part's markdown, JSON and log (default: $OUT when set)")
    p.add_argument("--budget-s", type=float, default=540, help="time for the whole run, shared among the parts")
    p.add_argument("--workdir", default="/tmp/lorabus-bench-gpu", help="where the models and adapters are built")
    p.add_argument("--only", nargs="+", help="run only these parts")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [checkout_path(), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    if args.device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels' CPU smoke runs interpreted
        env.setdefault("OMP_NUM_THREADS", "1")
    results = []
    for name, cmd, share in parts(args.device, args.quick, out, args.workdir):
        if args.only and name not in args.only:
            continue
        results.append(run_part(name, cmd, share * args.budget_s, out, env))
    summary = ["# lorabus GPU benchmark" + (" (quick smoke)" if args.quick else ""), "",
               "| part | status | seconds | command |", "|---|---|---:|---|"]
    summary += [f"| {r['part']} | {r['status']} | {r['seconds']} | `{r['command']}` |" for r in results]
    for r in results:
        summary += ["", f"## {r['part']}", "", (out / f"{r['part']}.md").read_text().strip() or "(no output)"]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print("\n".join(summary))
    sys.exit(0 if all(r["status"] == "ok" for r in results) else 1)


if __name__ == "__main__":
    main()
