"""Prefix caching keyed by adapter on SmolLM2: tenants' system prompts, the engine with the cache on vs off.

    .venv/bin/python -P benchmarks/prefix_cache.py [--json out.json] [--repeats 5] [--jobs 64] [--max-new 8]
                                   [--tenants 8] [--system-tokens 512] [--tail-tokens 32] [--adapters 64]
                                   [--shares 0,0.25,0.5,0.75,0.95] [--sweep-jobs 16] [--threads T] [--model DIR]

Main run: --tenants tenants, each with a --system-tokens system prompt of its own (random token ids) and
--adapters / --tenants task adapters of its own (random rank-16 PEFT adapters for SmolLM2's shapes, made as
benchmarks/serving.py makes them). A job is its tenant's system prompt + a fresh --tail-tokens user tail, on
one of its tenant's adapters (drawn uniformly); --jobs jobs per repeat, every one submitted at t=0
(saturated), greedy, --max-new tokens each (EOS removed, so each job generates exactly that many). Both
engines (`EngineConfig.prefix_cache` on and off, everything else equal, every adapter resident) first run
one job per (tenant, adapter) (the engine without the cache on short prompts: it keeps nothing of a
prefill), so the timed repeats measure the steady state of fixed system prompts: the cache holds every
(adapter, system prompt) prefix it has room for. Per repeat the two engines run the same
stream back to back, in an order rotated per repeat. Reported: generated tokens/s, p50/p99 TTFT (the
engine's, arrival → first token), the hit rate (prompt tokens served from the cache / all prompt tokens:
the share of prefill skipped; the engine's own ratio counts only the shareable blocks), median
[min..max] over the repeats and the on/off throughput ratio paired within each repeat.

Sweep: the share of each prompt that its tenant's jobs share (--shares), at the same prompt length
(system + tail tokens): up to --tenants tenants, one adapter each, --sweep-jobs jobs a repeat (one tenant
each, round robin), the rest of each prompt
unique to its job; warmed the same way. A PNG beside the JSON charts throughput against the shared share.

The figures depend on the CPU: the report prints its model and the torch thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, also under -P / PYTHONSAFEPATH
import charts  # noqa: E402
from serving import RANK, machine, model_assets, pct, rotated  # noqa: E402

SYSTEMS = ("cache on", "cache off")
VOCAB_LOW = 8  # prompt ids start here: clear of the special tokens
WARM_OFF_TOKENS = 16


def tokens(rng: random.Random, count: int, vocab: int) -> list[int]:
    return [rng.randrange(VOCAB_LOW, vocab) for _ in range(count)]


def stream(seed: int, jobs: int, shared: list[list[int]], adapters_of: list[list[str]], unique: int,
           vocab: int) -> list[tuple[str, str, list[int]]]:
    """(tenant, adapter key, prompt ids) per job: its tenant's shared prefix + `unique` tokens of its own."""
    rng = random.Random(seed)
    out = []
    for i in range(jobs):
        tenant = i % len(shared)
        out.append((f"t{tenant}", rng.choice(adapters_of[tenant]), shared[tenant] + tokens(rng, unique, vocab)))
    return out


