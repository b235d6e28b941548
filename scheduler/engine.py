"""The engine: the step thread that runs the step loop over the model, and the API the worker calls.

`Engine` wires the parts together: the model and its paged KV cache, the model runner
(scheduler/runner.py), the adapter tiers and their loader thread (scheduler/adapter_manager.py), the
scheduling policy (scheduler/policy.py), and the step loop (scheduler/step_loop.py) that drives them.
`submit` is the hand-off from the caller's thread: it validates and tokenizes a `Request`
(scheduler/requests.py) and queues it; the step thread runs it and calls its `on_done` with a
`Completion`.

Stopping cannot hang: `stop` lets the step thread finish what it holds (the loader keeps loading
meanwhile, so jobs waiting on an adapter still run) for at most `timeout_s`, then answers every job
still held `internal`, and joins each thread for at most `THREAD_JOIN_S`. Every submitted job is
answered exactly once, also one submitted while or after the engine stops.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Callable

import torch

from lorabus.scheduler.adapter_manager import AdapterManager, AdapterSpec, warmup_request
from lorabus.scheduler.attention_tuning import choose_attention, probe_points
from lorabus.scheduler.config import EngineConfig
from lorabus.scheduler.decode_graphs import choose_mode
from lorabus.scheduler.grammar import GrammarError, Grammars
from lorabus.scheduler.kv_cache import BlockAllocator, PagedKVCache
from lorabus.scheduler.lora import plan_tuner, startup_steps
from lorabus.scheduler.model import CausalLM
from lorabus.scheduler.policy import AdapterSlots, Scheduler, SchedulerLimits
from lorabus.scheduler.requests import (Completion, Request, RequestError, RequestLimits, Sequence, StopRules, call_hook,
                                        deliver, validate)
from lorabus.scheduler.runner import ModelRunner
from lorabus.scheduler.sampling import Sampler
from lorabus.scheduler.step_loop import REPLAN_S, STOPPED, Invalidate, Outcome, Prefetch, StepLoop, Submit

log = logging.getLogger(__name__)

IDLE_S = 0.5  # the step thread's wait with nothing held (a submission wakes it at once)
# Once the drain is over, how long stop() waits for each thread (a step or an adapter read in progress).
THREAD_JOIN_S = 2.0
# Sizing when --kv-cache-mb / --max-step-tokens are 0.
KV_FREE_MEMORY_SHARE = 0.4  # of free GPU memory
CPU_KV_BYTES = 2**30
MIN_KV_BLOCKS = 2
STEP_TOKENS = {"cuda": 8192, "cpu": 512}


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _memory_bytes(device: torch.device) -> tuple[int, int]:
    """(total, free) memory of the device the pool and cache live on."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages, avail


def _eos_ids(eos) -> frozenset[int]:
    return frozenset(i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int) and not isinstance(i, bool))


