"""Cold start by tier (issue 24): a job's arrival → its first token, by where its adapter is when it arrives.

    .venv/bin/python benchmarks/cold_tiers.py [--model smollm2-135m-instruct|tiny] [--adapters N] [--repeats R]
                                              [--slots S] [--threads T] [--prompt-len P] [--json out.json]

Tiers, each measured on N distinct rank-16 adapters (q,k,v,o,gate,up,down), each adapter once per tier and
repeat, one job of a P-token prompt and one new token on an otherwise idle engine whose S device slots are
all full of idle adapters (so every load evicts one, as on a busy worker):

* store: only in the object store (S3Proxy on loopback, deploy/local-s3): the clock starts, then
  `DiskTier.fetch(uri, sha256)` downloads it into an empty disk tier (LIST + two GETs, fsync, verify),
  `Engine.register(AdapterSpec(key, path, sha256))`, and the job (disk → host → device slot);
* disk: already in the disk tier (fetched before the clock starts), not in host memory: the same
  fetch (an index hit, no network), register and job;
* host: in the engine's host tier, not in a device slot: registered, warmed into a slot, then pushed
  out of it by another adapter; the job copies host → device;
* slot: resident in a device slot (warmed just before): the job loads nothing.

The tiers are interleaved: adapter i of every tier is measured before adapter i+1, the tiers' order
rotated by one per adapter and repeat. Each repeat has fresh disk tiers and fresh engine keys, so
nothing of one repeat is warm in the next. Reported per tier: p50 and p99 (nearest rank: of 20 samples
the slowest) of every repeat, as median [min..max] over the repeats, and the p50 of the fetch part
(fetch + register) and of the engine's own load. The OS page cache is not dropped (that needs root):
the store's and the disk tier's files are read from memory, as on a worker with spare RAM. With --json, a
PNG beside it charts the first-token p50 and p99 per tier.

The slot layout: S-1 device slots hold filler adapters the engine is told to keep (affinity 1); the one
left holds whatever ran last, so every load (and the host tier's push-out) evicts from that slot.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from lorabus.worker.adapter_store import DiskTier, StoreSettings, make_client
from lorabus.worker.model_store import fetch_model
from lorabus.worker.testing import build_sample_adapter, build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling charts.py, also under -P / PYTHONSAFEPATH
import charts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCAL_S3 = ROOT / "deploy" / "local-s3"
BUCKET = "bench"
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TIERS = ("store", "disk", "host", "slot")
TASK_SWITCH_MS = 100  # the task-switch bar the tiers are held to
# A production store on a LAN, for the estimate next to the loopback figures.
LAN_GBIT_S = (1, 10)
FIRST_BYTE_MS = (20, 50)  # S3 in-region, per request
STORE_REQUESTS = 3  # a cold fetch: LIST, GET adapter_config.json, GET adapter_model.safetensors, in sequence


@dataclass
class Sample:
    tier: str
    rep: int
    adapter: int
    first_token_s: float  # arrival → first token
    fetch_s: float  # arrival → registered (store and disk tiers; 0 otherwise)
    load_s: float  # the engine's own load of the adapter during the job (0 when it loaded nothing)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 20 samples is the slowest)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def mmm(values: list[float], fmt: str = ".1f") -> str:
    """median [min..max] of the repeats."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}..{format(max(values), fmt)}]"


def rotated(items: tuple[str, ...], k: int) -> tuple[str, ...]:
    k %= len(items)
    return items[k:] + items[:k]


def machine(threads: int) -> dict:
    cpu = platform.processor()
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cpus": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()]}


# ---- assets -------------------------------------------------------------------------------------


def model_dir(name: str, workdir: Path) -> Path:
    if name != "tiny":
        return fetch_model(name)
    path = workdir / "model-tiny"
    if not (path / "config.json").exists():
        build_tiny_model(path, seed=0)
    return path


