"""The device pool of adapter weights that the LoRA kernels read, and the LoRA step of each projection.

The pool holds `max_loras` slots. For every decoder layer and projection group (`scheduler.arch.GROUPS`:
fused q/k/v, o, fused gate/up, down) it keeps one A tensor stored slot-major [slots, R, S, in] (`a` exposes
it as the kernels' [S, slots, R, in] view: strides, no copy) and, per slice, a B tensor [slots, out, R]
plus scales [S, slots] (the CPU path reads them transposed, as a view). Slot-major storage
lets the CPU path read a batch's adapters as views of the pool: `a[slot, :r]` is one contiguous
[r*S, in] matrix and a run of slots is one strided batch, so a step gathers no A or B. Adapters of
different ranks share the pool by zero padding to the pool's max rank R. The CPU path never runs past
the largest true rank (recorded per slot at write time) among the slots it batches: a segment done on
its own (a long prefill run) runs at its slot's rank, and batched segments may be grouped by rank bucket
(true rank rounded up to a power of two, at least `MIN_RANK_BUCKET`), each bucket at its largest rank:
rank-8 adapters beside a few rank-32/64 ones then do not pay their rank; slots that do not target the
group are skipped. How a step runs on the torch path (one call or one per rank bucket, and each call's
`torch_ops.candidate_plans` plan) is measured, not estimated: `PlanTuner` times the candidates on the
step's real inputs the first time a step of its shape class is seen (or at start-up, `tune`), per
projection group, and keeps the fastest (docs/kernels.md, "Plans by measurement"). The Triton
path reads the padded tile (see docs/benchmarks.md for the cost). The backend is resolved once here,
at construction; `apply` calls the torch path or the Triton kernels directly, with no per-call argument
checks. Which job uses which slot is decided by the scheduler; the pool only stores and applies. An adapter on
a fused module (Phi-3's qkv_proj) arrives split into slices that share its A (scheduler/adapters.py), so
the pool keeps a copy of that A per slice and shrinks once per slice: exact, for (slices - 1) extra A
copies and reads on such adapters, and one fixed layout for every family.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import re
import time
from contextlib import nullcontext
from functools import partial

import torch

from lorabus import kernels
from lorabus.kernels import torch_ops
from lorabus.kernels.mapping import restrict_mapping
from lorabus.kernels.plan_tuner import PlanTuner
from lorabus.scheduler.adapters import AdapterWeights
from lorabus.scheduler.arch import GROUPS

log = logging.getLogger(__name__)

# Ranks up to this share one bucket: below it a matmul costs its call, not its rank.
MIN_RANK_BUCKET = 8


def rank_bucket(rank: int) -> int:
    """The bucket of an adapter's true rank: the next power of two, at least MIN_RANK_BUCKET."""
    return max(MIN_RANK_BUCKET, 1 << (rank - 1).bit_length())


def slot_bytes(projections: dict[str, tuple[int, int]], num_layers: int, max_rank: int, dtype: torch.dtype) -> int:
    """Bytes one pool slot takes: what sizes the pool from device memory."""
    per_layer = sum((d_in + d_out) * max_rank for d_in, d_out in projections.values())
    return per_layer * num_layers * torch.finfo(dtype).bits // 8