def _generation_eos(model_dir: str):
    """generation_config.json's eos_token_id, which Hugging Face's `generate` stops on: instruct models often
    list their end-of-turn token(s) there only. None when the file is absent or unreadable."""
    try:
        with open(os.path.join(model_dir, "generation_config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config.get("eos_token_id") if isinstance(config, dict) else None


def _has_tokenizer(model_dir: str) -> bool:
    return any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


class Engine:
    def __init__(self, model_dir: str, config: EngineConfig | None = None, clock: Callable[[], float] = time.monotonic):
        from transformers import AutoTokenizer

        self.config = config = config or EngineConfig()
        device_name = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device_name)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        self.clock = clock
        self.model = model = CausalLM.from_pretrained(model_dir, self.device, self.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir) if _has_tokenizer(model_dir) else None
        # What ends a sequence ("stop"): config.json's end-of-sequence id(s) and generation_config.json's.
        self.eos_ids = eos_ids = _eos_ids(model.config.eos_token_id) | _eos_ids(_generation_eos(model_dir))
        self.max_model_len = config.max_model_len or model.max_context

        total, free = _memory_bytes(self.device)  # measured once, before the pool and the cache take theirs
        self.adapters = AdapterManager(model.shapes, config, self.dtype, self.device, device_bytes=total)
        kv_budget = config.kv_cache_mb * 2**20 or (
            int(KV_FREE_MEMORY_SHARE * free) if self.device.type == "cuda" else CPU_KV_BYTES)
        per_block = PagedKVCache.bytes_per_block(
            model.shapes.num_layers, config.kv_block_size, model.num_kv_heads, model.head_dim, self.dtype
        )
        num_blocks = max(MIN_KV_BLOCKS, kv_budget // per_block)
        self.kv = PagedKVCache(model.shapes.num_layers, num_blocks, config.kv_block_size, model.num_kv_heads,
                               model.head_dim, self.dtype, self.device)
        model.attach(self.adapters.pool, self.kv, config.attention_backend)
        max_step_tokens = config.max_step_tokens or STEP_TOKENS.get(self.device.type, STEP_TOKENS["cpu"])
        self.scheduler = Scheduler(
            SchedulerLimits(config.max_running, max(max_step_tokens, config.max_running), config.max_wait_ms / 1000),
            BlockAllocator(num_blocks, config.kv_block_size, config.prefix_cache, publishable=self.kv.finite),
            AdapterSlots(self.adapters.max_loras),
        )
        self.limits = RequestLimits(model.vocab_size, self.max_model_len, num_blocks * config.kv_block_size)
        pool = self.adapters.pool
        pool.tuner = plan_tuner(pool, config.plan_tuning, config.plan_cache_dir)

        def make_runner() -> ModelRunner:
            return ModelRunner(model, self.kv, self.adapters.max_loras, self.device,
                               max_step_tokens=self.scheduler.limits.max_step_tokens, max_running=config.max_running,
                               decode_mode=choose_mode(config.cuda_graphs, model),
                               max_blocks=min(num_blocks, -(-self.max_model_len // config.kv_block_size)))

        # Before any step, so serving does not pay for tuning mid-run: the attention backend (fixed from here
        # on), then the LoRA plans in what is left of the budget.
        tuning_started = time.monotonic()
        if config.attention_backend == "auto" and self.device.type == "cpu":
            points = probe_points(config.max_running, self.max_model_len, self.kv)
            model.attach(pool, self.kv, choose_attention(model, self.kv, pool.tuner, make_runner, points,
                                                         config.plan_tuning_budget_s))
        if config.plan_tuning == "startup":
            pool.tune(startup_steps(config.max_running, self.adapters.max_loras, self.scheduler.limits.max_step_tokens),
                      max(0.0, config.plan_tuning_budget_s - (time.monotonic() - tuning_started)))
        self.runner = make_runner()
        self.grammars = Grammars(self.tokenizer, model.vocab_size, eos_ids, config.max_grammars)
        stops = StopRules(self.tokenizer, eos_ids, self.max_model_len)
        self.loop = StepLoop(self.scheduler, self.runner, self.adapters, stops, clock)
        self.adapters.notify = self.loop.wake.set
        self._step_thread: threading.Thread | None = None
        self._stopping = False
        self._stop_at: float | None = None  # time.monotonic() past which a stopping step thread gives up
        self._closed = False  # stop() is done with the step thread: submissions are answered at once
        self._intake_lock = threading.Lock()
        # on_iteration() on the step thread after each iteration of the step loop, i.e. after the answers of
        # one step: a caller that collects on_done answers can hand them over in one go (worker/handoff.py).
        self.on_iteration: Callable[[], None] | None = None
        log.info(
            "engine: %s %s, %d adapter slots (rank %d), %d host adapters, KV %d tokens, %d step tokens, "
            "%s attention, %s decode",
            self.device, self.dtype, self.adapters.max_loras, config.max_lora_rank, self.adapters.max_cpu_loras,
            self.limits.kv_tokens, self.scheduler.limits.max_step_tokens, model.attention.name, self.runner.decode.mode,
        )

    # ---- metrics hooks, called from the engine's threads ------------------------------------------

    @property
    def on_step(self) -> Callable[[int, int, int, float], None] | None:
        """on_step(sequences, tokens, distinct_adapters, seconds) after every forward pass."""
        return self.runner.on_step

    @on_step.setter
    def on_step(self, hook: Callable[[int, int, int, float], None] | None) -> None:
        self.runner.on_step = hook

    @property
    def on_load(self) -> Callable[[str, float, str | None, str], None] | None:
        """on_load(key, seconds, error, source) after every adapter load; source: "host" (the host cache) or
        "disk" (the adapter's files)."""
        return self.adapters.on_load

    @on_load.setter
    def on_load(self, hook: Callable[[str, float, str | None, str], None] | None) -> None:
        self.adapters.on_load = hook

    @property
    def steps(self) -> int:
        return self.runner.steps

    @property
    def alive(self) -> bool:
        """The step thread is running: started and not yet stopped (a health check reads this)."""
        return self._step_thread is not None and self._step_thread.is_alive()

    # ---- called from any thread -------------------------------------------------------------------

    def start(self) -> None:
        self.adapters.start()
        self._step_thread = threading.Thread(target=self._step_thread_main, name="lorabus-step", daemon=True)
        self._step_thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish the submitted jobs, for at most `timeout_s` (default `config.stop_timeout_s`); answer the rest
        `internal`; stop the threads. Returns within timeout_s + 2 * THREAD_JOIN_S."""
        timeout_s = self.config.stop_timeout_s if timeout_s is None else timeout_s
        self._stop_at = time.monotonic() + timeout_s
        self._stopping = True
        self.loop.wake.set()
        if self._step_thread is not None:
            # The step thread checks the deadline between steps: one step may run past it.
            self._step_thread.join(timeout_s + THREAD_JOIN_S)
            if self._step_thread.is_alive():
                log.error("the step thread is still in a step %.1f s past the drain; answering its jobs from here",
                          THREAD_JOIN_S)
        with self._intake_lock:
            self._closed = True
        # What a submission raced in after the step thread left, or all it held if it is stuck.
        self.loop.abort()
        # The loader stops only now: until the step thread is done, its jobs may still wait on a load.
        if not self.adapters.stop(THREAD_JOIN_S):
            log.error("the adapter loader did not stop within %.1f s (a read in progress); left behind", THREAD_JOIN_S)

    def register(self, spec: AdapterSpec) -> None:
        """Make an adapter known (published). Re-registering a key with new content invalidates caches."""
        old = self.adapters.register(spec)
        if old is not None:
            self.loop.put(Invalidate(old))

    def prefetch(self, key: str, free_slot_only: bool = False) -> None:
        """Load an adapter into the host tier ahead of traffic (and into a device slot if one is free);
        with `free_slot_only`, only when a device slot is free: then neither an eviction nor a host-only load."""
        self.loop.put(Prefetch(key, free_slot_only))

    def set_adapter_affinity(self, scores: dict[str, float]) -> None:
        """Which adapters this engine's share of the traffic brings, and how much (e.g. recent job counts):
        idle device slots of lower-scored adapters are evicted first, unknown keys score 0. Replaces the
        previous hint; one reference swap, so any thread may call it."""
        self.scheduler.slots.affinity = dict(scores)

    def submit(self, request: Request, on_done: Callable[[Completion], None]) -> None:
        """Queue a request; `on_done` is called exactly once, from the step thread (or here on bad input)."""
        self.submit_many([(request, on_done)])

    def submit_many(self, submissions: list[tuple[Request, Callable[[Completion], None]]]) -> None:
        """Queue several requests in one call (a worker hands over every job of one poll from one thread):
        each is checked and tokenized as `submit` does, and a bad one is answered here, alone; the rest reach
        the step thread together, under one intake lock. Each `on_done` is called exactly once."""
        seqs = []
        for request, on_done in submissions:
            try:
                seqs.append(self._sequence(request, on_done))
            except RequestError as exc:
                deliver(on_done, Completion(request.id, "error", error_code=exc.code, error_message=exc.message))
            except Exception as exc:  # a request we could not even read must still be answered
                log.exception("submit of %s failed", request.id)
                deliver(on_done, Completion(request.id, "error", error_code="internal",
                                            error_message=f"{type(exc).__name__}: {exc}"))
        with self._intake_lock:
            if not self._closed:
                self.loop.put_many([Submit(seq) for seq in seqs])
                return
        for seq in seqs:
            deliver(seq.on_done, Completion(seq.request.id, "error", error_code="internal", error_message=STOPPED))

    def warm(self, key: str, on_done: Callable[[Completion], None]) -> None:
        """Load an adapter and run one dummy step on it, so live traffic never pays its first-step costs.
        The warm-up is a job like any other: stop() drains or answers it. It tries the disk again even
        when the adapter failed to load before (its file may have been restored since)."""
        self.adapters.retry(key)
        self.submit(warmup_request(key), on_done)

    def generate(self, request: Request, timeout: float | None = None) -> Completion:
        """Blocking convenience for scripts and tests."""
        done = threading.Event()
        box: list[Completion] = []
        self.submit(request, lambda c: (box.append(c), done.set()))
        if not done.wait(timeout):
            raise TimeoutError(request.id)
        return box[0]

    def stats(self) -> dict[str, float]:
        slots = self.scheduler.slots
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "adapter_slots": len(slots),
            "adapter_slots_used": sum(k is not None for k in slots.key_of),
            "adapter_slots_pinned": sum(r > 0 for r in slots.refs),
            "host_adapters": len(self.adapters.host_cache),
            "kv_blocks": self.scheduler.blocks.num_blocks,
            "kv_blocks_used": self.scheduler.blocks.num_blocks - self.scheduler.blocks.num_free,
            "kv_blocks_cached": self.scheduler.blocks.num_cached,
            "prefix_cache_queried_tokens": self.scheduler.blocks.queried_tokens,
            "prefix_cache_hit_tokens": self.scheduler.blocks.hit_tokens,
        }

    def prefix_cache_stats(self) -> dict[str, int]:
        """The prefix cache since start: prompt tokens of admitted jobs looked up (those in full blocks before
        each one's last prompt token: what the cache could serve) and found cached (their prefill skipped),
        and the blocks it holds now (`stats` exports the same)."""
        blocks = self.scheduler.blocks
        return {"queried_tokens": blocks.queried_tokens, "hit_tokens": blocks.hit_tokens,
                "cached_blocks": blocks.num_cached}

    def resident(self) -> list[str]:
        """The adapters loaded in a device slot."""
        slots = self.scheduler.slots
        return [k for s, k in enumerate(slots.key_of) if k is not None and slots.ready[s]]

    def spec(self, key: str) -> AdapterSpec | None:
        """The registered spec of `key` (what a mix of it is built from); None if it is not registered."""
        return self.adapters.spec(key)

    def plans(self, limit: int | None = None) -> list[dict]:
        """The CPU path's choices by measurement (kernels/plan_tuner.py): group, shape class, plan, source and
        each candidate's time (µs); the LoRA plans per projection group, and the attention backend's start-up
        probe points (group "attention", scheduler/attention_tuning.py). At most `limit`, taken from each group
        in turn. Empty on the Triton path."""
        return self.adapters.pool.plans(limit)

    def host_cached(self) -> int:
        """How many adapters the host-memory tier holds."""
        return len(self.adapters.host_cache)

    def _sequence(self, request: Request, on_done: Callable[[Completion], None]) -> Sequence:
        ids = validate(request, self.tokenizer, self.limits)
        if request.adapter is not None and not self.adapters.knows(request.adapter):
            raise RequestError("adapter_not_found", f"adapter {request.adapter} is not registered")
        if request.n > self.scheduler.limits.max_running:
            raise RequestError("invalid_job", f"n {request.n} exceeds the {self.scheduler.limits.max_running} "
                                              "sequences a batch holds (--max-running)")
        now = self.clock()
        deadline = None if request.deadline is None else now + (request.deadline - time.time())
        constraint = None
        if request.output_format is not None:  # compiled (or found) before the job takes a slot
            try:
                constraint = self.grammars.constraint(request.output_format)
            except GrammarError as exc:
                raise RequestError("invalid_job", f"response_format: {exc}") from None
        seq = Sequence(request, ids, now, on_done, deadline=deadline,
                       sampler=Sampler(request.params, self.device, self.eos_ids, constraint))
        spec = self.adapters.spec(request.adapter) if request.adapter is not None else None
        seq.adapter_parts = tuple(member.key for member, _ in spec.members) if spec is not None else ()
        for index in range(1, request.n):  # the other choices: same prompt, own sampler (seed + index)
            choice = Sequence(request, ids, now, on_done, deadline=deadline,
                              sampler=Sampler(request.params, self.device, self.eos_ids,
                                              constraint.copy() if constraint is not None else None, index))
            choice.index, choice.parent = index, seq
            choice.logprobs = [] if request.params.logprobs is not None else None
            choice.prompt_logprobs = None
            seq.choices.append(choice)
        if not self.scheduler.admissible(seq):  # in whole KV blocks, shared prompt blocks counted once
            raise RequestError("prompt_too_long", f"{len(ids)} prompt + {request.n} x {request.params.max_new_tokens} "
                                                  "new tokens need more KV cache blocks than there are")
        return seq

    # ---- the step thread --------------------------------------------------------------------------

    def _step_thread_main(self) -> None:
        loop = self.loop
        while True:
            if self._stop_at is not None and time.monotonic() >= self._stop_at:
                loop.abort()
                call_hook(self.on_iteration)
                return
            try:
                outcome = loop.iterate()
            except Exception as exc:  # a bug outside any one job: what the policy holds cannot go on
                log.exception("step loop iteration failed")
                try:
                    loop.fail_all(exc)
                except Exception:
                    log.exception("answering the jobs of a failed iteration failed")
                call_hook(self.on_iteration)
                loop.wake.wait(REPLAN_S)  # a failure that repeats must not spin a core
                continue
            call_hook(self.on_iteration)
            if outcome is Outcome.IDLE:
                if self._stopping and loop.inbox_empty():
                    return
                loop.wake.wait(IDLE_S)
            elif outcome is Outcome.BLOCKED:
                loop.wake.wait(REPLAN_S)