def build_adapters(model: Path, workdir: Path, count: int, log) -> list[Path]:
    """`count` random rank-16 all-module adapters for the model, built once under workdir (kept across runs)."""
    paths, started = [], time.perf_counter()
    for i in range(count):
        path = workdir / f"adapters-{model.name}" / f"a{i:04d}"
        if not (path / "adapter_model.safetensors").exists():
            build_sample_adapter(path, model, rank=RANK, alpha=2 * RANK, target_modules=TARGETS, seed=2000 + i,
                                 std=0.05)
        paths.append(path)
    log(f"{count} adapters ready in {time.perf_counter() - started:.1f} s")
    return paths


class LocalStore:
    """deploy/local-s3 on a free port and its own data dir, holding the adapters under s3://bench/aNNNN/."""

    def __init__(self, data: Path):
        self.data = data
        out = subprocess.run([sys.executable, str(LOCAL_S3), "start", "--port", "0", "--data", str(data),
                              "--bucket", BUCKET], check=True, stdout=subprocess.PIPE, text=True, timeout=600)
        self.endpoint = out.stdout.strip()
        # deploy/local-s3's public test keys, for boto3's chain (DiskTier reads credentials only from there).
        os.environ.update(AWS_ACCESS_KEY_ID="lorabus", AWS_SECRET_ACCESS_KEY="lorabus-secret")
        self.settings = StoreSettings(endpoint_url=self.endpoint, region="us-east-1", addressing_style="path")

    def upload(self, adapters: list[Path]) -> list[str]:
        client = make_client(self.settings)
        uris = []
        for path in adapters:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                client.upload_file(str(path / name), BUCKET, f"{path.name}/{name}")
            uris.append(f"s3://{BUCKET}/{path.name}/")
        return uris

    def stop(self) -> None:
        subprocess.run([sys.executable, str(LOCAL_S3), "stop", "--data", str(self.data)], check=False,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)


# ---- measurement --------------------------------------------------------------------------------


class Bench:
    """One engine with its slots full, and the steps that put an adapter in a tier and time its first token."""

    def __init__(self, model: Path, args, filler: Path):
        self.args = args
        self.engine = Engine(str(model), EngineConfig(device=args.device, max_lora_rank=RANK, max_loras=args.slots,
                                                      max_cpu_loras=4 * args.slots, kv_cache_mb=64))
        self.loads: dict[str, float] = {}
        self.job_ids = itertools.count()
        self.engine.on_load = lambda key, seconds, error, source: self.loads.__setitem__(key, seconds)
        self.engine.start()
        self.fillers = [f"filler-{k}" for k in range(args.slots - 1)]
        self.bumper = "bumper"  # pushes a host-tier adapter out of its slot; never kept by affinity
        for key in [*self.fillers, self.bumper]:
            self.engine.register(AdapterSpec(key, str(filler)))
            self.warm(key)
        self.engine.set_adapter_affinity({key: 1.0 for key in self.fillers})
        assert len(self.engine.resident()) == args.slots, self.engine.resident()

    def warm(self, key: str) -> None:
        self.job(f"warm-{key}-{next(self.job_ids)}", key)
        assert key in self.engine.resident(), key

    def job(self, job_id: str, key: str) -> tuple[float, bool]:
        """(the perf_counter time of the job's first token, whether its adapter had to be loaded)."""
        done, box = threading.Event(), []

        def on_done(c):
            box.append((time.perf_counter(), c))
            done.set()

        self.engine.submit(Request(job_id, "bench", key, prompt_ids=[5] * self.args.prompt_len,
                                   params=SamplingParams(1)), on_done)
        if not done.wait(600):
            raise TimeoutError(job_id)
        at, c = box[0]
        if c.status != "ok":
            raise RuntimeError(f"{job_id}: {c.error_code} {c.error_message}")
        return at - (c.total_s - c.ttft_s), c.cold  # ttft_s is the engine's; the job ended total_s after arrival

    def measure(self, tier: str, rep: int, i: int, uri: str, sha: str, tiers: dict[str, DiskTier]) -> Sample:
        key = f"{tier}-r{rep}-a{i:04d}"
        spec_of = lambda path: AdapterSpec(key, str(path), sha)
        if tier == "host":
            self.engine.register(spec_of(tiers["disk"].fetch(uri, sha)))
            self.warm(key)
            self.warm(self.bumper)
            assert key not in self.engine.resident(), key
        elif tier == "slot":
            self.engine.register(spec_of(tiers["disk"].fetch(uri, sha)))
            self.warm(key)
        arrival = time.perf_counter()
        if tier in ("store", "disk"):
            self.engine.register(spec_of(tiers[tier].fetch(uri, sha)))
        registered = time.perf_counter()
        first_token, cold = self.job(f"{key}-job", key)
        assert cold == (tier != "slot"), (key, cold)
        load = self.loads.pop(key, 0.0)  # for the slot tier: its warm-up's load, not the job's
        return Sample(tier, rep, i, first_token - arrival, registered - arrival, load if cold else 0.0)

    def close(self) -> None:
        self.engine.stop()