class AdapterPool:
    def __init__(
        self,
        projections: dict[str, tuple[int, int]],
        num_layers: int,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        backend: str = "auto",
        groups: dict[str, tuple[str, ...]] = GROUPS,
    ):
        self.backend = backend
        self._backend = kernels.resolve_backend(backend, device)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"pool dtype must be fp32, fp16 or bf16, got {dtype}")
        self.device = device
        self.groups = groups
        self.max_rank = max_rank
        self._group_of = {proj: (group, i) for group, projs in groups.items() for i, proj in enumerate(projs)}
        self._offsets = {group: [sum(projections[p][1] for p in projs[:i]) for i in range(len(projs))]
                         for group, projs in groups.items()}
        self._a_slot_major: list[dict[str, torch.Tensor]] = []  # [slots, R, S, in]
        self.a: list[dict[str, torch.Tensor]] = []  # the same storage viewed [S, slots, R, in]
        self.b: list[dict[str, list[torch.Tensor]]] = []
        self.scale: list[dict[str, torch.Tensor]] = []  # [S, slots] fp32
        for _ in range(num_layers):
            a_sm, a, b, s = {}, {}, {}, {}
            for group, projs in groups.items():
                d_in = projections[projs[0]][0]
                a_sm[group] = torch.zeros(max_loras, max_rank, len(projs), d_in, dtype=dtype, device=device)
                a[group] = a_sm[group].permute(2, 0, 1, 3)
                b[group] = [torch.zeros(max_loras, projections[p][1], max_rank, dtype=dtype, device=device) for p in projs]
                s[group] = torch.zeros(len(projs), max_loras, dtype=torch.float32, device=device)
            self._a_slot_major.append(a_sm)
            self.a.append(a)
            self.b.append(b)
            self.scale.append(s)
        # Slots per group whose adapter targets it: a group no resident adapter targets costs no launch.
        self._targets: dict[str, set[int]] = {group: set() for group in groups}
        # True rank per group and slot (largest over layers and slices), 0 when the slot does not target it.
        self._rank: dict[str, list[int]] = {group: [0] * max_loras for group in groups}
        # Counts the writes and clears of slots: a step's LoRA mapping (and the plans cached on it) stays valid
        # for a later step with the same token slots while this is unchanged (scheduler/runner.py).
        self.version = 0
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Chooses the torch path's plans; the engine installs one that measures (scheduler/engine.py).
        self.tuner = PlanTuner("off")

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy an adapter into a slot (called from the loader thread; the slot is idle meanwhile)."""
        stream = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else nullcontext()
        with stream:
            self.clear(slot)
            for (layer, proj), (a, b, scale) in adapter.modules.items():
                group, i = self._group_of[proj]
                rank = a.shape[0]
                self.a[layer][group][i, slot, :rank].copy_(a, non_blocking=True)
                self.b[layer][group][i][slot, :, :rank].copy_(b, non_blocking=True)
                self.scale[layer][group][i, slot] = scale
                self._targets[group].add(slot)
                self._rank[group][slot] = max(self._rank[group][slot], rank)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        self.version += 1

    def clear(self, slot: int) -> None:
        for layer in range(len(self.a)):
            for group in self.groups:
                self.a[layer][group][:, slot].zero_()
                for b in self.b[layer][group]:
                    b[slot].zero_()
                self.scale[layer][group][:, slot] = 0.0
        for slots in self._targets.values():
            slots.discard(slot)
        for ranks in self._rank.values():
            ranks[slot] = 0
        self.version += 1

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, mapping: "kernels.LoRAMapping") -> None:
        """y[:, slice] += scale · B(A x) for each token's own adapter slot, all slices in one launch each."""
        # A static (CUDA-graph) mapping launches whatever the batch holds: the graph outlives this step.
        if not mapping.static and (not self._targets[group] or not mapping.has_lora):
            return
        if self._backend == "torch":
            for rank, part, plan in self._plans(layer, group, x, y, mapping, self._rank[group]):
                self._apply_torch(layer, group, x, y, part, rank, self._rank[group], plan)
        elif self._backend == "triton":
            # The shapes were checked when the pool was built: launch the kernels without the public ops'
            # per-call checks. They read the [S, slots, R, in] view of the slot-major A by its strides.
            from lorabus.kernels import triton_ops

            a = self.a[layer][group]
            t = torch.zeros((a.shape[0], x.shape[0], a.shape[2]), dtype=torch.float32, device=x.device)
            triton_ops.shrink(x, a, mapping, t)
            triton_ops.expand(y, t, self.b[layer][group], self.scale[layer][group], self._offsets[group], mapping)
        else:  # the "gather" baseline, through the checked public ops
            t = kernels.lora_shrink(x, self.a[layer][group], mapping, backend=self._backend)
            kernels.lora_expand(y, t, self.b[layer][group], mapping, self.scale[layer][group], backend=self._backend)

    def tune(self, steps: list[list[int]], budget_s: float) -> int:
        """Measure the torch path's plans for every group on these steps (each a list of token slots, -1 for
        none), on layer 0 as if every slot held an adapter of the pool's max rank, until `budget_s` has
        passed; returns how many steps were tuned. Choices the tuner already has (its cache file) cost
        nothing."""
        if self._backend != "torch":
            return 0
        gen = torch.Generator().manual_seed(0)
        num_slots = len(self._rank[next(iter(self.groups))])
        full = [self.max_rank] * num_slots
        deadline = time.monotonic() + budget_s
        for done, idx in enumerate(steps):
            if time.monotonic() >= deadline:
                log.info("plan tuning stopped at its %.1f s budget: %d of %d start-up steps tuned", budget_s, done,
                         len(steps))
                return done
            mapping = kernels.make_lora_mapping(torch.tensor(idx, device=self.device), num_slots)
            for group in self.groups:
                d_in, d_out = self._a_slot_major[0][group].shape[-1], sum(b.shape[1] for b in self.b[0][group])
                x = torch.randn(len(idx), d_in, generator=gen).to(self.device, self._a_slot_major[0][group].dtype)
                y = torch.zeros(len(idx), d_out, dtype=x.dtype, device=self.device)
                self._plans(0, group, x, y, mapping, full)
        log.info("plan tuning: %d start-up steps in %.2f s, %d plans known", len(steps),
                 budget_s - (deadline - time.monotonic()), len(self.tuner.table()))
        return len(steps)

    def plans(self, limit: int | None = None) -> list[dict]:
        """The tuner's choices (at most `limit`, each group in turn): group, shape class, plan, source and each
        candidate's time (µs)."""
        return self.tuner.table(limit)

    def _apply_torch(self, layer, group, x, y, mapping, rank, ranks, plan) -> None:
        torch_ops.apply_slot_major(x, y, self._a_slot_major[layer][group], self.b[layer][group],
                                   self.scale[layer][group].T, self._offsets[group], mapping, rank, ranks, plan)

    def _plans(self, layer, group, x, y, mapping, ranks) -> list[tuple[int, "kernels.LoRAMapping", str | None]]:
        """How the torch path runs the step's slots for `group`: (rank, mapping, plan) per call, one call or one
        per rank bucket, as measured (or cached) for the step's shape class. Cached on the step's mapping, so
        every layer reuses it; measured on this layer's inputs, into a scratch copy of y."""
        cache = mapping.__dict__.setdefault("_pool_plans", {})
        key = (id(self), group)
        if key not in cache:
            copies = []

            def scratch() -> torch.Tensor:  # y's copy, made only when a candidate is timed
                if not copies:
                    copies.append(y.clone())
                return copies[0]

            options = self._rank_options(mapping, ranks)
            runs = {name: [(rank, part, self._plan(layer, group, x, scratch, part, rank, ranks))
                           for rank, part in parts] for name, parts in options.items()}
            if len(runs) > 1:
                name = self.tuner.choose(group, f"{torch_ops.shape_class(mapping)}.{_rank_class(mapping, ranks)}",
                                         {name: partial(self._run, layer, group, x, scratch, parts, ranks)
                                          for name, parts in runs.items()})
                cache[key] = runs[name]
            else:
                cache[key] = next(iter(runs.values()), [])
        return cache[key]

    def _plan(self, layer, group, x, scratch, mapping, rank, ranks) -> str | None:
        plans = torch_ops.candidate_plans(mapping)
        if len(plans) < 2:
            return plans[0] if plans else None
        return self.tuner.choose(group, f"{torch_ops.shape_class(mapping)}.r{rank}",
                                 {plan: partial(self._run, layer, group, x, scratch, [(rank, mapping, plan)], ranks)
                                  for plan in plans})

    def _run(self, layer, group, x, scratch, parts, ranks) -> None:
        y = scratch()
        for rank, part, plan in parts:
            self._apply_torch(layer, group, x, y, part, rank, ranks, plan)

    @staticmethod
    def _rank_options(mapping: "kernels.LoRAMapping", ranks) -> dict[str, list[tuple[int, "kernels.LoRAMapping"]]]:
        """The ways to run the step's slots: "one-call" at the largest true rank, and "by-rank" (one call per
        rank bucket at its own largest rank, skipping slots that do not target the group) when that differs."""
        by_bucket: dict[int, list[int]] = {}
        for slot in mapping.active_slots:
            if ranks[slot]:
                by_bucket.setdefault(rank_bucket(ranks[slot]), []).append(slot)
        if not by_bucket:
            return {}
        options = {"one-call": [(max(ranks[s] for s in mapping.active_slots), mapping)]}
        if len(by_bucket) > 1 or sum(map(len, by_bucket.values())) < len(mapping.active_slots):
            cut = mapping.__dict__.setdefault("_pool_restricted", {})  # shared by groups with the same split
            for slots in map(tuple, by_bucket.values()):
                if slots not in cut:
                    cut[slots] = restrict_mapping(mapping, slots)
            options["by-rank"] = [(max(ranks[s] for s in slots), cut[tuple(slots)]) for slots in by_bucket.values()]
        return options


