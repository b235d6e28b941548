"""The CPU attention read path chosen by measurement at engine start, beside the LoRA plans.

Two exact backends read the paged KV cache on CPU (scheduler/model.py): `seats` keeps each running
sequence's K/V also in one contiguous row and reads it in place; `torch` gathers each sequence's blocks
per step. Which is faster depends on the CPU, the threads and the model's shapes, so with
`--attention-backend auto` the engine times decode steps of the model's real shapes through each
(`choose_attention`) and keeps the faster for its life: the seats hold state across steps, so the choice
cannot change from one step to the next.

The timing is the plan tuner's (kernels/plan_tuner.py: a warm-up, then rounds with the candidates taking
turns, the minimum), recorded under group "attention" and one shape key per probe point, so it is cached
in the same file as the LoRA plans, listed by `Engine.plans()` and `lorabus status`, and a restart on the
same machine times nothing. A probe point is a decode step of `batch` base-model sequences at `context`
positions, of which only what differs by backend is timed: the runner's layout of the step (block tables
and masks, or the seat plan) and attention in one layer, the point's time being layout + layers x that
(a whole step of a 30-layer model at context 512 takes seconds to repeat on a small CPU). The winner has
the lower geometric mean, over the points, of its time relative to the faster one at that point.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Callable

import torch

from lorabus.kernels.plan_tuner import PlanTuner
from lorabus.scheduler.kv_cache import PagedKVCache
from lorabus.scheduler.model import CausalLM, make_attention
from lorabus.scheduler.requests import Request, Sequence, State
from lorabus.scheduler.runner import ModelRunner

log = logging.getLogger(__name__)

GROUP = "attention"
CANDIDATES = ("seats", "torch")  # the first is the choice when nothing was measured (tuning off, no cache)
PROBE_CONTEXTS = (64, 512)  # decode context lengths timed: a short chat turn, a long prompt
MIN_PROBE_BATCH = 2
# Positions each probe sequence may advance by: every timed layout is a decode step one token further, as in
# serving (the seats then shift last step's plan); more than the tuner's warm-up and rounds take.
PROBE_ADVANCE = 32
# Layouts run untimed first: zeroing the blocks, copying the context into the seats and their first growth
# happen once per sequence, not per step (and the tuner drops a candidate whose first round is slow).
PROBE_WARMUP_STEPS = 2


def probe_points(max_running: int, max_model_len: int, kv: PagedKVCache) -> list[tuple[int, int]]:
    """(batch, context) of each decode step to time: a full batch at each probe context that the model
    and the cache hold (the batch shrunk to what the cache's blocks hold)."""
    points = []
    for context in sorted({min(c, max_model_len - 1) for c in PROBE_CONTEXTS}):
        batch = min(max_running, kv.num_blocks // _probe_blocks(context, kv))
        if context > 0 and batch >= MIN_PROBE_BATCH:
            points.append((batch, context))
    return points


def _probe_blocks(context: int, kv: PagedKVCache) -> int:
    """Cache blocks a probe sequence holds: positions [0, context + PROBE_ADVANCE]."""
    return (context + PROBE_ADVANCE) // kv.block_size + 1


def choose_attention(model: CausalLM, kv: PagedKVCache, tuner: PlanTuner, make_runner: Callable[[], ModelRunner],
                     points: list[tuple[int, int]], budget_s: float) -> str:
    """The faster CPU backend over `points` (see the module's docstring); leaves `model.attention` unset for
    the caller to attach the winner. Points are timed (or read from the tuner's cache; with tuning off, only
    read) until `budget_s` has passed; with no time for any point, the first candidate."""
    relative = {name: [] for name in CANDIDATES}
    deadline = time.monotonic() + budget_s
    for batch, context in points:
        if time.monotonic() >= deadline:
            log.info("attention tuning stopped at its %.1f s budget", budget_s)
            break
        shape = f"b{batch}.c{context}.l{len(model.layers)}.h{model.num_heads}x{model.num_kv_heads}x{model.head_dim}"
        if not tuner.times(GROUP, shape) and tuner.mode != "off":
            parts = {name: _decode_step(name, model, kv, make_runner, batch, context) for name in CANDIDATES}
            layout = tuner.measure({name: part[0] for name, part in parts.items()})
            layer = tuner.measure({name: part[1] for name, part in parts.items()})
            tuner.record(GROUP, shape, {name: (layout[name] + len(model.layers) * layer[name]) * 1e6
                                        for name in CANDIDATES})
        times = tuner.times(GROUP, shape)
        if all(name in times for name in CANDIDATES):
            best = min(times.values())
            for name in CANDIDATES:
                relative[name].append(times[name] / best)
    model.attention = None
    if not relative[CANDIDATES[0]]:
        log.info("attention backend: %s (nothing measured or cached)", CANDIDATES[0])
        return CANDIDATES[0]
    score = {name: math.exp(math.fsum(math.log(r) for r in relative[name]) / len(relative[name]))
             for name in CANDIDATES}
    chosen = min(CANDIDATES, key=score.get)
    log.info("attention backend: %s (time relative to the faster, geometric mean over %d decode steps: %s; "
             "%.2f s)", chosen, len(relative[chosen]), ", ".join(f"{name} {score[name]:.2f}" for name in CANDIDATES),
             budget_s - (deadline - time.monotonic()))
    return chosen


def _decode_step(backend: str, model: CausalLM, kv: PagedKVCache, make_runner: Callable[[], ModelRunner],
                 batch: int, context: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """What `backend` costs of one decode step of `batch` base-model sequences at `context` positions, as two
    callables the tuner can repeat: the runner laying the step out for it, and its attention in one layer
    (the next layer each call, so reads are as cold as in a step; random queries and new K/V). The rest of
    the step is the same whatever the backend. Each layout is the next decode step, one token further, after
    PROBE_WARMUP_STEPS untimed ones; attention runs over the step laid out when it is first called."""
    attention = make_attention(backend, kv, model.head_dim, model.dtype, model.device)
    model.attention = attention
    runner = make_runner()  # built over this backend: it lays steps out for it
    per_sequence = _probe_blocks(context, kv)
    length = context + PROBE_ADVANCE + 1
    sequences = []
    for i in range(batch):
        seq = Sequence(Request(f"attention-probe-{i}", "probe", prompt_ids=[0] * length), [0] * length,
                       0.0, lambda completion: None)
        seq.blocks = list(range(i * per_sequence, (i + 1) * per_sequence))
        seq.num_computed, seq.state = context, State.RUNNING
        sequences.append((seq, 1))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, model.head_dim, generator=gen).to(model.device, model.dtype)
               for heads in (model.num_heads, model.num_kv_heads, model.num_kv_heads))
    layers = itertools.cycle(range(len(model.layers)))
    laid_out: list = []

    @torch.inference_mode()
    def layout() -> None:
        runner.layout(sequences)
        for seq, _ in sequences:
            seq.num_computed = min(seq.num_computed + 1, length - 1)

    @torch.inference_mode()
    def one_layer() -> None:
        if not laid_out:
            laid_out.append(runner.layout(sequences))
        attention(next(layers), q, k, v, laid_out[0])

    for _ in range(PROBE_WARMUP_STEPS):
        layout()
    return layout, one_layer