def run(args, log) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.model, workdir)
    adapters = build_adapters(model, workdir, args.adapters + 1, log)
    filler, adapters = adapters[-1], adapters[:-1]  # the fillers share one adapter's files under their own keys
    shas = [hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).hexdigest() for p in adapters]
    size = sum((adapters[0] / name).stat().st_size for name in ("adapter_config.json", "adapter_model.safetensors"))
    run_dir = Path(tempfile.mkdtemp(prefix="cold-tiers-", dir=workdir))
    store = LocalStore(run_dir / "s3")
    try:
        uris = store.upload(adapters)
        log(f"store {store.endpoint}: {len(uris)} adapters of {size / 2**20:.1f} MiB")
        bench = Bench(model, args, filler)
        samples: list[Sample] = []
        try:
            for rep in range(args.repeats):
                tiers = {name: DiskTier(run_dir / f"r{rep}-{name}", 64 * 2**30, store.settings)
                         for name in ("store", "disk")}
                for uri, sha in zip(uris, shas):  # the disk tier's adapters arrive before the clock starts
                    tiers["disk"].fetch(uri, sha)
                for i, (uri, sha) in enumerate(zip(uris, shas)):
                    for tier in rotated(TIERS, rep + i):
                        samples.append(bench.measure(tier, rep, i, uri, sha, tiers))
                for name in ("store", "disk"):
                    shutil.rmtree(run_dir / f"r{rep}-{name}")
                log(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(
                    f"{t} p50 {pct([s.first_token_s for s in samples if s.rep == rep and s.tier == t], 50) * 1e3:.0f} ms"
                    for t in TIERS))
        finally:
            bench.close()
    finally:
        store.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"machine": machine(torch.get_num_threads()), "config": dict(vars(args)),
            "model": str(model), "adapter_bytes": size, "samples": [vars(s) for s in samples],
            "tiers": summarize(samples, args.repeats)}


def summarize(samples: list[Sample], repeats: int) -> dict:
    out = {}
    for tier in TIERS:
        per_rep = [[s for s in samples if s.tier == tier and s.rep == rep] for rep in range(repeats)]
        out[tier] = {"samples_per_repeat": len(per_rep[0]),
                     **{f"{name}_{q}_ms": [pct([getattr(s, field) for s in rows], q) * 1e3 for rows in per_rep]
                        for name, field in (("first_token", "first_token_s"), ("fetch", "fetch_s"),
                                            ("load", "load_s"))
                        for q in (50, 99)}}
    for tier in TIERS:  # the task switch: what the tier adds to a resident adapter's first token, paired by repeat
        out[tier]["over_slot_50_ms"] = [a - b for a, b in zip(out[tier]["first_token_50_ms"],
                                                               out["slot"]["first_token_50_ms"])]
    return out


