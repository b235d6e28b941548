"""Worker start-up on a large control log: time to ready and memory against the log's size (issue 20, R1).

    .venv/bin/python benchmarks/startup.py [--sizes 1000,10000,50000] [--shapes names,versions]
                                           [--json out.json] [--svg docs/benchmarks-startup.svg]
                                           [--baseline before.json] [--tree DIR] [--ready-timeout 300]
                                           [--job-timeout 60]

For each shape and size, a fresh control topic gets that many `adapter.publish` events, all pointing at
one small adapter directory (built with lorabus.worker.testing):

* names:    N names of one version each: every name's version serves, so N warm-ups follow start-up;
* versions: N versions of one name: one serves (the first published), the rest are history.

A `lorabus worker` process then starts on it (own group and topics, the tiny model) and the script
measures: seconds from spawn to `/readyz` 200; the process's RSS then (VmRSS) and its peak so far
(VmHWM); the latency of three rounds of two jobs sent once it is ready (one by name for the last name
published, one for the base model), which says whether ready meant "serves"; whether `/readyz` still
says 200 after them; and how long SIGTERM then takes. An empty log (size 0) gives the fixed cost: the
model load and the Kafka clients. Uses KAFKA_BOOTSTRAP_SERVERS, or starts deploy/local-kafka.

--tree DIR runs the worker from another copy of this repository instead (e.g. the code before a change:
`git archive HEAD | tar -x -C DIR`), by pointing the editable install's lorabus.* packages there in the
worker process only. --baseline before.json draws such a run's figures next to this one's (dashed) in
the SVG and adds them to the table. No plotting library: the SVG is written by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' support modules (never the repository root)

from helpers import broker_at, publish_control_bulk  # noqa: E402

from lorabus.schemas import AdapterPublish  # noqa: E402
from lorabus.worker.client import run_jobs  # noqa: E402
from lorabus.worker.config import WorkerConfig  # noqa: E402
from lorabus.worker.testing import build_sample_adapter, build_tiny_model  # noqa: E402
from lorabus.worker.topics import ensure_worker_topics  # noqa: E402

SHAPES = ("names", "versions")
JOB_ROUNDS = 3
POLL_S = 0.1
STOP_TIMEOUT_S = 60
# The worker process: lorabus.* from another tree when one is given (argv[1]), then the CLI's main.
LAUNCH = """
import sys
tree = sys.argv[1]
if tree:
    import __editable___lorabus_0_1_0_finder as finder
    for package, path in list(finder.MAPPING.items()):
        finder.MAPPING[package] = tree + "/" + path.rstrip("/").rsplit("/", 1)[1]
