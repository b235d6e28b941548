"""Side-by-side serving benchmark: lorabus vs per-adapter (PEFT switching) vs merged-model serving.

    .venv/bin/python benchmarks/serving.py [--quick] [--json out.json] [--device cpu|cuda] [--model-shape tiny|small|1b]
                                 [--model DIR] [--repeats R] [--threads T] [--rate JOBS_PER_S] [--cold-1b] [--warm]

The same job stream — N distinct rank-16 adapters (N = 1, 8, 64, 512; Zipf popularity s=1.1), fixed
prompt and output length, greedy — is served by:

* lorabus: `scheduler.Engine`, adapter-aware continuous batching over one base model;
* per-adapter: Hugging Face transformers + PEFT with every adapter loaded; the server repeatedly takes
  the adapter of the oldest queued job, `set_adapter`s it and `generate`s up to --max-batch of its
  queued jobs together; batches run one after another (the usual "switching" deployment);
* merged: the same batching, but switching adapters means unmerging the previous one from the base
  weights and merging the next one (PEFT `unmerge_adapter` / `merge_adapter`), then running plain
  dense layers;
* peft-mixed: PEFT's own mixed-adapter batches: the same PeftModel (every adapter loaded, none merged)
  takes up to --max-batch of the oldest queued jobs whatever their adapters and runs one
  `generate(..., adapter_names=[each row's adapter])` over them (PEFT groups the rows by adapter
  inside every LoRA layer).

Exactly N distinct adapters per run: the Zipf draw alone leaves the tail unused (96 jobs over 64
adapters touch ~35), so `job_stream` then gives each unused adapter one job taken from the most
popular adapter's jobs; every run's "distinct" field says how many it used (always N). A run needs at
least N jobs: --jobs is raised to N where smaller (N=512 runs 512 jobs).

Two arrival patterns: "saturated" (every job submitted at t=0, i.e. peak throughput) and, unless
--no-poisson, "poisson" (open loop at --rate jobs/s; default 60% of lorabus's saturated job rate with
one adapter). Reported per N and system: generated tokens/s, p50/p99 end-to-end latency
(submission → last token) and p50/p99 TTFT (submission → first token; for the baselines the first
token of the job's batch, taken when the first logits processor call of its `generate` returns),
each also as a ratio to lorabus (with --json, a PNG beside it charts the saturated throughput against N per
system). Cold start = a never-seen adapter on local disk → first token of a
4-token prompt on an otherwise idle server, measured sequentially on --cold-samples adapters.

EOS never ends a sequence early: the benchmark model has no eos token (`eos_token_id` removed from
its config) and the baselines also pass `min_new_tokens`; every system's generated token count is
checked against jobs x max_new_tokens.

--model DIR: a real Hugging Face model directory instead of a built-in random shape (e.g. SmolLM2-135M-Instruct,
the directory `lorabus model fetch` prints). The benchmark runs on an eos-free view of it
(<workdir>/model-<name>-noeos: config.json and generation_config.json with eos_token_id null, symlinks
to the weights, no tokenizer files, so neither a config eos nor a tokenizer's end-of-turn token can
stop a job early), with random rank-16 PEFT adapters made for its shapes as for the built-in ones.

--repeats R (default 5): every (N, system) run R times; per N, each repeat runs the systems back to back in an
order rotated by one per repeat (lorabus first in repeat 0, where the Poisson rate is taken), and the
tables give median [min..max] over the repeats, ratios to lorabus paired within a repeat. lorabus gets
a fresh engine per (N, repeat). --threads T sets torch.set_num_threads (recorded in the report).

--warm: by default lorabus starts every run with none of the stream's adapters resident, so its figures
include loading every adapter cold during the timed run (N loads). With --warm, each fresh engine first
loads the run's N adapters into its device slots and runs one warm-up job on each, and the timed run must
then load nothing (checked): the steady state, comparable to the baselines, which always have every
adapter loaded before timing. Only possible when every N fits the device slots (--max-loras, at most 64);
larger N is refused. The tables' headers say which mode ran; the columns mean the same in both.

--cold-1b: the cold-start figure for a rank-16 adapter of a 1B-class model (hidden 2048, 16 layers,
32 heads / 8 kv heads, intermediate 5632, vocab 32000; ~0.85B params, random weights) — the adapter
load path (disk → host → device slot, the loader's own timing) and the first-token time of a 4-token
prompt, cold and warm, on lorabus alone.

The CUDA path (`--device cuda --model-shape 1b`) runs the same code in bf16 with
`torch.cuda.synchronize()` around every timed region; there the baselines stop at N=64 by default
(--baseline-max-adapters): PEFT's `load_adapter` walks every module of the model, so loading 512
adapters into one PeftModel is quadratic (4.3 min on the small shape, ~4x that on the 1b shape).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from lorabus.worker.testing import build_sample_adapter, build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling charts.py, also under -P / PYTHONSAFEPATH
import charts  # noqa: E402

SHAPES = {
    "tiny": {},  # worker.testing.TINY_MODEL: hidden 64, 2 layers
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
}
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ZIPF_S = 1.1
SYSTEMS = ("lorabus", "per-adapter", "merged", "peft-mixed")
COLD_PROMPT = 4  # tokens in the cold-start job's prompt (it generates one token)


# ---- assets -------------------------------------------------------------------------------------


def build_assets(root: Path, shape: str, num_adapters: int, targets=TARGETS, log=print) -> tuple[Path, list[tuple[str, Path]]]:
    """The base model (eos removed) and `num_adapters` rank-16 adapters, cached under `root`."""
    model_dir = root / f"model-{shape}"
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        build_tiny_model(model_dir, seed=0, **SHAPES[shape])
        for name in ("config.json", "generation_config.json"):
            path = model_dir / name
            if path.exists():  # no eos: every sequence runs to max_new_tokens on every system
                config = json.loads(path.read_text())
                config["eos_token_id"] = None
                path.write_text(json.dumps(config, indent=2))
        log(f"built {shape} model in {time.perf_counter() - started:.1f}s")
    return model_dir, sample_adapters(root / f"adapters-{shape}", model_dir, num_adapters, targets, log)


def sample_adapters(prefix: Path, model_dir: Path, num_adapters: int, targets, log) -> list[tuple[str, Path]]:
    """`num_adapters` random rank-16 PEFT adapters for the model, built once under `<prefix>-<targets>/`."""
    tag = "-".join(p.split("_")[0] for p in targets)
    adapters = []
    started, built = time.perf_counter(), 0
    for i in range(num_adapters):
        path = prefix.parent / f"{prefix.name}-{tag}" / f"a{i:04d}"
        if not (path / "adapter_model.safetensors").exists():
            build_sample_adapter(path, model_dir, rank=RANK, alpha=2 * RANK, target_modules=tuple(targets), seed=1000 + i,
                                 std=0.05)
            built += 1
        adapters.append((f"a{i:04d}@1", path))
    if built:
        log(f"built {built} adapters in {time.perf_counter() - started:.1f}s")
    return adapters


MODEL_FILES_SKIPPED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def model_assets(root: Path, source: Path, num_adapters: int, targets=TARGETS,
                 log=print) -> tuple[Path, list[tuple[str, Path]]]:
    """A real model directory as the benchmark model: an eos-free view of it and `num_adapters` adapters.

    The view (`root/model-<name>-noeos`) holds config.json and generation_config.json with
    `eos_token_id` set to null and symlinks to every other file of `source` (the weights are not
    copied) except the tokenizer and chat template: the stream sends `prompt_ids`, and without a
    tokenizer nothing (a tokenizer's eos or end-of-turn token) can end a sequence early, so every
    system generates exactly max_new_tokens per job (still checked), and no system decodes text the
    others do not. The adapters are random rank-16 PEFT adapters made for the model's shapes by the
    same `build_sample_adapter` path as the built-in shapes.
    """
    source = source.expanduser().resolve()
    if not (source / "config.json").exists():
        sys.exit(f"--model {source}: no config.json there (a Hugging Face model directory is needed)")
    label = f"model-{source.name}"
    model_dir = root / f"{label}-noeos"
    marker = model_dir / "lorabus-bench-source.txt"
    if not marker.exists() or marker.read_text() != str(source):
        if model_dir.exists():
            for path in model_dir.iterdir():
                path.unlink()
        model_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in MODEL_FILES_SKIPPED:
                if path.name in ("config.json", "generation_config.json"):
                    config = json.loads(path.read_text())
                    config["eos_token_id"] = None  # no eos: every sequence runs to max_new_tokens on every system
                    (model_dir / path.name).write_text(json.dumps(config, indent=2))
                else:
                    (model_dir / path.name).symlink_to(path)
        marker.write_text(str(source))
        log(f"eos-free view of {source} in {model_dir}")
    return model_dir, sample_adapters(root / f"adapters-{label}", model_dir, num_adapters, targets, log)


def zipf_choice(rng: random.Random, n: int, count: int) -> list[int]:
    weights = [1 / (i + 1) ** ZIPF_S for i in range(n)]
    return rng.choices(range(n), weights, k=count)


def cover_all(rng: random.Random, picks: list[int], n: int) -> list[int]:
    """`picks` changed so that every adapter 0..n-1 occurs at least once: each unused adapter takes one job
    of the currently most used adapter (a random one of its jobs). Needs len(picks) >= n."""
    if len(picks) < n:
        raise ValueError(f"{len(picks)} jobs cannot use {n} distinct adapters")
    picks = list(picks)
    where: dict[int, list[int]] = {}
    for i, a in enumerate(picks):
        where.setdefault(a, []).append(i)
    for missing in range(n):
        if missing in where:
            continue
        donor = max(where, key=lambda a: (len(where[a]), -a))
        pos = where[donor].pop(rng.randrange(len(where[donor])))
        picks[pos] = missing
        where[missing] = [pos]
    assert len(set(picks)) == n
    return picks


@dataclass
class Job:
    id: str
    adapter: int  # index into the adapter list
    prompt: list[int]
    arrival: float  # seconds after the start


def job_stream(seed: int, num_adapters: int, jobs: int, prompt_len: int, vocab: int, rate: float | None) -> list[Job]:
    rng = random.Random(seed)
    picks = cover_all(rng, zipf_choice(rng, num_adapters, jobs), num_adapters)
    t, out = 0.0, []
    for i, a in enumerate(picks):
        if rate:
            t += rng.expovariate(rate)
        out.append(Job(f"j{i}", a, [rng.randrange(3, vocab) for _ in range(prompt_len)], t if rate else 0.0))
    return out


# ---- measurement --------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th value, not an interpolation)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class RunResult:
    system: str
    adapters: int
    mode: str  # saturated | poisson
    jobs: int
    tokens: int  # generated tokens, counted from the outputs
    seconds: float  # first submission → last completion
    e2e: list[float] = field(repr=False)
    ttft: list[float] = field(repr=False)
    extra: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict:
        return {"system": self.system, "adapters": self.adapters, "mode": self.mode, "jobs": self.jobs,
                "tokens": self.tokens, "seconds": round(self.seconds, 3), "tok_s": round(self.tok_s, 1),
                "e2e_p50_s": round(pct(self.e2e, 50), 4), "e2e_p99_s": round(pct(self.e2e, 99), 4),
                "ttft_p50_s": round(pct(self.ttft, 50), 4), "ttft_p99_s": round(pct(self.ttft, 99), 4), **self.extra}


# ---- lorabus ------------------------------------------------------------------------------------


class Lorabus:
    def __init__(self, model_dir: Path, adapters, args, also_register=()):
        self.args = args
        self.engine = Engine(str(model_dir), EngineConfig(
            device=args.device, max_lora_rank=RANK, max_running=args.max_batch, kv_cache_mb=args.kv_cache_mb,
            max_loras=args.max_loras, max_step_tokens=args.max_step_tokens))
        for key, path in [*adapters, *also_register]:  # registering is publishing: nothing is loaded yet
            self.engine.register(AdapterSpec(key, str(path)))
        self._hook(self.engine)
        self.engine.start()

    def _hook(self, engine: Engine) -> None:
        self.loads: list[float] = []  # the loader's own timing of each load: disk/host cache → device slot
        self.step_adapters: list[int] = []  # distinct adapters per forward pass
        engine.on_load = lambda key, seconds, error, source: self.loads.append(seconds)
        engine.on_step = lambda seqs, tokens, adapters, seconds: self.step_adapters.append(adapters)

    def close(self) -> None:
        self.engine.stop()

    def warm(self, key: str, prompt_len: int, max_new: int) -> None:
        """Run a job so one-time costs (allocator, kernels, threads) are not charged to the stream."""
        self.engine.generate(Request(f"warm-{key}-{time.perf_counter()}", "warm", key,
                                     prompt_ids=[5] * prompt_len, params=SamplingParams(max_new)), 600)

    def preload(self, keys: list[str], timeout: float = 600) -> None:
        """--warm: load every key into a device slot and run one warm-up step on it before timing, so the run
        measures the steady state with the adapters resident (needs len(keys) <= the engine's slots)."""
        slots = self.engine.adapters.max_loras
        if len(keys) > slots:
            raise RuntimeError(f"--warm: {len(keys)} adapters do not fit {slots} device slots")
        done = threading.Semaphore(0)
        box: list = []
        for key in keys:
            self.engine.warm(key, lambda c: (box.append(c), done.release()))
        deadline = time.monotonic() + timeout
        for _ in keys:
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"--warm: {len(box)}/{len(keys)} warm-ups done")
        failed = [c for c in box if c.status != "ok"]
        if failed:
            raise RuntimeError(f"--warm: warm-up failed: {failed[0].error_code} {failed[0].error_message}")
        missing = set(keys) - set(self.engine.resident())
        if missing:
            raise RuntimeError(f"--warm: {len(missing)} adapters not resident after warm-up, e.g. {sorted(missing)[0]}")

    def run(self, jobs: list[Job], keys: list[str], max_new: int, mode: str) -> RunResult:
        n = len(jobs)
        done = threading.Event()
        results: dict[str, tuple[float, object]] = {}
        lock = threading.Lock()

        def on_done(c):
            t = time.perf_counter()
            with lock:
                results[c.id] = (t, c)
                if len(results) == n:
                    done.set()

        submitted = {}
        steps0, loads0, sa0 = self.engine.steps, len(self.loads), len(self.step_adapters)
        sync(self.args.device)
        t0 = time.perf_counter()
        for job in jobs:
            delay = t0 + job.arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            submitted[job.id] = time.perf_counter()
            self.engine.submit(Request(job.id, f"t{int(job.id[1:]) % 4}", keys[job.adapter],
                                       prompt_ids=job.prompt, params=SamplingParams(max_new)), on_done)
        if not done.wait(3600):
            raise TimeoutError(f"lorabus: {len(results)}/{n} jobs done")
        end = max(t for t, _ in results.values())
        e2e, ttft, tokens, cold = [], [], 0, 0
        for job_id, (t, c) in results.items():
            if c.status != "ok":
                raise RuntimeError(f"lorabus job {job_id} failed: {c.error_code} {c.error_message}")
            tokens += len(c.token_ids)
            cold += c.cold
            latency = t - submitted[job_id]
            e2e.append(latency)
            # the engine's clock starts once submit has validated the job; shift to the call
            ttft.append(c.ttft_s + (latency - c.total_s))
        return RunResult("lorabus", len(keys), mode, n, tokens, end - t0, e2e, ttft,
                         {"distinct": len(set(j.adapter for j in jobs)), "steps": self.engine.steps - steps0, "loads": len(self.loads) - loads0, "cold_jobs": cold,
                          "adapters_per_step": round(statistics.fmean(self.step_adapters[sa0:] or [0]), 1)})

    def cold_start(self, keys: list[str], prompt_len: int) -> dict:
        """Sequential single jobs on never-seen adapters (not resident, not in the host cache)."""
        ttft, load = [], []
        for key in keys:
            loads0 = len(self.loads)
            c = self.engine.generate(Request(f"cold-{key}", "cold", key, prompt_ids=[5] * prompt_len,
                                             params=SamplingParams(1)), 600)
            assert c.status == "ok" and c.cold, c
            ttft.append(c.ttft_s)
            load.extend(self.loads[loads0:])
        warm = []
        for key in keys[:10]:  # the same adapters again, now resident: the first-token time without the load
            c = self.engine.generate(Request(f"warm-{key}", "cold", key, prompt_ids=[5] * prompt_len,
                                             params=SamplingParams(1)), 600)
            warm.append(c.ttft_s)
        return {"samples": len(ttft), "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                "load_p50_s": pct(load, 50), "load_p99_s": pct(load, 99), "warm_ttft_p50_s": pct(warm, 50),
                "warm_ttft_p99_s": pct(warm, 99)}


# ---- the baselines ------------------------------------------------------------------------------


class _FirstToken:
    """A logits processor that notes when generate's first forward pass has produced logits."""

    def __init__(self, device: str):
        self.device, self.at = device, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            sync(self.device)
            self.at = time.perf_counter()
        return scores


class Switching:
    """HF transformers + PEFT with every adapter loaded; per-adapter batches, run one after another.

    One PeftModel serves both baselines: `merged` selects how it switches adapters. Adapters are
    loaded incrementally (N = 1, then up to 8, ...), since PEFT's `load_adapter` walks every module
    of the model, so loading cost grows with the adapters already loaded (~0.1 s each at 60 on the
    small model): loading 512 twice would cost minutes of setup that is not part of serving.
    """

    def __init__(self, model_dir: Path, args):
        from transformers import AutoModelForCausalLM

        self.args, self.merged, self.mixed = args, False, False
        self.device = args.device
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        self.base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(args.device)
        self.model = None
        self.current: str | None = None  # active (and, if merged, merged-in) adapter
        self.load_s = 0.0

    def ensure(self, adapters) -> float:
        """Load the adapters not loaded yet; returns the seconds it took."""
        from peft import PeftModel

        started = time.perf_counter()
        for key, path in adapters:
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=key).eval()
            elif key not in self.model.peft_config:
                self.model.load_adapter(str(path), adapter_name=key)
        self.model.to(self.device)
        seconds = time.perf_counter() - started
        self.load_s += seconds
        return seconds

    def set_mode(self, merged: bool, mixed: bool = False) -> None:
        if self.merged and self.current is not None:
            self.model.unmerge_adapter()
            self.current = None
        self.merged, self.mixed = merged, mixed

    def close(self) -> None:
        self.set_mode(False)
        del self.model, self.base
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def switch(self, key: str) -> None:
        if key == self.current:
            return
        if self.merged and self.current is not None:
            self.model.unmerge_adapter()
        self.model.set_adapter(key)
        if self.merged:
            self.model.merge_adapter()
        self.current = key

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new: int,
                 adapter_names: list[str] | None = None) -> tuple[torch.Tensor, float | None]:
        ids = torch.tensor(prompts, device=self.device)
        first = _FirstToken(self.device)
        extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                  min_new_tokens=max_new, do_sample=False, pad_token_id=0, logits_processor=[first],
                                  **extra)
        sync(self.device)
        return out[:, ids.shape[1]:], first.at

    def warm(self, key: str, prompt_len: int, max_new: int) -> None:
        if self.mixed:
            self.generate([[5] * prompt_len], max_new, adapter_names=[key])
            return
        self.switch(key)
        self.generate([[5] * prompt_len], max_new)

    def run(self, jobs: list[Job], keys: list[str], max_new: int, mode: str) -> RunResult:
        name = "peft-mixed" if self.mixed else "merged" if self.merged else "per-adapter"
        queue: list[Job] = []
        e2e, ttft, tokens, batches, switches = [], [], 0, 0, 0
        pending = sorted(jobs, key=lambda j: j.arrival)
        sync(self.device)
        t0 = time.perf_counter()
        switch_s = 0.0
        while pending or queue:
            now = time.perf_counter() - t0
            while pending and pending[0].arrival <= now:
                queue.append(pending.pop(0))
            if not queue:
                time.sleep(max(0.0, pending[0].arrival - now))
                continue
            if self.mixed:  # PEFT mixed-adapter batch: the oldest queued jobs, whatever their adapters
                batch, queue = queue[: self.args.max_batch], queue[self.args.max_batch:]
                out, first_at = self.generate([j.prompt for j in batch], max_new,
                                              adapter_names=[keys[j.adapter] for j in batch])
            else:
                key = keys[queue[0].adapter]  # the adapter of the oldest queued job
                batch = [j for j in queue if keys[j.adapter] == key][: self.args.max_batch]
                taken = {j.id for j in batch}
                queue = [j for j in queue if j.id not in taken]
                s0 = time.perf_counter()
                switches += key != self.current
                self.switch(key)
                sync(self.device)
                switch_s += time.perf_counter() - s0
                out, first_at = self.generate([j.prompt for j in batch], max_new)
            end = time.perf_counter()
            batches += 1
            tokens += out.numel()
            for j in batch:
                e2e.append(end - (t0 + j.arrival))
                ttft.append(first_at - (t0 + j.arrival))
        seconds = time.perf_counter() - t0
        return RunResult(name, len(keys), mode, len(jobs), tokens, seconds, e2e, ttft,
                         {"distinct": len(set(j.adapter for j in jobs)), "batches": batches, "switches": switches, "switch_s": round(switch_s, 3)})

    def cold_start(self, adapters, prompt_len: int) -> dict:
        """Never-seen adapter on disk → first token: load_adapter (+ merge) + a 1-token generate."""
        ttft, load = [], []
        for key, path in adapters:
            sync(self.device)
            t0 = time.perf_counter()
            if self.merged and self.current is not None:  # PEFT would unmerge anyway when loading
                self.model.unmerge_adapter()
                self.current = None
            self.model.load_adapter(str(path), adapter_name=key)
            self.model.to(self.device)
            self.switch(key)  # merged: unmerge the previous adapter, merge this one
            sync(self.device)
            t1 = time.perf_counter()
            _, first_at = self.generate([[5] * prompt_len], 1)
            ttft.append(first_at - t0)
            load.append(t1 - t0)
            # untimed clean-up: back to the state before (nothing merged, the adapter gone)
            if self.merged:
                self.model.unmerge_adapter()
            other = next(k for k in self.model.peft_config if k != key)
            self.model.set_adapter(other)
            self.current = None if self.merged else other
            self.model.delete_adapter(key)
        return {"samples": len(ttft), "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                "load_p50_s": pct(load, 50), "load_p99_s": pct(load, 99)}


# ---- driver -------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import peft
    import transformers

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rotated(systems: list[str], rep: int) -> list[str]:
    """The systems' order in repeat `rep`: rotated by one per repeat, so no system always runs first."""
    k = rep % len(systems) if systems else 0
    return systems[k:] + systems[:k]


def bench(args, log=print) -> dict:
    """Per N (ascending), per repeat, each system in rotated order: saturated, then (unless --no-poisson)
    Poisson. lorabus gets a fresh engine per (N, repeat): nothing resident when its stream starts. The
    baselines share one PeftModel whose adapters are loaded incrementally (N = 1, then up to 8, ...)."""
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    counts = sorted(args.adapters)
    cold_n = args.cold_samples
    total = max(counts) + cold_n + 1
    if args.model:
        model_dir, all_adapters = model_assets(root, Path(args.model), total, log=log)
    else:
        model_dir, all_adapters = build_assets(root, args.model_shape, total, log=log)
    stream_adapters = all_adapters[: max(counts)]
    cold_adapters = all_adapters[max(counts): max(counts) + cold_n]
    warm_adapter = all_adapters[-1]
    vocab_size = json.loads((model_dir / "config.json").read_text()).get("vocab_size", 512)
    vocab = min(vocab_size, 500)
    report = {"machine": machine(), "config": {k: v for k, v in vars(args).items() if k != "json"}, "runs": [],
              "cold_start": {}}
    rate = args.rate
    systems = [s for s in SYSTEMS if s in args.systems]
    baselines = [s for s in systems if s != "lorabus"]
    if baselines and "lorabus" not in systems and rate is None and not args.no_poisson:
        sys.exit("--systems without lorabus needs --rate (the Poisson rate comes from lorabus's saturated run)")

    def record(result: RunResult, setup_s: float, rep: int) -> None:
        expect = result.jobs * args.max_new
        if result.extra.get("distinct") != result.adapters:
            raise RuntimeError(f"{result.system} ran {result.extra.get('distinct')} distinct adapters, expected {result.adapters}")
        if result.tokens != expect:
            raise RuntimeError(f"{result.system} generated {result.tokens} tokens, expected {expect}")
        result.extra["setup_s"] = round(setup_s, 2)
        report["runs"].append({**result.summary(), "rep": rep})
        log(f"[rep {rep}] {result.system:12s} N={result.adapters:4d} {result.mode:9s} {result.tok_s:9.1f} tok/s  "
            f"e2e p50 {pct(result.e2e, 50):7.3f}s p99 {pct(result.e2e, 99):7.3f}s  ttft p50 {pct(result.ttft, 50):7.3f}s "
            f"p99 {pct(result.ttft, 99):7.3f}s  {result.extra}")

    def record_cold(system: str, cold: dict) -> None:
        cold["prompt_tokens"] = COLD_PROMPT
        report["cold_start"][system] = cold
        log(f"{system:12s} cold start: ttft p50 {cold['ttft_p50_s'] * 1e3:.1f} ms, p99 {cold['ttft_p99_s'] * 1e3:.1f} ms; "
            f"load p50 {cold['load_p50_s'] * 1e3:.1f} ms, p99 {cold['load_p99_s'] * 1e3:.1f} ms")

    def stream(n: int, r: float | None) -> list[Job]:
        jobs = job_stream(args.seed + n, n, max(args.jobs, n), args.prompt_len, vocab, r)
        assert len({j.adapter for j in jobs}) == n, "the stream must use exactly N distinct adapters"
        return jobs

    def run_lorabus(n: int, rep: int) -> None:
        nonlocal rate
        adapters = stream_adapters[:n]
        started = time.perf_counter()
        server = Lorabus(model_dir, adapters + [warm_adapter], args, also_register=cold_adapters)
        setup_s = time.perf_counter() - started
        try:
            keys = [k for k, _ in adapters]
            if args.warm:  # the stream's own adapters take the throwaway adapter's place (it would take a slot)
                server.preload(keys)
                server.warm(keys[0], args.prompt_len, args.max_new)
            else:
                server.warm(warm_adapter[0], args.prompt_len, args.max_new)
            result = server.run(stream(n, None), keys, args.max_new, "saturated")
            if args.warm and result.extra["loads"]:
                raise RuntimeError(f"--warm: {result.extra['loads']} adapter loads during the timed run at N={n}")
            record(result, setup_s, rep)
            if rate is None and not args.no_poisson:
                rate = round(args.load * result.jobs / result.seconds, 2)
                report["config"]["rate"] = rate
                log(f"poisson rate: {rate} jobs/s ({args.load:.0%} of lorabus's saturated job rate at N={n})")
            if not args.no_poisson:
                record(server.run(stream(n, rate), keys, args.max_new, "poisson"), setup_s, rep)
            if n == counts[0] and rep == 0:
                record_cold("lorabus", server.cold_start([k for k, _ in cold_adapters], COLD_PROMPT))
        finally:
            server.close()
        del server  # the engine's pool and KV cache go before the baselines run
        if args.device == "cuda":
            torch.cuda.empty_cache()

    def run_baseline(server: Switching, system: str, n: int, rep: int, setup_s: float) -> None:
        keys = [k for k, _ in stream_adapters[:n]]
        server.set_mode(system == "merged", mixed=system == "peft-mixed")
        server.warm(warm_adapter[0], args.prompt_len, args.max_new)
        modes = [("saturated", None)] if args.no_poisson else [("saturated", None), ("poisson", rate)]
        for mode, r in modes:
            record(server.run(stream(n, r), keys, args.max_new, mode), setup_s, rep)
        if n == counts[0] and rep == 0 and system != "peft-mixed":
            # on the fewest adapters loaded: PEFT's loading is cheapest there (peft-mixed loads as per-adapter does)
            record_cold(system, server.cold_start(cold_adapters, COLD_PROMPT))

    switching = Switching(model_dir, args) if baselines else None
    try:
        for n in counts:
            skip = bool(args.baseline_max_adapters and n > args.baseline_max_adapters)
            if skip and baselines:
                log(f"baselines skipped at N={n} (--baseline-max-adapters {args.baseline_max_adapters})")
            setup_s = 0.0
            if baselines and not skip:
                switching.set_mode(False)
                setup_s = switching.ensure(stream_adapters[:n] + [warm_adapter])
            for rep in range(args.repeats):
                for system in rotated(systems, rep):
                    if system == "lorabus":
                        run_lorabus(n, rep)
                    elif not skip:
                        run_baseline(switching, system, n, rep, setup_s)
    finally:
        if switching is not None:
            switching.close()
    return report


def cold_1b(args, log=print) -> dict:
    """lorabus cold start for rank-16 adapters of the 1B-class shape (q,k,v,o and all seven projections)."""
    root = Path(args.workdir)
    out = {"shape": SHAPES["1b"]}
    started = time.perf_counter()
    model_dir, qkvo = build_assets(root, "1b", args.cold_samples + 1, log=log)
    all7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    _, full = build_assets(root, "1b", args.cold_samples, targets=all7, log=log)
    out["build_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    engine = Engine(str(model_dir), EngineConfig(device=args.device, max_lora_rank=RANK, max_loras=8,
                                                 max_running=8, kv_cache_mb=256))
    out["engine_init_s"] = round(time.perf_counter() - started, 1)
    for key, path in qkvo + [(f"all7-{k}", p) for k, p in full]:
        engine.register(AdapterSpec(key, str(path)))
    server = Lorabus.__new__(Lorabus)
    server.engine, server.args = engine, args
    server._hook(engine)
    engine.start()
    try:
        server.warm(qkvo[-1][0], 4, 1)
        for label, keys in (("q,k,v,o", [k for k, _ in qkvo[:-1]]), ("all 7", [f"all7-{k}" for k, _ in full])):
            size = sum(os.path.getsize(p / "adapter_model.safetensors") for _, p in (qkvo[:1] if label == "q,k,v,o" else full[:1]))
            cold = server.cold_start(keys, 4)
            cold["adapter_mb"] = round(size / 2**20, 1)
            out[label] = cold
            log(f"1b cold start ({label}, {cold['adapter_mb']} MB): load p50 {cold['load_p50_s'] * 1e3:.1f} ms "
                f"p99 {cold['load_p99_s'] * 1e3:.1f} ms; first token p50 {cold['ttft_p50_s'] * 1e3:.1f} ms "
                f"p99 {cold['ttft_p99_s'] * 1e3:.1f} ms (warm first token p50 {cold['warm_ttft_p50_s'] * 1e3:.1f} ms)")
    finally:
        engine.stop()
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "-"


