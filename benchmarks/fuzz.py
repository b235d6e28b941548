"""Fuzzing at scale: the hypothesis generators of tests/fuzz_strategies.py, thousands of hostile job and
control records interleaved with good greedy jobs, one worker, the same invariants as
tests/test_fuzz_kafka.py, and a summary table for the docs.

    .venv/bin/python benchmarks/fuzz.py [--jobs 3000] [--control 500] [--good 200] [--huge 40] [--seed N]
                              [--bootstrap HOST:PORT] [--no-restart] [--json out.json]

The broker is --bootstrap, else $KAFKA_BOOTSTRAP_SERVERS, else a private one started with
deploy/local-kafka (and stopped at the end). The tiny model and three PEFT adapters (the test suite's)
are built in a temporary directory; PEFT is the oracle for every greedy ok result. Without --seed the
draw is derandomized (the same records every run); --seed N draws another batch. Prints the table,
then the first invariant violations; exits 1 if there are any.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (as tests/conftest.py does)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The tests' support modules, as pytest reaches them (pyproject.toml: pythonpath = ["tests"]); never the
# repository root, whose kernels/ would shadow Hugging Face's `kernels` package.
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_harness import run_fuzz, summary  # noqa: E402
from helpers import PeftOracle, broker_at, make_peft_adapter  # noqa: E402
from lorabus.worker.testing import build_tiny_model  # noqa: E402

ADAPTERS = {  # the test suite's three adapters (tests/conftest.py, peft_adapters)
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r8-rslora": dict(r=8, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp-r16-patterns": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj", "o_proj"],
                             rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 64}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="fuzzed jobs-topic records")
    parser.add_argument("--control", type=int, default=500, help="fuzzed control-topic records")
    parser.add_argument("--good", type=int, default=200, help="good greedy jobs interleaved")
    parser.add_argument("--control-log", type=int, default=0,
                        help="adapter names published before the worker starts (it starts on a log of this size)")
    parser.add_argument("--huge", type=int, default=40, help="at most this many records of several hundred KB")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: derandomized)")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""))
    parser.add_argument("--no-restart", action="store_true", help="skip the restarted-worker phase")
    parser.add_argument("--settle", type=float, default=900, help="seconds to wait for every record to be accounted for")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lorabus-fuzz-") as tmp:
        tmp = Path(tmp)
        with broker_at(args.bootstrap, tmp / "kafka") as bootstrap:
            model = build_tiny_model(tmp / "model")
            adapters = {name: make_peft_adapter(model, tmp / "adapters" / name, seed=i, **spec)
                        for i, (name, spec) in enumerate(ADAPTERS.items())}
            oracle = PeftOracle(model)
            report = asyncio.run(run_fuzz(bootstrap, model, adapters, tmp / "work", jobs=args.jobs, control=args.control,
                                          good=args.good, huge_cap=args.huge, seed=args.seed,
                                          restart=not args.no_restart, settle_s=args.settle, oracle=oracle,
                                          control_log=args.control_log))

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nlorabus fuzz, {when}, {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"seed {args.seed if args.seed is not None else 'derandomized'}\n")
    print("| figure | value |\n|---|---:|")
    print(summary(report))
    for problem in report.problems[:40]:
        print("VIOLATION", problem)
    if args.json:
        bad_jobs, bad_control = report.distinct_bad()
        Path(args.json).write_text(json.dumps({
            "when": when, "seed": args.seed, "jobs": len(report.jobs), "control": len(report.control),
            "good": len(report.good), "distinct_bad_jobs": bad_jobs, "distinct_bad_control": bad_control,
            "dead_letters": len(report.letters), "lag": report.lag, "restart": report.restart,
            "seconds": report.seconds, "violations": report.problems,
        }, indent=2, default=str))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