from lorabus.worker.cli import main
sys.exit(main(["worker"]))
"""


def _events(shape: str, size: int, adapter: Path) -> list[AdapterPublish]:
    if shape == "names":
        return [AdapterPublish(f"a{i}", "v1", str(adapter)) for i in range(size)]
    return [AdapterPublish("fin", f"v{i}", str(adapter)) for i in range(size)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except (OSError, ValueError):
        return 0, {}


def _memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def _job(job_id: str, adapter: str | None) -> tuple[str, bytes]:
    body = {"id": job_id, "tenant": "bench", "prompt_ids": [4, 5, 6], "max_new_tokens": 2}
    if adapter is not None:
        body["adapter"] = adapter
    return job_id, json.dumps(body).encode()


async def one_run(bootstrap: str, model: Path, adapter: Path, shape: str, size: int, tree: str, work: Path,
                  ready_timeout_s: float, job_timeout_s: float) -> dict:
    tag = uuid.uuid4().hex[:8]
    config = WorkerConfig(bootstrap_servers=bootstrap, model=str(model), group_id=f"startup-{tag}",
                          jobs_topic=f"jobs-{tag}", results_topic=f"results-{tag}", control_topic=f"control-{tag}",
                          dlq_topic=f"dlq-{tag}", status_topic=f"status-{tag}")
    await ensure_worker_topics(config)
    events = _events(shape, size, adapter)
    published = time.monotonic()
    await publish_control_bulk(bootstrap, config.control_topic, events)
    publish_s = time.monotonic() - published
    port = _free_port()
    env = {**os.environ, "PYTHONSAFEPATH": "1", "LORABUS_BOOTSTRAP_SERVERS": bootstrap, "LORABUS_MODEL": str(model),
           "LORABUS_GROUP_ID": config.group_id, "LORABUS_JOBS_TOPIC": config.jobs_topic,
           "LORABUS_RESULTS_TOPIC": config.results_topic, "LORABUS_CONTROL_TOPIC": config.control_topic,
           "LORABUS_DLQ_TOPIC": config.dlq_topic, "LORABUS_STATUS_TOPIC": config.status_topic,
           "LORABUS_METRICS_PORT": str(port), "LORABUS_KV_CACHE_MB": "64"}
    log_path = work / f"worker-{shape}-{size}-{tag}.log"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-P", "-c", LAUNCH, tree], env=env, cwd=work,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    run = {"shape": shape, "events": size, "publish_s": round(publish_s, 2), "ready_s": None}
    try:
        page: dict = {}
        while time.monotonic() - started < ready_timeout_s and proc.poll() is None:
            status, page = await asyncio.to_thread(_readyz, port)
            if status == 200:
                run["ready_s"] = round(time.monotonic() - started, 2)
                break
            await asyncio.sleep(POLL_S)
        if run["ready_s"] is None:  # what kept it from ready, as the page said last
            run["failing"] = {name: c["detail"] for name, c in page.get("checks", {}).items() if not c["ok"]}
        if proc.poll() is not None:
            run["exit"] = proc.returncode
            run["log_tail"] = log_path.read_text(errors="replace")[-1500:]
            return run
        memory = _memory_mb(proc.pid)
        run["rss_mb"], run["peak_rss_mb"] = round(memory["VmRSS"], 1), round(memory["VmHWM"], 1)
        if run["ready_s"] is None:
            return run
        last_name = events[-1].name if events else None
        rounds = []
        for i in range(JOB_ROUNDS):
            jobs = [_job(f"{tag}-{i}-base", None)] + ([_job(f"{tag}-{i}-name", last_name)] if last_name else [])
            sent = time.monotonic()
            try:
                results = await run_jobs(bootstrap, config.jobs_topic, config.results_topic, jobs, job_timeout_s)
            except TimeoutError:
                rounds.append(None)
                break
            rounds.append(round(time.monotonic() - sent, 3))
            bad = {job_id: r.status for job_id, (r, *_) in results.items() if r.status != "ok"}
            if bad:
                run["job_errors"] = bad
        run["job_round_s"] = rounds
        run["still_ready"] = (await asyncio.to_thread(_readyz, port))[0] == 200
    finally:
        if proc.poll() is None:
            stopping = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
                run["sigterm_s"] = round(time.monotonic() - stopping, 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                run["sigterm_s"] = None
    return run


# ---- the plot: an SVG by hand ------------------------------------------------------------------------

WIDTH, HEIGHT, MARGIN = 440, 300, 56
COLOURS = {"names": "#1f77b4", "versions": "#d62728"}


def _panel(x0: int, title: str, ylabel: str, series: list[tuple[str, bool, list[tuple[int, float]]]],
           goal: float | None) -> list[str]:
    points = [p for _, _, pts in series for p in pts if p[0] > 0]
    xs = [p[0] for p in points] or [1, 10]
    lo, hi = math.log10(min(xs)), math.log10(max(xs))
    hi = hi if hi > lo else lo + 1
    ymax = max([p[1] for p in points] + [goal or 0, 1e-9]) * 1.1
    w, h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def sx(x):
        return x0 + MARGIN + (math.log10(x) - lo) / (hi - lo) * w

    def sy(y):
        return MARGIN + h - y / ymax * h

    out = [f'<text x="{x0 + WIDTH / 2}" y="24" text-anchor="middle" font-size="14">{title}</text>',
           f'<rect x="{x0 + MARGIN}" y="{MARGIN}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
           f'<text x="{x0 + 14}" y="{MARGIN + h / 2}" font-size="11" transform="rotate(-90 {x0 + 14} '
           f'{MARGIN + h / 2})" text-anchor="middle">{ylabel}</text>',
           f'<text x="{x0 + MARGIN + w / 2}" y="{HEIGHT - 12}" font-size="11" text-anchor="middle">'
           f'control records (log scale)</text>']
    for x in sorted(set(xs)):
        out.append(f'<text x="{sx(x):.1f}" y="{MARGIN + h + 14}" font-size="10" text-anchor="middle">{x:,}</text>')
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<text x="{x0 + MARGIN - 4}" y="{sy(y) + 3:.1f}" font-size="10" text-anchor="end">{y:.0f}</text>')
    if goal is not None:
        out.append(f'<line x1="{x0 + MARGIN}" x2="{x0 + MARGIN + w}" y1="{sy(goal):.1f}" y2="{sy(goal):.1f}" '
                   f'stroke="#2ca02c" stroke-dasharray="2,3"/>')
        out.append(f'<text x="{x0 + MARGIN + w - 2}" y="{sy(goal) - 4:.1f}" font-size="10" text-anchor="end" '
                   f'fill="#2ca02c">goal {goal:g} s</text>')
    for label, dashed, pts in series:
        pts = [p for p in pts if p[0] > 0]
        colour = COLOURS.get(label.split()[0], "#555")
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
    return out


def write_svg(path: Path, runs: list[dict], baseline: list[dict], goal_s: float) -> None:
    series_t, series_m = [], []
    for label_suffix, dashed, source in (("", False, runs), (" (before)", True, baseline)):
        for shape in SHAPES:
            mine = sorted((r for r in source if r["shape"] == shape), key=lambda r: r["events"])
            timed = [(r["events"], r["ready_s"]) for r in mine if r.get("ready_s") is not None]
            rss = [(r["events"], r["rss_mb"]) for r in mine if r.get("rss_mb") is not None]
            if timed:
                series_t.append((shape + label_suffix, dashed, timed))
            if rss:
                series_m.append((shape + label_suffix, dashed, rss))
    body = _panel(0, "time to /readyz 200", "seconds", series_t, goal_s)
    body += _panel(WIDTH, "worker RSS at ready", "MiB", series_m, None)
    legend_y = HEIGHT + 8
    for i, (label, dashed, _) in enumerate(series_t):
        colour = COLOURS.get(label.split()[0], "#555")
        x = 60 + i * 200
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        body.append(f'<line x1="{x}" x2="{x + 30}" y1="{legend_y}" y2="{legend_y}" stroke="{colour}" '
                    f'stroke-width="2"{dash}/>')
        body.append(f'<text x="{x + 36}" y="{legend_y + 4}" font-size="11">{label}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * WIDTH}" height="{HEIGHT + 24}" '
           f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>\n")
    path.write_text(svg)


def _cells(r: dict | None) -> list[str]:
    """ready s, RSS MiB, peak MiB, worst job round s, SIGTERM s."""
    if r is None:
        return [""] * 5
    if r.get("ready_s") is None:
        return [f"exit {r['exit']}" if "exit" in r else "not ready", str(r.get("rss_mb", "")), "", "", ""]
    rounds = r.get("job_round_s", [])
    worst = "no answer" if None in rounds else f"{max(rounds):.2f}" if rounds else ""
    return [f"{r['ready_s']:.1f}", str(r.get("rss_mb", "")), str(r.get("peak_rss_mb", "")), worst,
            str(r.get("sigterm_s", ""))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,10000,50000")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--svg", type=Path)
    parser.add_argument("--baseline", type=Path, help="a --json of another run (e.g. the code before a change)")
    parser.add_argument("--tree", default="", help="run the worker from this copy of the repository")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--job-timeout", type=float, default=60.0, help="per round of jobs after ready")
    parser.add_argument("--goal", type=float, default=30.0, help="seconds to ready for the largest log")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    shapes = [s for s in args.shapes.split(",") if s]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "model")
        adapter = build_sample_adapter(work / "adapter", model, rank=8)
        with broker_at(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), work / "kafka") as bootstrap:
            for size in sizes:
                for shape in shapes if size else shapes[:1]:  # an empty log has no shape
                    run = asyncio.run(one_run(bootstrap, model, adapter, shape, size, args.tree, work,
                                              args.ready_timeout, args.job_timeout))
                    runs.append(run)
                    print(json.dumps(run), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    info = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(), "tree": args.tree or str(ROOT)}
    baseline = json.loads(args.baseline.read_text())["runs"] if args.baseline else []
    if args.json:
        args.json.write_text(json.dumps({"info": info, "runs": runs}, indent=1))
    if args.svg:
        write_svg(args.svg, runs, baseline, args.goal)
    print(f"\n{info['date']}, {cpu}, {info['cores']} cores; worker from {info['tree']}\n")
    columns = ["ready s", "RSS MiB", "peak MiB", "worst job round s", "SIGTERM s"]
    header = ["shape", "records"] + columns + [f"before: {c}" for c in columns if baseline]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for run in runs:
        before = next((b for b in baseline if b["shape"] == run["shape"] and b["events"] == run["events"]), None)
        cells = [run["shape"] if run["events"] else "(empty)", f"{run['events']:,}"] + _cells(run)
        if baseline:
            cells += _cells(before)
        print("| " + " | ".join(cells) + " |")
    largest = max((r for r in runs), key=lambda r: r["events"], default=None)
    if largest is not None and largest["events"]:
        slow = [r for r in runs if r["events"] == largest["events"] and (r.get("ready_s") or math.inf) > args.goal]
        print(f"\ngoal: {largest['events']:,} records ready in <= {args.goal:g} s: "
              + ("met" if not slow else "missed by " + ", ".join(r["shape"] for r in slow)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