def markdown(report: dict) -> str:
    m, tiers, size = report["machine"], report["tiers"], report["adapter_bytes"]
    reps = report["config"]["repeats"]
    lines = [f"CPU \"{m['cpu']}\" ({m['cpus']} cores), torch threads {m['torch_threads']}, load average (1/5/15 min) "
             f"{' / '.join(map(str, m['load_average_start']))} at the start, {' / '.join(map(str, m['load_average']))} "
             f"at the end; model {Path(report['model']).name}; "
             f"adapter rank {RANK} on {','.join(t.split('_')[0] for t in TARGETS)}, {size / 2**20:.1f} MiB "
             f"({size:,} bytes) per adapter; {tiers['store']['samples_per_repeat']} adapters per tier, "
             f"{reps} interleaved repeat(s), median [min..max] over the repeats.", "",
             "| tier | first token p50 ms | first token p99 ms | p50 over the slot tier ms | fetch + register p50 ms "
             "| engine load p50 ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for tier in TIERS:
        t = tiers[tier]
        lines.append(f"| {tier} | {mmm(t['first_token_50_ms'])} | {mmm(t['first_token_99_ms'])} "
                     f"| {mmm(t['over_slot_50_ms'])} | {mmm(t['fetch_50_ms'])} | {mmm(t['load_50_ms'])} |")
    lines += ["", f"The {TASK_SWITCH_MS} ms task-switch bar (medians of the repeats):", ""]
    for tier in TIERS:
        p99, added = (statistics.median(tiers[tier][k]) for k in ("first_token_99_ms", "over_slot_50_ms"))
        lines.append(f"- {tier}: first token p99 {p99:.0f} ms ({'met' if p99 < TASK_SWITCH_MS else 'missed'}); "
                     f"adds {added:.0f} ms at p50 to a resident adapter's first token "
                     f"({'met' if added < TASK_SWITCH_MS else 'missed'})")
    store = statistics.median(tiers["store"]["first_token_50_ms"])
    lines += ["", f"A production store on a LAN instead of loopback (estimate, p50): the loopback store tier's p50 "
              f"({store:.0f} ms; its own loopback transfer is not subtracted) + {STORE_REQUESTS} requests in sequence "
              f"(LIST, two GETs) at {FIRST_BYTE_MS[0]}-{FIRST_BYTE_MS[1]} ms to first byte each + "
              f"{size / 2**20:.1f} MiB on the wire:", ""]
    for gbit in LAN_GBIT_S:
        wire = size * 8 / (gbit * 1e9) * 1e3
        low, high = (store + STORE_REQUESTS * fb + wire for fb in FIRST_BYTE_MS)
        lines.append(f"- {gbit} Gbit/s: {wire:.0f} ms on the wire, {low:.0f}-{high:.0f} ms to first token")
    return "\n".join(lines)


def draw(report: dict, json_path: str) -> list[Path]:
    """The chart beside the JSON: a job's first token, p50 and p99, by the tier its adapter came from."""
    tiers, m = report["tiers"], report["machine"]
    groups = {tier: {"p50": tiers[tier]["first_token_50_ms"], "p99": tiers[tier]["first_token_99_ms"]}
              for tier in TIERS}
    subtitle = (f"{Path(report['model']).name}, {m['cpu']}, {m['torch_threads']} torch threads; "
                f"median [min..max] of {report['config']['repeats']} repeats")
    return [charts.bar_chart(charts.png_beside(json_path), "Cold start by tier: arrival to first token", "ms",
                             groups, log_y=True, subtitle=subtitle)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a model of lorabus's model cache (fetched if missing), or 'tiny' (the tests' random Llama)")
    p.add_argument("--adapters", type=int, default=20, help="distinct adapters per tier (each measured once a repeat)")
    p.add_argument("--repeats", type=int, default=5, help="repeats, tiers interleaved; tables give median [min..max]")
    p.add_argument("--slots", type=int, default=4, help="device adapter slots (all kept full); at least 2")
    p.add_argument("--prompt-len", type=int, default=4, help="tokens in each job's prompt (it generates one)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default); recorded")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", help="write the full report (every sample) here")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lorabus-bench-cold-tiers"),
                   help="where the adapters are built (kept across runs) and each run's store and tiers live")
    args = p.parse_args(argv)
    if args.slots < 2:
        p.error("--slots must be at least 2: one for the filler adapters, one that every load evicts")
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    report = run(args, log)
    report["machine"]["load_average_start"] = load_before
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["script"] = "cold_tiers"
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        log(f"wrote {args.json}")
        for png in draw(report, args.json):
            log(f"wrote {png}")


if __name__ == "__main__":
    main()