class Bench:
    """One engine (prefix cache on or off) kept across repeats, every adapter registered and resident."""

    def __init__(self, model_dir: Path, adapters: list[tuple[str, Path]], prefix_cache: bool, args):
        self.engine = Engine(str(model_dir), EngineConfig(
            max_lora_rank=RANK, max_loras=len(adapters), max_running=args.jobs, kv_cache_mb=args.kv_cache_mb,
            prefix_cache=prefix_cache))
        for key, path in adapters:
            self.engine.register(AdapterSpec(key, str(path)))
        self.engine.start()
        self.args = args

    def run(self, jobs: list[tuple[str, str, list[int]]], tag: str) -> dict:
        """Submit every job at once; throughput, TTFT percentiles and the hit rate of this run."""
        n, max_new = len(jobs), self.args.max_new
        done, results, lock = threading.Event(), [], threading.Lock()

        def on_done(c):
            with lock:
                results.append(c)
                if len(results) == n:
                    done.set()

        before = self.engine.prefix_cache_stats()
        started = time.perf_counter()
        for i, (tenant, key, prompt) in enumerate(jobs):
            self.engine.submit(Request(f"{tag}-{i}", tenant, key, prompt_ids=prompt, params=SamplingParams(max_new)),
                               on_done)
        if not done.wait(3600):
            raise TimeoutError(f"{tag}: {len(results)}/{n} answered")
        wall = time.perf_counter() - started
        failed = [c for c in results if c.status != "ok"]
        if failed:
            raise RuntimeError(f"{tag}: {failed[0].id} {failed[0].error_code} {failed[0].error_message}")
        generated = sum(len(c.token_ids) for c in results)
        if generated != n * max_new:
            raise RuntimeError(f"{tag}: {generated} tokens generated, expected {n * max_new}")
        hits = self.engine.prefix_cache_stats()["hit_tokens"] - before["hit_tokens"]
        ttft = [c.ttft_s for c in results]
        return {"tok_s": generated / wall, "jobs_s": n / wall, "wall_s": wall,
                "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                "hit_rate": hits / sum(len(prompt) for _, _, prompt in jobs)}

    def close(self) -> None:
        self.engine.stop()


def compare(benches: dict[str, Bench], warm: list, make_stream, repeats: int, label: str, log) -> list[dict]:
    """Warm both engines on `warm`, then `repeats` repeats of both engines on the same stream, rotated. The
    engine without the cache warms on the first WARM_OFF_TOKENS of each prompt: it loads the same adapters,
    and a longer prefill would leave nothing behind in it."""
    for name, bench in benches.items():
        started = time.perf_counter()
        jobs = warm if name == "cache on" else [(t, key, prompt[:WARM_OFF_TOKENS]) for t, key, prompt in warm]
        bench.run(jobs, f"{label}-warm-{name}")
        log(f"{label}: warmed {name} in {time.perf_counter() - started:.1f}s")
    runs = []
    for rep in range(repeats):
        jobs = make_stream(rep)
        for name in rotated(list(benches), rep):
            result = benches[name].run(jobs, f"{label}-{rep}-{name}")
            runs.append({"label": label, "system": name, "rep": rep, **result})
            log(f"{label} [rep {rep}] {name:9s} {result['tok_s']:8.1f} tok/s  ttft p50 {result['ttft_p50_s']:.3f}s "
                f"p99 {result['ttft_p99_s']:.3f}s  hit rate {result['hit_rate']:.2f}")
    return runs


def bench(args, log=print, save=lambda report: None) -> dict:
    """The main run, then the sweep; `save(report)` after each part (a long run killed midway keeps its figures)."""
    from lorabus.worker.model_store import fetch_model

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    source = Path(args.model) if args.model else fetch_model("smollm2-135m-instruct")
    model_dir, adapters = model_assets(root, source, args.adapters, log=log)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    report = {"script": "prefix_cache", "machine": machine(), "config": {k: v for k, v in vars(args).items()
                                                                         if k != "json"}, "runs": []}
    log(f"{report['machine']['cpu']}, {report['machine']['torch_threads']} torch threads")
    benches = {name: Bench(model_dir, adapters, name == "cache on", args) for name in SYSTEMS}
    try:
        keys = [key for key, _ in adapters]
        per = len(keys) // args.tenants
        adapters_of = [keys[t * per:(t + 1) * per] for t in range(args.tenants)]
        rng = random.Random(0)
        systems = [tokens(rng, args.system_tokens, vocab) for _ in range(args.tenants)]
        warm = [(f"t{t}", key, systems[t] + tokens(rng, args.tail_tokens, vocab))
                for t in range(args.tenants) for key in adapters_of[t]]
        if args.main:
            report["runs"] += compare(benches, warm, lambda rep: stream(100 + rep, args.jobs, systems, adapters_of,
                                                                        args.tail_tokens, vocab),
                                      args.repeats, "main", log)
            save(report)
        length = args.system_tokens + args.tail_tokens
        tenants = min(args.tenants, args.sweep_jobs)  # the tenants a sweep repeat's jobs reach
        one_each = [[adapters_of[t][0]] for t in range(tenants)]
        for share in args.shares:
            shared_len = round(share * length)
            srng = random.Random(int(share * 1000))
            prefixes = [tokens(srng, shared_len, vocab) for _ in range(tenants)]
            warm = [(f"t{t}", one_each[t][0], prefixes[t] + tokens(srng, length - shared_len, vocab))
                    for t in range(tenants)]
            runs = compare(benches, warm, lambda rep: stream(200 + rep, args.sweep_jobs, prefixes, one_each,
                                                             length - shared_len, vocab),
                           args.repeats, f"share {share:g}", log)
            for run in runs:
                run["share"] = share
            report["runs"] += runs
            save(report)
    finally:
        for b in benches.values():
            b.close()
    return report


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


def _ratios(runs: list[dict], label: str) -> list[float]:
    by_rep: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["label"] == label:
            by_rep.setdefault(r["rep"], {})[r["system"]] = r["tok_s"]
    return [rep["cache on"] / rep["cache off"] for rep in by_rep.values() if len(rep) == 2]


def main_table(cfg: dict, runs: list[dict]) -> list[str]:
    lines = ["", f"Main: {cfg['tenants']} tenants x a {cfg['system_tokens']}-token system prompt, {cfg['tail_tokens']}-token "
             f"tails, {cfg['adapters']} adapters, {cfg['jobs']} jobs a repeat, {cfg['max_new']} new tokens each",
             "",
             "| engine | tokens/s | p50 TTFT (s) | p99 TTFT (s) | hit rate |",
             "|---|---|---|---|---|"]
    for system in SYSTEMS:
        sel = [r for r in runs if r["label"] == "main" and r["system"] == system]
        if sel:
            lines.append(f"| {system} | {_spread([r['tok_s'] for r in sel])} | "
                         f"{_spread([r['ttft_p50_s'] for r in sel], '{:.2f}')} | "
                         f"{_spread([r['ttft_p99_s'] for r in sel], '{:.2f}')} | "
                         f"{_spread([r['hit_rate'] for r in sel], '{:.2f}')} |")
    return lines + ["", f"cache on / off throughput: {_spread(_ratios(runs, 'main'), '{:.2f}')}x"]


def tables(report: dict) -> str:
    m, cfg, runs = report["machine"], report["config"], report["runs"]
    lines = [f"CPU: {m['cpu']} ({m['cpus']} cpus), torch threads {m['torch_threads']}, torch {m['torch']}; "
             f"median [min..max] of {cfg['repeats']} repeats, the two engines interleaved"]
    if any(r["label"] == "main" for r in runs):
        lines += main_table(cfg, runs)
    lines += ["", f"Sweep: shared share of a {cfg['system_tokens'] + cfg['tail_tokens']}-token prompt, "
              f"{min(cfg['tenants'], cfg['sweep_jobs'])} tenants, one adapter each, {cfg['sweep_jobs']} jobs a repeat", "",
              "| shared | cache on tokens/s | cache off tokens/s | on / off | hit rate (on) |", "|---|---|---|---|---|"]
    for share in cfg["shares"]:
        label = f"share {share:g}"
        on = [r for r in runs if r["label"] == label and r["system"] == "cache on"]
        off = [r for r in runs if r["label"] == label and r["system"] == "cache off"]
        if on and off:
            lines.append(f"| {share:.0%} | {_spread([r['tok_s'] for r in on])} | {_spread([r['tok_s'] for r in off])} "
                         f"| {_spread(_ratios(runs, label), '{:.2f}')}x | {_spread([r['hit_rate'] for r in on], '{:.2f}')} |")
    return "\n".join(lines)


def draw(report: dict, json_path: str) -> list[Path]:
    """The chart beside the JSON: throughput against the shared share of the prompt, cache on and off."""
    series: dict[str, dict[float, list[float]]] = {}
    for r in report["runs"]:
        if "share" in r:
            series.setdefault(r["system"], {}).setdefault(100 * r["share"], []).append(r["tok_s"])
    if not series:
        return []
    m, cfg = report["machine"], report["config"]
    subtitle = (f"{cfg['system_tokens'] + cfg['tail_tokens']}-token prompts; {m['cpu']}, {m['torch_threads']} threads; "
                f"median [min..max], {cfg['repeats']} repeats")
    return [charts.line_chart(charts.png_beside(json_path), "SmolLM2-135M, prefix cache: throughput against the shared share",
                              "share of the prompt shared by a tenant's jobs (%)", "generated tokens/s", series,
                              subtitle=subtitle)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the full report here (and the chart beside it)")
    p.add_argument("--model", metavar="DIR", help="a Hugging Face model directory (default: SmolLM2-135M-Instruct, "
                   "fetched once into the cache)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--jobs", type=int, default=64, help="jobs a repeat of the main run")
    p.add_argument("--max-new", type=int, default=8)
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--tail-tokens", type=int, default=32)
    p.add_argument("--adapters", type=int, default=64, help="split evenly among the tenants")
    p.add_argument("--shares", type=lambda s: [float(x) for x in s.split(",")] if s else [],
                   default=[0.0, 0.25, 0.5, 0.75, 0.95], help="comma-separated shared shares of the sweep ('' = none)")
    p.add_argument("--sweep-jobs", type=int, default=16)
    p.add_argument("--main", default=True, action=argparse.BooleanOptionalAction, help="run the main comparison "
                   "(--no-main: the sweep alone)")
    p.add_argument("--kv-cache-mb", type=int, default=2048, help="room for every (adapter, system prompt) prefix")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default); recorded")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lorabus-bench-serving"),
                   help="model view and adapters (shared with benchmarks/serving.py)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    def save(report: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    report = bench(args, log=lambda line: print(line, flush=True), save=save)
    print(tables(report))
    if args.json:
        for png in draw(report, args.json):
            print(png)


if __name__ == "__main__":
    main()