def _rank_class(mapping: "kernels.LoRAMapping", ranks) -> str:
    """The rank make-up of a step, for the key of its one-call / by-rank choice: slots per rank bucket (0: not
    targeting the group), each count rounded up to a power of two."""
    count: dict[int, int] = {}
    for slot in mapping.active_slots:
        bucket = rank_bucket(ranks[slot]) if ranks[slot] else 0
        count[bucket] = count.get(bucket, 0) + 1
    return "ranks" + "+".join(f"{b}x{torch_ops.round_pow2(n)}" for b, n in sorted(count.items()))


# Start-up tuning's decode steps draw adapters with Zipf popularity (exponent s) over at most this many.
STARTUP_ZIPF_S, STARTUP_ZIPF_ADAPTERS = 1.1, 64


def startup_steps(max_running: int, num_slots: int, step_tokens: int) -> list[list[int]]:
    """Representative steps to tune at start-up (token slots, fixed seed): decode batches of 2, 4, ...
    max_running tokens, each on distinct adapters and on Zipf-popular ones, and two prefill chunks of
    step_tokens (one long prompt beside a full decode batch; four prompts on four adapters)."""
    rng = random.Random(0)
    slots = rng.sample(range(num_slots), num_slots)  # popular adapters land on any slot
    popular = slots[:min(num_slots, STARTUP_ZIPF_ADAPTERS)]
    weights = [1 / (k + 1) ** STARTUP_ZIPF_S for k in range(len(popular))]
    sizes = sorted({min(max_running, 1 << k) for k in range(1, max(1, max_running - 1).bit_length() + 1)})
    steps = []
    for n in sizes:
        steps.append([slots[i % num_slots] for i in range(n)])
        steps.append(rng.choices(popular, weights, k=n))
    decode = rng.choices(popular, weights, k=max_running - 1)
    steps.append([slots[0]] * max(1, step_tokens - len(decode)) + decode)
    quarter = max(1, step_tokens // 4)
    steps.append([slots[i % num_slots] for i in range(4) for _ in range(quarter)])
    return steps


def plan_tuner(pool: AdapterPool, mode: str, cache_dir: str) -> PlanTuner:
    """The engine's tuner for `pool`, its choices cached in `cache_dir` (empty:
    ${LORABUS_CACHE:-~/.cache/lorabus}/plans) in a file named by the CPU (or GPU), the torch version and a hash
    of everything else the timings depend on (threads, dtype, max rank, the groups' widths)."""
    machine = torch.cuda.get_device_name(pool.device) if pool.device.type == "cuda" else _cpu_model()
    identity = dict(machine=machine, torch=torch.__version__, device=pool.device.type, threads=torch.get_num_threads(),
                    dtype=str(pool._a_slot_major[0][next(iter(pool.groups))].dtype).removeprefix("torch."),
                    max_rank=pool.max_rank,
                    groups={g: [pool._a_slot_major[0][g].shape[-1], [b.shape[1] for b in pool.b[0][g]]]
                            for g in pool.groups} if pool.b else {})
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir or os.path.join(os.environ.get("LORABUS_CACHE") or os.path.join("~", ".cache", "lorabus"), "plans")
    name = re.sub(r"[^A-Za-z0-9.]+", "_", f"{machine}-{torch.__version__}").strip("_")
    sync = torch.cuda.synchronize if pool.device.type == "cuda" else None
    return PlanTuner(mode, os.path.join(os.path.expanduser(root), f"{name}-{digest}.json"), identity, sync=sync)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor() or platform.machine())
    except OSError:
        return platform.processor() or platform.machine()