def _mmm(values: list[float], fmt: str) -> str:
    """median [min..max] of the repeats."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1 or format(min(values), fmt) == format(max(values), fmt):
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}..{format(max(values), fmt)}]"


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (N, mode, system) over the repeats; ratios to lorabus are paired by repeat (the runs of
    one repeat ran back to back), then summarised as median [min..max]."""
    ref = {(r["adapters"], r["mode"], r.get("rep", 0)): r for r in runs if r["system"] == "lorabus"}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["adapters"], r["mode"], r["system"]), []).append(r)
    out = []
    for (n, mode, system), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], SYSTEMS.index(kv[0][2]))):
        row = {"adapters": n, "mode": mode, "system": system, "repeats": len(rows)}
        for key in ("tok_s", "e2e_p50_s", "e2e_p99_s", "ttft_p50_s", "ttft_p99_s"):
            row[key] = [r[key] for r in rows]
            base = [ref.get((n, mode, r.get("rep", 0))) for r in rows]
            row[f"x_{key}"] = [r[key] / b[key] for r, b in zip(rows, base) if b and b[key]]
        out.append(row)
    return out


def markdown_repeats(report: dict) -> list[str]:
    lines = []
    rows = aggregate(report["runs"])
    for mode in ("saturated", "poisson"):
        these = [r for r in rows if r["mode"] == mode]
        if not these:
            continue
        rate = report["config"].get("rate")
        reps = sorted({r["repeats"] for r in these})
        lines.append(f"**{mode}**" + (f" (Poisson arrivals, {rate} jobs/s)" if mode == "poisson" else
                                      " (all jobs submitted at t=0)")
                     + f"; median [min..max] of {'/'.join(map(str, reps))} interleaved repeats"
                     + ("; **lorabus warm** (`--warm`: the run's adapters resident before timing)"
                        if report["config"].get("warm") else "; lorabus cold (no stream adapter resident at start)"))
        lines.append("")
        lines.append("| N adapters | system | tok/s | x lorabus | e2e p50 s | e2e p99 s | x lorabus (p99) "
                     "| TTFT p50 s | TTFT p99 s | x lorabus (p99) |")
        lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in these:
            lines.append(
                f"| {r['adapters']} | {r['system']} | {_mmm(r['tok_s'], '.0f')} | {_mmm(r['x_tok_s'], '.2f')} "
                f"| {_mmm(r['e2e_p50_s'], '.3f')} | {_mmm(r['e2e_p99_s'], '.3f')} | {_mmm(r['x_e2e_p99_s'], '.2f')} "
                f"| {_mmm(r['ttft_p50_s'], '.3f')} | {_mmm(r['ttft_p99_s'], '.3f')} | {_mmm(r['x_ttft_p99_s'], '.2f')} |")
        lines.append("")
    return lines


