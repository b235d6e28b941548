"""The seat backend (scheduler/seat_kv.py, model.SeatAttention): decode rows read each sequence's contiguous
seat row instead of gathering its blocks, and give what attention over the whole context gives.

- Against a float64 reference, step by step: sequences join with chunked prefills, decode, leave (their
  seats refilled by the last one), arrive forked from a parent's cached prompt (copied in once), and, under a
  memory bound smaller than the batch needs, lose their seat and are read through the block gather.
- In the engine: the same tokens and logits as the block-gather backend, and PEFT's greedy tokens, for
  n-sample jobs (forks) and under a seat bound that leaves some sequences to the gather in the same steps.
"""

import random

import torch

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from lorabus.scheduler.kv_cache import PagedKVCache
from lorabus.scheduler.model import SeatAttention, StepBatch
from lorabus.scheduler.requests import Sequence, State
from helpers import PeftOracle, record_logits, submit_all

LAYERS, BLOCK, HKV, HEADS, DIM = 2, 4, 2, 4, 8


class Script:
    """A float64 paged cache with the seat backend over it, and each sequence's K/V history as written."""

    def __init__(self, max_positions: int | None = None):
        self.kv = PagedKVCache(LAYERS, 64, BLOCK, HKV, DIM, torch.float64, torch.device("cpu"))
        self.attention = SeatAttention(self.kv, torch.float64, torch.device("cpu"))
        if max_positions is not None:
            self.attention.seats.max_positions = max_positions
        self.free = list(range(64))
        self.history: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # id(seq) -> per layer (K, V)
        self.gen = torch.Generator().manual_seed(0)

    def sequence(self, name: str, length: int) -> Sequence:
        seq = Sequence(Request(name, "t", prompt_ids=[1] * length), [1] * length, 0.0, lambda c: None)
        seq.blocks = [self.free.pop() for _ in range(-(-length // BLOCK))]
        seq.kv_slots = torch.tensor(seq.blocks)
        seq.state = State.RUNNING
        self.history[id(seq)] = [(torch.empty(0, HKV, DIM, dtype=torch.float64),) * 2 for _ in range(LAYERS)]
        return seq

    def fork(self, parent: Sequence, name: str) -> Sequence:
        """A sequence that reads the parent's cached context (its blocks) without having written it here."""
        seq = self.sequence(name, len(parent.prompt_ids))
        self.free.extend(seq.blocks)
        seq.blocks, seq.kv_slots, seq.num_computed = parent.blocks, parent.kv_slots, parent.num_computed
        self.history[id(seq)] = list(self.history[id(parent)])
        return seq

    def step(self, batch: list[tuple[Sequence, int]]) -> int:
        """One step of every layer; checks each decode row against float64 attention over its history and
        returns how many decode rows were read through the block gather (no seat)."""
        seats = self.attention.seats
        plan = seats.plan(batch, torch.device("cpu"))
        rows, slots, gathered = [], [], []
        for seq, n in batch:
            positions = torch.arange(seq.num_computed, seq.num_computed + n)
            slots.append(seq.kv_slots[positions // BLOCK] * BLOCK + positions % BLOCK)
            if n == 1 and id(seq) not in seats.seat_index:
                gathered.append((len(rows), seq))
            rows.extend([seq] * n)
        width = max([seq.num_computed // BLOCK + 1 for _, seq in gathered], default=0)
        tables = torch.full((len(gathered), width), self.kv.null_block)
        for i, (_, seq) in enumerate(gathered):
            tables[i, :seq.num_computed // BLOCK + 1] = seq.kv_slots[:seq.num_computed // BLOCK + 1]
        ctx = torch.tensor([seq.num_computed + 1 for _, seq in gathered], dtype=torch.long)
        step = StepBatch(tokens=torch.zeros(len(rows), dtype=torch.long), positions=None,
                         write_slots=torch.cat(slots), lora=None,
                         decode_rows=torch.tensor([r for r, _ in gathered], dtype=torch.long), decode_blocks=tables,
                         decode_mask=(torch.arange(width * BLOCK)[None, :] < ctx[:, None])[:, None, None, :],
                         prefills=[], logit_rows=None, seats=plan)
        for layer in range(LAYERS):
            q, k, v = (torch.randn(len(rows), h, DIM, generator=self.gen, dtype=torch.float64)
                       for h in (HEADS, HKV, HKV))
            self.kv.write(layer, step.write_slots, k, v)
            out = self.attention(layer, q, k, v, step).view(len(rows), HEADS, DIM)
            row = 0
            for seq, n in batch:
                old_k, old_v = self.history[id(seq)][layer]
                new_k, new_v = torch.cat([old_k, k[row:row + n]]), torch.cat([old_v, v[row:row + n]])
                self.history[id(seq)][layer] = (new_k, new_v)
                if n == 1:  # the reference: every head over the whole history, its KV head by GQA
                    kh = new_k.repeat_interleave(HEADS // HKV, dim=1).transpose(0, 1)  # [H, C, D]
                    vh = new_v.repeat_interleave(HEADS // HKV, dim=1).transpose(0, 1)
                    weights = torch.softmax((kh @ q[row].unsqueeze(-1)).squeeze(-1) * DIM ** -0.5, dim=-1)
                    want = (weights.unsqueeze(-1) * vh).sum(1)
                    torch.testing.assert_close(out[row], want, rtol=1e-12, atol=1e-12)
                row += n
        for seq, n in batch:
            seq.num_computed += n
        return len(gathered)

    def finish(self, seq: Sequence) -> None:
        seq.state = State.FINISHED


def test_seats_read_exactly_through_joins_chunks_leaves_and_forks():
    s = Script()
    seats = s.attention.seats
    a, b = s.sequence("a", 40), s.sequence("b", 40)
    s.step([(a, 5)])  # a's first chunk: a seat
    s.step([(a, 6), (b, 3)])  # a's next chunk over its seat, b joins
    s.step([(a, 1), (b, 4)])  # a decodes beside b's chunk
    c = s.sequence("c", 40)
    for _ in range(3):
        s.step([(b, 1), (a, 1), (c, 2)])  # decode rows in another order than their seats
    assert seats.holders == [a, b, c]
    s.finish(a)  # a leaves: c, the last seat, moves into its row
    d = s.fork(b, "d")  # d reads b's cached context: copied into its seat once
    assert s.step([(c, 1), (b, 1), (d, 1)]) == 0
    assert seats.holders == [c, b, d] and seats.written == [c.num_computed, b.num_computed, d.num_computed]
    assert not seats.k[:, 3:].any() and not seats.v[:, 3:].any()  # vacated rows are zero
    capacity = seats.capacity
    while c.num_computed < capacity + 2:  # past the capacity: the rows grow, kept
        s.step([(c, 1), (d, 1)])  # b waits (not in the batch): its seat and rows stay
    assert seats.capacity > capacity
    s.step([(b, 1), (c, 1), (d, 1)])


def test_a_bound_smaller_than_the_batch_leaves_the_rest_to_the_gather():
    s = Script(max_positions=48)  # seats x capacity
    seats = s.attention.seats

    def step(batch) -> int:
        gathered = s.step(batch)
        assert seats.k.shape[1] * seats.capacity <= 48
        return gathered

    a, b, c = s.sequence("a", 60), s.sequence("b", 60), s.sequence("c", 60)
    step([(a, 20), (b, 20), (c, 20)])
    assert seats.holders == [a, b]  # the third does not fit
    assert [step([(a, 1), (b, 1), (c, 1)]) for _ in range(4)] == [1] * 4  # seated and gathered rows, one step
    assert step([(a, 12), (b, 1), (c, 1)]) == 1  # a needs 36 positions: the longest gives its seat up
    assert seats.holders == [b]
    s.finish(b)
    assert step([(a, 1), (c, 1)]) == 1  # b's seat is free: c (26 positions) takes it, a (37) still does not fit
    assert seats.holders == [c]
    s.finish(c)
    assert step([(a, 1)]) == 0  # alone a fits: its whole context is copied in once
    assert seats.holders == [a]
    assert step([(a, 1)]) == 0


def _engine_run(model_dir, adapter_dir, backend, requests, max_positions=None):
    engine = Engine(str(model_dir), EngineConfig(kv_cache_mb=4, kv_block_size=8, max_step_tokens=16,
                                                 max_running=6, attention_backend=backend))
    logits = record_logits(engine)
    mixed = []  # per step: (decode rows read from seats, decode rows gathered)
    if max_positions is not None:
        engine.model.attention.seats.max_positions = max_positions
    build = engine.runner._step_batch

    def recording_build(batch):
        out = build(batch)
        step = out[0]
        mixed.append((0 if step.seats is None else step.seats.out_rows.numel(), step.decode_rows.numel()))
        return out

    engine.runner._step_batch = recording_build
    engine.register(AdapterSpec("a", str(adapter_dir)))
    engine.start()
    try:
        results = submit_all(engine, requests, timeout=600)
    finally:
        engine.stop()
    assert all(c.status == "ok" for c in results.values()), results
    return results, logits, mixed


def _requests(n: int = 1):
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 500) for _ in range(length)] for length in (21, 6, 13, 30, 9)]
    params = SamplingParams(6, temperature=0.8, seed=7) if n > 1 else SamplingParams(6)
    return [Request(f"r{i}", "t", "a" if i % 2 else None, prompt_ids=p, params=params, n=n)
            for i, p in enumerate(prompts)]


def test_forked_choices_match_the_gather_backend(tiny_model, peft_adapters):
    adapter = peft_adapters["all-r8-rslora"]
    want, want_logits, _ = _engine_run(tiny_model, adapter, "torch", _requests(n=3))
    got, got_logits, mixed = _engine_run(tiny_model, adapter, "seats", _requests(n=3))
    assert {rid: [c.token_ids for c in r.choices] for rid, r in got.items()} == \
        {rid: [c.token_ids for c in r.choices] for rid, r in want.items()}
    assert got_logits.keys() == want_logits.keys()
    for key, expected in want_logits.items():
        torch.testing.assert_close(got_logits[key], expected, rtol=1e-5, atol=1e-5, msg=str(key))
    assert any(seated for seated, _ in mixed) and not any(gathered for _, gathered in mixed)


def test_a_seat_bound_matches_peft_and_the_gather_backend(tiny_model, peft_adapters):
    adapter = peft_adapters["all-r8-rslora"]
    requests = _requests()
    want, want_logits, _ = _engine_run(tiny_model, adapter, "torch", requests)
    got, got_logits, mixed = _engine_run(tiny_model, adapter, "seats", _requests(), max_positions=3 * 24)
    assert any(seated and gathered for seated, gathered in mixed)  # both read paths in one step
    assert {rid: r.token_ids for rid, r in got.items()} == {rid: r.token_ids for rid, r in want.items()}
    for key, expected in want_logits.items():
        torch.testing.assert_close(got_logits[key], expected, rtol=1e-5, atol=1e-5, msg=str(key))
    oracle = PeftOracle(tiny_model)
    for request in requests:
        oracle.assert_matches(adapter if request.adapter else None, request.prompt_ids, got[request.id].token_ids, 6,
                              request.id)
