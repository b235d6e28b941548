"""The engine: one thread that runs the continuous-batching step loop over the model.

`Engine.submit` is the hand-off from the async world: it validates and tokenizes a request, puts it
in a thread-safe inbox and returns; the step thread admits it (via `Scheduler`), runs mixed-adapter
forward passes, samples, detokenizes, checks stop conditions, and calls the request's `on_done`
with a `Completion` from the step thread. Adapter loads (disk → host cache → device slot) run on a
separate loader thread so they overlap compute.

Failures stay with the jobs they belong to: an exception while sampling, detokenizing or answering one
sequence answers that job `internal` and its neighbours carry on; a failed forward pass answers the
jobs of that step; anything else that goes wrong in an iteration of the step loop is logged, the jobs
that can no longer continue are answered `internal`, and the loop keeps running. Every submitted job
is answered exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

import kernels
from scheduler.adapters import AdapterLoadError, AdapterWeights, read_adapter
from scheduler.config import EngineConfig
from scheduler.core import AdapterSlots, Request, SamplingParams, Scheduler, SchedulerLimits, Sequence
from scheduler.kv_cache import BlockAllocator, PagedKVCache
from scheduler.lora import AdapterPool, slot_bytes
from scheduler.model import CausalLM, PrefillSpan, StepBatch
from scheduler.sampling import Sampler

log = logging.getLogger(__name__)

WARMUP_TENANT = "__warmup__"
# How often the step loop re-plans while it has queued work but nothing runnable: deadlines and the
# bounded-wait rule are time-based, so they need a look even when no submission or load wakes it.
REPLAN_S = 0.005
IDLE_S = 0.5


@dataclass(frozen=True)
class AdapterSpec:
    key: str  # unique per content: "name@version"
    path: str
    sha256: str | None = None


@dataclass
class Completion:
    id: str
    status: str  # "ok" | "error"
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    error_code: str | None = None
    error_message: str | None = None
    queue_s: float = 0.0  # arrival → admitted into the batch
    ttft_s: float | None = None  # arrival → first token
    total_s: float = 0.0
    cold: bool = False  # its adapter was not resident on arrival (ttft_s is then the cold start)


@dataclass
class GenerationRequest:
    id: str
    tenant: str
    adapter: str | None = None  # an AdapterSpec key registered with the engine
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None  # unix epoch seconds


class _Job:
    """What the step thread keeps per sequence beside the scheduler's bookkeeping."""

    def __init__(self, on_done: Callable[[Completion], None], sampler: Sampler, kv_slots: torch.Tensor | None = None):
        self.on_done, self.sampler, self.kv_slots = on_done, sampler, kv_slots
        self.text: str | None = None  # set early only when a stop string cut it
        self.answered = False  # on_done was called: a later failure must not answer it again


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