def markdown(report: dict) -> str:
    lines = []
    runs = report["runs"]
    if report["config"].get("repeats", 1) > 1:
        lines = markdown_repeats(report)
        runs = []
    ref = {(r["adapters"], r["mode"]): r for r in runs if r["system"] == "lorabus"}
    for mode in ("saturated", "poisson"):
        rows = [r for r in runs if r["mode"] == mode]
        if not rows:
            continue
        rate = report["config"].get("rate")
        lines.append(f"**{mode}**" + (f" (Poisson arrivals, {rate} jobs/s)" if mode == "poisson" else
                                      " (all jobs submitted at t=0)")
                     + ("; **lorabus warm** (`--warm`)" if report["config"].get("warm") else ""))
        lines.append("")
        lines.append("| N adapters | system | tok/s | x lorabus | e2e p50 s | e2e p99 s | x lorabus (p99) "
                     "| TTFT p50 s | TTFT p99 s | x lorabus (p99) |")
        lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(rows, key=lambda r: (r["adapters"], SYSTEMS.index(r["system"]))):
            base = ref.get((r["adapters"], mode))
            lines.append(
                f"| {r['adapters']} | {r['system']} | {r['tok_s']:.0f} | {_ratio(r['tok_s'], base['tok_s']) if base else '-'} "
                f"| {r['e2e_p50_s']:.3f} | {r['e2e_p99_s']:.3f} | {_ratio(r['e2e_p99_s'], base['e2e_p99_s']) if base else '-'} "
                f"| {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {_ratio(r['ttft_p99_s'], base['ttft_p99_s']) if base else '-'} |")
        lines.append("")
    cold = report.get("cold_start") or {}
    if cold:
        lb = cold.get("lorabus")
        lines.append("**cold start** (never-seen adapter on local disk → first token, 4-token prompt, idle server)")
        lines.append("")
        lines.append("| system | samples | p50 ms | p99 ms | x lorabus (p99) | load part p50 ms | load part p99 ms |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for name in SYSTEMS:
            c = cold.get(name)
            if c:
                lines.append(f"| {name} | {c['samples']} | {c['ttft_p50_s'] * 1e3:.1f} | {c['ttft_p99_s'] * 1e3:.1f} | "
                             f"{_ratio(c['ttft_p99_s'], lb['ttft_p99_s']) if lb else '-'} | "
                             f"{c['load_p50_s'] * 1e3:.1f} | {c['load_p99_s'] * 1e3:.1f} |")
        lines.append("")
    goals = report.get("goals")
    if goals:
        lines.append("**goals**")
        lines.append("")
        for g in goals:
            lines.append(f"- {g}")
        lines.append("")
    return "\n".join(lines)


def goals(report: dict) -> list[str]:
    sat = {(r["system"], r["adapters"]): statistics.median(r["tok_s"]) for r in aggregate(report["runs"])
           if r["mode"] == "saturated"}  # the median over the repeats
    out = []
    one = sat.get(("lorabus", 1))
    for n in (64, 512):
        if one and ("lorabus", n) in sat:
            x = sat[("lorabus", n)] / one
            out.append(f"lorabus throughput with {n} adapters = {x:.2f}x single-adapter (goal >= 0.8x): "
                       f"{'met' if x >= 0.8 else 'MISSED'}")
    if ("lorabus", 64) in sat and ("per-adapter", 64) in sat:
        x = sat[("lorabus", 64)] / sat[("per-adapter", 64)]
        out.append(f"lorabus vs per-adapter serving at 64 adapters = {x:.2f}x (goal >= 5x): {'met' if x >= 5 else 'MISSED'}")
    # issue 11 targets, as ratios paired within a repeat (median [min..max] of the repeats)
    rows = {(r["system"], r["adapters"]): r for r in aggregate(report["runs"]) if r["mode"] == "saturated"}
    for n, goal in ((64, 0.85), (512, 0.8)):
        if one and ("lorabus", n) in sat:
            x = sat[("lorabus", n)] / one
            out.append(f"issue 11: lorabus {n} adapters / 1 adapter throughput = {x:.3f}x (target >= {goal}x): "
                       f"{'met' if x >= goal else 'MISSED'}")
    for system, goal in (("peft-mixed", 3.0), ("per-adapter", 4.0)):
        r = rows.get((system, 64))
        if r and r["x_tok_s"]:
            inv = [1 / v for v in r["x_tok_s"]]
            x = statistics.median(inv)
            out.append(f"issue 11: lorabus vs {system} at 64 adapters, saturated = {_mmm(inv, '.2f')}x "
                       f"(target >= {goal:g}x): {'met' if x >= goal else 'MISSED'}")
    cold = (report.get("cold_start") or {}).get("lorabus")
    if cold:
        p99 = cold["ttft_p99_s"] * 1e3
        out.append(f"lorabus p99 cold start ({report['config'].get('model') or report['config']['model_shape']} model) = {p99:.1f} ms (goal < 100 ms): "
                   f"{'met' if p99 < 100 else 'MISSED'}")
    big = report.get("cold_1b")
    if big:
        for label in ("q,k,v,o", "all 7"):
            c = big.get(label)
            if c:
                out.append(f"1B-class, rank-16 on {label} ({c['adapter_mb']} MB): load path p99 "
                           f"{c['load_p99_s'] * 1e3:.1f} ms, cold first token p99 {c['ttft_p99_s'] * 1e3:.1f} ms "
                           f"(warm first token p50 {c['warm_ttft_p50_s'] * 1e3:.1f} ms)")
    return out


def draw(report: dict, json_path: str) -> list[Path]:
    """The chart beside the JSON: saturated throughput against the number of distinct adapters, per system."""
    runs = [r for r in report["runs"] if r["mode"] == "saturated"]
    if not runs:
        return []
    series: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        series.setdefault(r["system"], {}).setdefault(r["adapters"], []).append(r["tok_s"])
    m, cfg = report["machine"], report["config"]
    subtitle = (f"{cfg.get('model') or cfg.get('model_shape')} model, {m['cpu']}, {m['torch_threads']} torch threads; "
                f"median [min..max] of {cfg.get('repeats')} repeats")
    return [charts.line_chart(charts.png_beside(json_path), "Throughput against distinct adapters (saturated)",
                              "distinct adapters (Zipf popularity)", "generated tokens/s", series, log_x=True, log_y=True,
                              subtitle=subtitle)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer jobs, N in {1, 8, 64} (~2-3 min on 2 CPU cores)")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--model-shape", default=None, choices=tuple(SHAPES),
                   help="default: small on cpu, 1b on cuda")
    p.add_argument("--model", metavar="DIR", help="benchmark on this Hugging Face model directory instead of a built-in "
                   "random shape (e.g. the dir `lorabus model fetch` prints); eos removed in a symlinked view, random "
                   "rank-16 adapters made for its shapes")
    p.add_argument("--repeats", type=int, default=5, help="repeat every (N, system) run this many times, systems "
                   "interleaved in rotated order; tables give median [min..max]")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default); recorded")
    p.add_argument("--adapters", type=int, nargs="+", help="N values (default 1 8 64 512; --quick: 1 8 64)")
    p.add_argument("--jobs", type=int, help="jobs per run (default 256; --quick 96)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32, help="lorabus max_running and the baselines' batch size")
    p.add_argument("--max-loras", type=int, default=0, help="lorabus device slots (0 = engine default, at most 64)")
    p.add_argument("--max-step-tokens", type=int, default=0, help="lorabus tokens per step (0 = engine default)")
    p.add_argument("--kv-cache-mb", type=int, default=0, help="lorabus KV budget (0 = engine default)")
    p.add_argument("--rate", type=float, help="Poisson arrival rate in jobs/s (default: --load x lorabus saturated)")
    p.add_argument("--load", type=float, default=0.6, help="Poisson rate as a fraction of lorabus's saturated job rate")
    p.add_argument("--no-poisson", action="store_true", help="saturated runs only")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--baseline-max-adapters", type=int, default=None,
                   help="skip the baselines above this N (default: none; 64 for the 1b shape, where PEFT takes "
                        "~15 min to load 512 adapters: its load_adapter walks every module, so it gets slower "
                        "with each adapter loaded)")
    p.add_argument("--cold-samples", type=int, default=None, help="never-seen adapters per cold-start measurement")
    p.add_argument("--warm", action="store_true",
                   help="lorabus steady state: load the run's N adapters into device slots (and run one warm-up "
                        "job on each) before the timed part, instead of starting with none resident; needs every "
                        "N <= the device slots (--max-loras, 64 at most), checked: the timed run must load nothing. "
                        "The baselines are unchanged (they always have every adapter loaded before timing)")
    p.add_argument("--cold-1b", action="store_true", help="also measure lorabus cold start on the 1B-class shape")
    p.add_argument("--only-cold-1b", action="store_true", help="only the 1B-class cold-start measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lorabus-bench-serving"),
                   help="where the model and adapters are built (reused across runs)")
    args = p.parse_args(argv)
    if args.model_shape is None:
        args.model_shape = "1b" if args.device == "cuda" else "small"
    if args.baseline_max_adapters is None and args.model_shape == "1b":
        args.baseline_max_adapters = 64
    if args.adapters is None:
        args.adapters = [1, 8, 64] if args.quick else [1, 8, 64, 512]
    if args.jobs is None:
        args.jobs = 96 if args.quick else 256
    if args.cold_samples is None:
        args.cold_samples = 10 if args.quick else 30
    args.cold_systems = list(args.systems)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warm and max(args.adapters) > (args.max_loras or 64):
        sys.exit(f"--warm needs every N <= the device slots ({args.max_loras or 64}); got N = {max(args.adapters)}")
    if args.model and (args.cold_1b or args.only_cold_1b):
        sys.exit("--model and --cold-1b/--only-cold-1b do not go together")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"serving benchmark: {args.model or args.model_shape} model on {args.device} ({torch.get_num_threads()} torch "
        f"threads), N={args.adapters}, {args.jobs} jobs of {args.prompt_len}+{args.max_new} tokens, max batch "
        f"{args.max_batch}, {args.repeats} repeat(s)")
    started = time.perf_counter()
    if args.only_cold_1b:
        report = {"machine": machine(), "config": {k: v for k, v in vars(args).items() if k != "json"}, "runs": [],
                  "cold_start": {}}
    else:
        report = bench(args, log)
    if args.cold_1b or args.only_cold_1b:
        report["cold_1b"] = cold_1b(args, log)
    report["goals"] = goals(report)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["script"] = "serving"
    text = markdown(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {args.json}")
        for png in draw(report, args.json):
            log(f"wrote {png}")


if __name__ == "__main__":
    main()