class HostAdapterCache:
    """The host-memory tier: LRU over parsed adapters, so a re-load skips disk and validation."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        # Keyed by the whole spec, so a same-name re-publish with new content never hits stale weights.
        self._items: OrderedDict[AdapterSpec, AdapterWeights] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: AdapterSpec) -> AdapterWeights | None:
        with self._lock:
            weights = self._items.get(spec)
            if weights is not None:
                self._items.move_to_end(spec)
            return weights

    def put(self, spec: AdapterSpec, weights: AdapterWeights) -> None:
        with self._lock:
            self._items[spec] = weights
            self._items.move_to_end(spec)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, spec: AdapterSpec) -> None:
        with self._lock:
            self._items.pop(spec, None)

    def __len__(self) -> int:
        return len(self._items)


class Engine:
    def __init__(self, model_dir: str, config: EngineConfig | None = None, clock: Callable[[], float] = time.monotonic):
        from transformers import AutoTokenizer

        self.config = config = config or EngineConfig()
        device_name = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device_name)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        self.clock = clock
        self.model = CausalLM.from_pretrained(model_dir, self.device, self.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir) if _has_tokenizer(model_dir) else None
        eos = self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.max_model_len = config.max_model_len or self.model.max_context

        total, free = _memory_bytes(self.device)
        shapes = self.model.shapes
        per_slot = slot_bytes(shapes.projections, shapes.num_layers, config.max_lora_rank, self.dtype)
        self.max_loras = config.max_loras or max(1, min(64, int(0.05 * total) // per_slot))
        self.max_cpu_loras = config.max_cpu_loras or 4 * self.max_loras
        kv_budget = config.kv_cache_mb * 2**20 or (int(0.4 * free) if self.device.type == "cuda" else 2**30)
        per_block = PagedKVCache.bytes_per_block(
            shapes.num_layers, config.kv_block_size, self.model.num_kv_heads, self.model.head_dim, self.dtype
        )
        num_blocks = max(2, kv_budget // per_block)
        self.kv_capacity_tokens = num_blocks * config.kv_block_size

        self.pool = AdapterPool(
            shapes.projections, shapes.num_layers, self.max_loras, config.max_lora_rank, self.dtype, self.device,
            backend=config.lora_backend,
        )
        self.kv = PagedKVCache(
            shapes.num_layers, num_blocks, config.kv_block_size, self.model.num_kv_heads, self.model.head_dim,
            self.dtype, self.device,
        )
        self.model.attach(self.pool, self.kv)
        max_step_tokens = config.max_step_tokens or (8192 if self.device.type == "cuda" else 512)
        self.scheduler = Scheduler(
            SchedulerLimits(config.max_running, max(max_step_tokens, config.max_running), config.max_wait_ms / 1000),
            BlockAllocator(num_blocks, config.kv_block_size),
            AdapterSlots(self.max_loras),
        )
        self.host_cache = HostAdapterCache(self.max_cpu_loras)
        self._specs: dict[str, AdapterSpec] = {}
        self._load_errors: dict[str, str] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._load_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._load_done: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.steps = 0
        # Optional hooks for metrics, called from the engine's threads:
        # on_step(sequences, tokens, distinct_adapters, seconds) and on_load(key, seconds, error).
        self.on_step: Callable[[int, int, int, float], None] | None = None
        self.on_load: Callable[[str, float, str | None], None] | None = None
        log.info(
            "engine: %s %s, %d adapter slots (rank %d), %d host adapters, KV %d tokens, %d step tokens",
            self.device, self.dtype, self.max_loras, config.max_lora_rank, self.max_cpu_loras,
            self.kv_capacity_tokens, self.scheduler.limits.max_step_tokens,
        )

    # ---- called from any thread -------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._step_loop, "lorabus-step"), (self._load_loop, "lorabus-loader")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Finish every submitted request, then stop the threads."""
        self._stopping = True
        self._wake.set()
        self._load_queue.put(None)
        for thread in self._threads:
            thread.join()

    def register(self, spec: AdapterSpec) -> None:
        """Make an adapter known (published). Re-registering a key with new content invalidates caches."""
        old = self._specs.get(spec.key)
        self._specs[spec.key] = spec
        if old is not None and old != spec:
            self._inbox.put(("invalidate", old))
            self._wake.set()

    def prefetch(self, key: str) -> None:
        """Load an adapter into the host tier ahead of traffic (and into a device slot if one is free)."""
        self._inbox.put(("prefetch", key))
        self._wake.set()

    def submit(self, request: GenerationRequest, on_done: Callable[[Completion], None]) -> None:
        """Queue a request; `on_done` is called exactly once, from the step thread (or here on bad input)."""
        try:
            ids = self._prompt_ids(request)
            _check_params(request.params)
            if request.adapter is not None and request.adapter not in self._specs:
                raise ValueError(f"adapter_not_found: adapter {request.adapter} is not registered")
            deadline = None
            if request.deadline is not None:
                deadline = self.clock() + (request.deadline - time.time())
            core = Request(request.id, request.tenant, request.adapter, ids, request.params, deadline)
        except ValueError as exc:
            code, _, message = str(exc).partition(": ")
            _deliver(on_done, Completion(request.id, "error", error_code=code, error_message=message))
            return
        except Exception as exc:  # a request we could not even read must still be answered
            log.exception("submit of %s failed", request.id)
            _deliver(on_done, Completion(request.id, "error", error_code="internal",
                                         error_message=f"{type(exc).__name__}: {exc}"))
            return
        self._inbox.put(("job", core, on_done))
        self._wake.set()

    def warm(self, key: str, on_done: Callable[[Completion], None]) -> None:
        """Load an adapter and run one dummy step on it, so live traffic never pays its first-step costs."""
        self.submit(
            GenerationRequest(f"warmup:{key}", WARMUP_TENANT, key, prompt_ids=[0], params=SamplingParams(1)),
            on_done,
        )

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
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
            "host_adapters": len(self.host_cache),
            "kv_blocks": self.scheduler.blocks.num_blocks,
            "kv_blocks_used": self.scheduler.blocks.num_blocks - self.scheduler.blocks.num_free,
        }

    def resident(self) -> list[str]:
        slots = self.scheduler.slots
        return [k for s, k in enumerate(slots.key_of) if k is not None and slots.ready[s]]

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            # A negative id would index the embedding from its end: wrong output, not an error.
            if not all(isinstance(i, int) and 0 <= i < self.model.vocab_size for i in ids):
                raise ValueError(f"invalid_job: prompt_ids must be integers in [0, {self.model.vocab_size})")
        else:
            if self.tokenizer is None:
                raise ValueError("invalid_job: the model directory has no tokenizer; send prompt_ids")
            if not isinstance(request.prompt, str):
                raise ValueError("invalid_job: prompt must be a string")
            ids = self.tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise ValueError("invalid_job: the prompt encodes to no tokens")
        max_new = request.params.max_new_tokens
        if not isinstance(max_new, int) or max_new < 1:
            raise ValueError("invalid_job: max_new_tokens must be an integer >= 1")
        total = len(ids) + max_new
        if total > self.max_model_len:
            raise ValueError(
                f"prompt_too_long: {len(ids)} prompt + {max_new} new tokens exceed the model's limit "
                f"{self.max_model_len}"
            )
        blocks = self.scheduler.blocks
        if blocks.blocks_for(total) > blocks.num_blocks:  # it could never be admitted: answer now, not never
            raise ValueError(
                f"prompt_too_long: {len(ids)} prompt + {max_new} new tokens exceed the KV cache's "
                f"{blocks.num_blocks * blocks.block_size} tokens"
            )
        return ids

    # ---- loader thread ----------------------------------------------------------------------------

    def _load_loop(self) -> None:
        while (item := self._load_queue.get()) is not None:
            spec, slot = item
            key = spec.key
            started = time.perf_counter()
            error = None
            try:
                weights = self.host_cache.get(spec)
                if weights is None:
                    weights = read_adapter(key, spec.path, self.model.shapes, self.config.max_lora_rank, self.dtype,
                                           spec.sha256)
                    if self.device.type == "cuda":  # pinned pages let the host → device copy run async
                        weights.modules = {k: (a.pin_memory(), b.pin_memory(), s) for k, (a, b, s) in weights.modules.items()}
                    self.host_cache.put(spec, weights)
                if slot is not None:
                    self.pool.write(slot, weights)
            except AdapterLoadError as exc:
                error = str(exc)
            except Exception as exc:  # a loader bug must answer the jobs, not kill the thread
                log.exception("loading %s failed", key)
                error = f"{key}: {type(exc).__name__}: {exc}"
            self._load_done.put((spec, slot, error, time.perf_counter() - started))
            self._wake.set()

    # ---- step thread ------------------------------------------------------------------------------

    def _step_loop(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
            except Exception as exc:  # a bug outside any one job: what the scheduler holds cannot go on
                log.exception("step loop iteration failed")
                try:
                    self._fail_all(exc)
                except Exception:
                    log.exception("answering the jobs of a failed iteration failed")
                self._wake.wait(REPLAN_S)  # a failure that repeats must not spin a core

    def _iterate(self) -> bool:
        """One pass of the step loop; False once stopping and nothing is left."""
        sched = self.scheduler
        self._wake.clear()
        self._drain_inbox()
        self._drain_loads()
        if not sched.has_work():
            if self._stopping and self._inbox.empty():
                return False
            self._wake.wait(IDLE_S)
            return True
        try:
            step = sched.schedule(self.clock())
        except Exception as exc:  # its bookkeeping may be half-updated: answer everything it holds
            log.exception("schedule failed")
            self._fail_all(exc)
            return True
        for seq in step.expired:
            self._answer_error(seq, "deadline_exceeded", "the job's deadline passed before it could run")
        for key, slot in step.loads:
            spec = self._specs.get(key)
            if spec is not None:
                self._load_queue.put((spec, slot))
            else:  # cannot happen (jobs name registered keys); never leave its jobs waiting on a load
                for seq in sched.load_failed(key):
                    self._answer_error(seq, "internal", f"adapter {key} is not registered")
        if not step.batch:
            self._wake.wait(REPLAN_S)
            return True
        self._run(step.batch)
        return True

    def _fail_all(self, exc: Exception) -> None:
        """Answer `internal` every job the scheduler holds and start its bookkeeping afresh."""
        for seq in self.scheduler.reset():
            self._answer_error(seq, "internal", f"{type(exc).__name__}: {exc}")

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._take(item)
            except Exception as exc:  # one bad item must not stop the others (or the loop)
                log.exception("inbox item %s failed", item[:2])
                if item[0] == "job":
                    request, on_done = item[1], item[2]
                    self.scheduler.waiting = [s for s in self.scheduler.waiting if s.request is not request]
                    _deliver(on_done, Completion(request.id, "error", error_code="internal",
                                                 error_message=f"{type(exc).__name__}: {exc}"))

    def _take(self, item: tuple) -> None:
        if item[0] == "job":
            _, request, on_done = item
            if request.adapter in self._load_errors:
                _deliver(on_done, Completion(request.id, "error", error_code="adapter_load_failed",
                                             error_message=self._load_errors[request.adapter]))
                return
            seq = Sequence(request, self.clock())
            if not self.scheduler.admissible(seq):  # submit checks this too; the scheduler must never hold one
                _deliver(on_done, Completion(request.id, "error", error_code="prompt_too_long",
                                             error_message="the job needs more KV cache than there is"))
                return
            seq.payload = _Job(on_done, Sampler(request.params, self.device))
            self.scheduler.add(seq)
        elif item[0] == "prefetch":
            spec = self._specs.get(item[1])
            if spec is None:
                log.warning("prefetch of %s ignored: it is not registered", item[1])
                return
            if spec.key not in self.scheduler.slots.slot_of and self.host_cache.get(spec) is None:
                wanted = {s.request.adapter for s in self.scheduler.waiting}
                slot = self.scheduler.slots.reserve(spec.key, self.clock(), wanted)
                self._load_queue.put((spec, slot))
        elif item[0] == "invalidate":
            old = item[1]
            self.host_cache.drop(old)
            self._load_errors.pop(old.key, None)
            # A slot still loading is left to _drain_loads, which sees the spec changed.
            if self.scheduler.slots.is_ready(old.key):
                self.scheduler.slots.retire(old.key)

    def _drain_loads(self) -> None:
        while True:
            try:
                spec, slot, error, seconds = self._load_done.get_nowait()
            except queue.Empty:
                return
            _call_hook(self.on_load, spec.key, seconds, error)
            try:
                self._loaded(spec, slot, error)
            except Exception as exc:  # its waiting jobs cannot run on a slot in an unknown state
                log.exception("finishing the load of %s failed", spec.key)
                for seq in self.scheduler.load_failed(spec.key):
                    self._answer_error(seq, "internal", f"{type(exc).__name__}: {exc}")

    def _loaded(self, spec: AdapterSpec, slot: int | None, error: str | None) -> None:
        key = spec.key
        if self._specs.get(key) != spec:  # re-published while loading: free the slot, load again later
            if slot is not None:
                self.scheduler.slots.loaded(key, ok=False)
            return
        if error is None:
            if slot is not None:
                self.scheduler.slots.loaded(key, ok=True)
            return
        self._load_errors[key] = error
        for seq in self.scheduler.load_failed(key):
            self._answer_error(seq, "adapter_load_failed", error)

    def _run(self, batch: list[tuple[Sequence, int]]) -> None:
        """One forward pass over the batch, then each sequence's own work, isolated from the others'."""
        sched = self.scheduler
        try:
            logits, wants_logits = self._forward(batch)
            greedy = logits.argmax(dim=-1).tolist()
        except Exception as exc:
            log.exception("step failed")
            for seq, _ in batch:
                if seq in sched.running:
                    sched.finish(seq, self.clock())
                    self._answer_error(seq, "internal", f"{type(exc).__name__}: {exc}")
            return
        now = self.clock()
        for row, seq in enumerate(wants_logits):
            try:
                self._advance(seq, logits[row], greedy[row], now)
            except Exception as exc:
                log.exception("job %s failed after the forward pass", seq.request.id)
                if seq in sched.running:
                    sched.finish(seq, now)
                self._answer_error(seq, "internal", f"{type(exc).__name__}: {exc}")

    def _forward(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits of the sequences that get a token this step (rows in the returned order)."""
        device = self.device
        tokens, positions, write_slots, lora_idx, logit_rows = [], [], [], [], []
        decode_rows, decode_ctx, prefills = [], [], []
        wants_logits: list[Sequence] = []
        for seq, n in batch:
            job: _Job = seq.payload
            if job.kv_slots is None:
                job.kv_slots = self.kv.token_slots(seq.blocks, device)
            start, past = len(tokens), seq.num_computed
            all_ids = seq.request.prompt_ids + seq.output_ids
            tokens.extend(all_ids[past : past + n])
            positions.extend(range(past, past + n))
            write_slots.append(job.kv_slots[past : past + n])
            lora_idx.extend([seq.slot] * n)
            if n == 1:
                decode_rows.append(start)
                decode_ctx.append(job.kv_slots[: past + 1])
            else:
                prefills.append(PrefillSpan(start, n, past, job.kv_slots[: past + n]))
            if past + n == seq.num_tokens:
                logit_rows.append(start + n - 1)
                wants_logits.append(seq)
        ctx_lens = torch.tensor([c.numel() for c in decode_ctx], device=device)
        width = int(ctx_lens.max()) if decode_ctx else 0
        step = StepBatch(
            tokens=torch.tensor(tokens, device=device),
            positions=torch.tensor(positions, device=device),
            write_slots=torch.cat(write_slots),
            lora=kernels.make_lora_mapping(torch.tensor(lora_idx, device=device), self.max_loras),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
            # Padding points at the cache's null slot, never at memory a sequence wrote.
            decode_kv_slots=torch.nn.utils.rnn.pad_sequence(decode_ctx, batch_first=True,
                                                            padding_value=self.kv.null_slot) if decode_ctx
            else torch.empty(0, 0, dtype=torch.long, device=device),
            decode_mask=(torch.arange(width, device=device)[None, :] < ctx_lens[:, None])[:, None, None, :],
            prefills=prefills,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=device),
        )
        started = time.perf_counter()
        logits = self.model.forward(step)
        self.steps += 1
        _call_hook(self.on_step, len(batch), len(tokens), len(step.lora.active_slots), time.perf_counter() - started)
        for seq, n in batch:
            seq.num_computed += n
        return logits, wants_logits

    def _advance(self, seq: Sequence, logits: torch.Tensor, greedy: int, now: float) -> None:
        """Append the sequence's next token; finish and answer it if that ends it."""
        job: _Job = seq.payload
        token = greedy if job.sampler.greedy else job.sampler.sample(logits)
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.output_ids.append(token)
        reason = self._finish_reason(seq, job)
        if reason is not None:
            self.scheduler.finish(seq, now)
            self._answer_ok(seq, reason)

    def _finish_reason(self, seq: Sequence, job: _Job) -> str | None:
        params = seq.request.params
        if params.stop and self.tokenizer is not None:  # decoding every step costs: only for stop strings
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            hits = [text.find(s) for s in params.stop if s in text]
            if hits:
                job.text = text[: min(hits)]
                return "stop"
        if seq.output_ids[-1] in self.eos_ids:
            return "stop"
        if len(seq.output_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _timings(self, seq: Sequence) -> dict:
        now = self.clock()
        return {
            "queue_s": (seq.admitted_at or now) - seq.arrival,
            "ttft_s": None if seq.first_token_at is None else seq.first_token_at - seq.arrival,
            "total_s": now - seq.arrival,
            "cold": seq.cold,
            "prompt_tokens": len(seq.request.prompt_ids),
        }

    def _answer_ok(self, seq: Sequence, reason: str) -> None:
        job: _Job = seq.payload
        text = job.text
        if text is None:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True) if self.tokenizer else ""
        completion = Completion(seq.request.id, "ok", token_ids=list(seq.output_ids), text=text,
                                finish_reason=reason, **self._timings(seq))
        self._answer(seq, completion)

    def _answer_error(self, seq: Sequence, code: str, message: str) -> None:
        self._answer(seq, Completion(seq.request.id, "error", error_code=code, error_message=message,
                                     **self._timings(seq)))

    def _answer(self, seq: Sequence, completion: Completion) -> None:
        job: _Job = seq.payload
        if job.answered:  # a failure after its answer went out: it stays answered once
            return
        job.answered = True
        _deliver(job.on_done, completion)


def _check_params(params: SamplingParams) -> None:
    """Refuse sampling numbers that have no meaning; extreme but meaningful ones are the sampler's job."""
    if not (isinstance(params.temperature, (int, float)) and math.isfinite(params.temperature)
            and params.temperature >= 0):
        raise ValueError("invalid_job: temperature must be a finite number >= 0")
    if not (isinstance(params.top_p, (int, float)) and 0 <= params.top_p <= 1):
        raise ValueError("invalid_job: top_p must be a number in [0, 1]")
    if not isinstance(params.top_k, int) or params.top_k < 0:
        raise ValueError("invalid_job: top_k must be an integer >= 0")
    if params.seed is not None and not isinstance(params.seed, int):
        raise ValueError("invalid_job: seed must be an integer or null")
    if not all(isinstance(stop, str) for stop in params.stop):
        raise ValueError("invalid_job: stop must be strings")


def _deliver(on_done: Callable[[Completion], None], completion: Completion) -> None:
    try:
        on_done(completion)
    except Exception:  # a failing callback must not take the step loop down
        log.exception("on_done for %s failed", completion.id)


def _call_hook(hook: Callable | None, *args) -> None:
    """Metrics hooks are observers: their failure is logged, never the jobs' problem."""
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("engine hook %s failed", getattr(hook, "__name__", hook))


def _has_tokenizer(model_dir: str) -> bool:
    return any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
