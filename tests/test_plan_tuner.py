"""The LoRA plan tuner: every candidate plan is exact, the fastest measured one is kept, cached per machine and
shapes, and shown by the engine (kernels/plan_tuner.py, scheduler/lora.py)."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest
import torch

from lorabus.kernels import make_lora_mapping, torch_ops
from lorabus.kernels.plan_tuner import PlanTuner
from lorabus.scheduler import Engine, EngineConfig
from lorabus.scheduler.lora import AdapterPool
from seeded import generator_for



@pytest.fixture
def gen(request):
    return generator_for(request)


ALL_PLANS = {"span", "active", "token", "segment", "split+span", "split+active", "split+token"}


def _reference(x, y0, a, bs, scale, idx, ranks=None):
    """y0 + scale * B(A x) per token in float64, each slot at its own true rank."""
    ref = y0.double().clone()
    H = bs[0].shape[1]
    for i, slot in enumerate(idx.tolist()):
        if slot < 0:
            continue
        r = a.shape[1] if ranks is None else ranks[slot]
        for s, b in enumerate(bs):
            delta = b[slot, :, :r].double() @ (a[slot, :r, s].double() @ x[i].double())
            ref[i, s * H:(s + 1) * H] += scale[slot, s].double() * delta
    return ref


def _steps(gen, num_slots):
    """Fresh random steps of every kind: distinct decode tokens, a hot adapter beside single ones, a long
    prefill beside decode tokens, a contiguous run of slots, prompts of several lengths; with tokens that have
    no adapter."""
    perm = torch.randperm(num_slots, generator=gen).tolist()
    hot = [perm[0]] * 6 + perm[1:7]
    steps = [
        perm[:9],
        [hot[i] for i in torch.randperm(len(hot), generator=gen).tolist()],
        [perm[3]] * 21 + perm[4:9] + [-1, perm[9]],
        [2, 3, 3, 4, 5, 5, -1, 6],
        [perm[0]] * 9 + [perm[1]] * 7 + [perm[2]] * 2 + [perm[3]] * 2 + [perm[4]],
        [perm[0], perm[-1], perm[0], perm[-1]],
    ]
    return [torch.tensor(s) for s in steps]


def test_every_candidate_plan_equals_float64(gen):
    """Each plan apply_slot_major offers for a step gives y + scale * B(A x) per token to fp32 rounding, on
    random shapes and ranks (slots of their own true rank below the pool's), rows without an adapter untouched;
    and between them the steps offer every plan."""
    seen = set()
    for trial in range(3):
        L = int(torch.randint(10, 14, (1,), generator=gen))
        R, S, H = (8, 16)[trial % 2], 1 + trial % 3, int(torch.randint(12, 40, (1,), generator=gen))
        a = torch.randn(L, R, S, H, generator=gen) / H ** 0.5
        bs = [torch.randn(L, H, R, generator=gen) / R ** 0.5 for _ in range(S)]
        ranks = torch.randint(1, R + 1, (L,), generator=gen).tolist()
        for slot, r in enumerate(ranks):  # the pool's zero padding past each slot's true rank
            a[slot, r:] = 0
            for b in bs:
                b[slot, :, r:] = 0
        scale = torch.rand(L, S, generator=gen) + 0.5
        for idx in _steps(gen, L):
            m = make_lora_mapping(idx, L)
            x = torch.randn(len(idx), H, generator=gen)
            y0 = torch.randn(len(idx), S * H, generator=gen)
            ref = _reference(x, y0, a, bs, scale, idx, ranks)
            plans = torch_ops.candidate_plans(m)
            assert "segment" in plans
            seen.update(plans)
            for plan in plans:
                y = y0.clone()
                rank = max(ranks[s] for s in m.active_slots)
                torch_ops.apply_slot_major(x, y, a, bs, scale, [s * H for s in range(S)], m, rank, ranks, plan)
                torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6 * float(ref.abs().max()),
                                           msg=lambda text, plan=plan: f"{plan}: {text}")
                assert torch.equal(y[idx < 0], y0[idx < 0]), plan
    assert seen == ALL_PLANS


def test_pool_rank_options_are_exact_and_the_tuner_keeps_one(gen, tmp_path):
    """A step mixing ranks offers one call at the largest rank and one call per rank bucket; both give the float64
    result, and the pool's measured choice (and the plan of each call) is in the tuner's table."""
    H = 24
    pool = AdapterPool({"p": (H, H)}, 1, 6, 32, torch.float32, torch.device("cpu"), backend="torch",
                       groups={"g": ("p",)})
    pool.tuner = PlanTuner("first-use", str(tmp_path / "plans.json"), {"test": 1})
    weights = {}
    for slot, r in {0: 4, 1: 16, 2: 8, 3: 32, 4: 16}.items():
        weights[slot] = (torch.randn(r, H, generator=gen), torch.randn(H, r, generator=gen), 0.5 + slot)
        pool.write(slot, SimpleNamespace(modules={(0, "p"): weights[slot]}))
    idx = torch.tensor([0, 2, 0, 2, -1, 1, 4, 0, 2, 3, 0, 2])
    m = make_lora_mapping(idx, 6)
    options = pool._rank_options(m, pool._rank["g"])
    assert [(r, part.active_slots) for r, part in options["by-rank"]] == [(8, (0, 2)), (16, (1, 4)), (32, (3,))]
    assert [(r, part.active_slots) for r, part in options["one-call"]] == [(32, (0, 1, 2, 3, 4))]
    x = torch.randn(len(idx), H, generator=gen)
    y0 = torch.randn(len(idx), H, generator=gen)
    ref = y0.double().clone()
    for i, slot in enumerate(idx.tolist()):
        if slot >= 0:
            a, b, s = weights[slot]
            ref[i] += s * (b.double() @ (a.double() @ x[i].double()))
    for name, parts in options.items():
        for k, (_, part) in enumerate(parts):
            for plan in torch_ops.candidate_plans(part) or [None]:
                y = y0.clone()
                runs = [(r, p, plan if j == k else None) for j, (r, p) in enumerate(parts)]
                pool._run(0, "g", x, lambda y=y: y, runs, pool._rank["g"])
                torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()),
                                           msg=lambda text, n=name, p=plan: f"{n}/{p}: {text}")
    y = y0.clone()
    pool.apply(0, "g", x, y, m)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    table = {row["shape"]: row for row in pool.plans()}
    top = [row for shape, row in table.items() if ".ranks" in shape]
    assert len(top) == 1 and top[0]["plan"] in ("one-call", "by-rank"), table
    assert set(top[0]["times_us"]) == {"one-call", "by-rank"}


def test_tuner_keeps_the_fastest_and_caches_it_per_identity(tmp_path, caplog):
    """The tuner times each candidate (those far slower than the best only once), keeps the fastest and logs it
    once; a second tuner on the same file and
    identity reuses the choice without running anything; a foreign or corrupt file is ignored, not fatal;
    mode "off" returns the first candidate untimed."""
    path = str(tmp_path / "plans" / "m.json")
    calls = []

    def candidate(name, seconds):
        return lambda: (calls.append(name), time.sleep(seconds))

    candidates = {"slow": candidate("slow", 0.02), "fast": candidate("fast", 0.0), "slower": candidate("slower", 0.04)}
    with caplog.at_level(logging.INFO, logger="lorabus.kernels.plan_tuner"):
        tuner = PlanTuner("first-use", path, {"cpu": "x", "torch": "1"}, repeats=2)
        assert tuner.choose("qkv", "t32", candidates) == "fast"
        assert tuner.choose("qkv", "t32", candidates) == "fast"
    # A warm-up and a timed round each; then only those within SLOW_FACTOR of the best; nothing the second time.
    assert calls == ["slow", "fast", "slower"] * 2 + ["fast"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: ")]
    assert len(lines) == 1 and "group=qkv shape=t32 plan=fast" in lines[0]
    [row] = tuner.table()
    assert row["plan"] == "fast" and row["source"] == "measured"
    assert min(row["times_us"], key=row["times_us"].get) == "fast"

    calls.clear()
    again = PlanTuner("first-use", path, {"cpu": "x", "torch": "1"})
    assert again.choose("qkv", "t32", candidates) == "fast" and calls == []
    assert again.table()[0]["source"] == "cache"

    foreign = PlanTuner("off", path, {"cpu": "y", "torch": "1"})
    assert foreign.table() == [] and foreign.choose("qkv", "t32", candidates) == "slow" and calls == []
    with open(path, "w") as f:
        f.write('{"format": "lorabus-plans/1", "identity": {"cpu": "x", "torch": "1"}, "plans": [{"group": 1}]')
    with caplog.at_level(logging.WARNING):
        assert PlanTuner("first-use", path, {"cpu": "x", "torch": "1"}).table() == []
    assert any("plan cache" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    for bad in ("0", "-1", "NaN", "Infinity", "{}"):  # every time is positive and finite, and there is one
        times = bad if bad == "{}" else f'{{"a": 1, "b": {bad}}}'
        with open(path, "w") as f:
            f.write('{"format": "lorabus-plans/1", "identity": {"cpu": "x", "torch": "1"}, "plans": '
                    f'[{{"group": "qkv", "shape": "t32", "plan": "a", "times_us": {times}}}]}}')
        assert PlanTuner("first-use", path, {"cpu": "x", "torch": "1"}).table() == [], bad
    with pytest.raises(ValueError):
        PlanTuner("sometimes")


def test_a_bounded_table_takes_each_group_in_turn():
    """A cache file keeps every shape any engine on the machine met: 300 choices of one group (sorted first)
    must not crowd the others out of a table bounded for a status record or a metric."""
    tuner = PlanTuner("off")
    for group, count in (("attention", 2), ("down", 300), ("qkv", 3)):
        for i in range(count):
            tuner.record(group, f"t{i:03d}", {"a": 1.0 + i, "b": 2.0})
    assert len(tuner.table()) == 305
    rows = tuner.table(20)
    assert len(rows) == 20 and rows == sorted(rows, key=lambda r: (r["group"], r["shape"]))
    assert [(r["group"], r["shape"]) for r in rows if r["group"] != "down"] == [
        ("attention", "t000"), ("attention", "t001"), ("qkv", "t000"), ("qkv", "t001"), ("qkv", "t002")]
    assert [r["shape"] for r in rows if r["group"] == "down"] == [f"t{i:03d}" for i in range(15)]
    assert tuner.table(400) == tuner.table()


def test_engine_tunes_at_startup_and_reuses_the_cache(tiny_model, tmp_path):
    """With plan_tuning "startup" the engine times the plans of its representative steps before serving:
    `plans()` lists them (each the fastest of its measured candidates), the cache file holds them, and a second
    engine on the same machine and shapes measures nothing. "off" tunes nothing."""
    config = EngineConfig(device="cpu", kv_cache_mb=16, max_loras=8, max_running=16, max_step_tokens=64,
                          plan_cache_dir=str(tmp_path), plan_tuning_budget_s=600)  # all steps, however busy the CPU
    engine = Engine(str(tiny_model), config)
    plans = engine.plans()
    # The LoRA groups, and the attention backend's start-up probe (tests/test_attention_tuning.py).
    assert plans and {row["group"] for row in plans} == set(engine.adapters.pool.groups) | {"attention"}
    for row in plans:
        assert row["source"] == "measured" and row["plan"] == min(row["times_us"], key=row["times_us"].get)
    [path] = list(tmp_path.iterdir())
    assert len(json.loads(path.read_text())["plans"]) == len(plans)
    second = Engine(str(tiny_model), config)
    assert second.adapters.pool.tuner.measured_s == 0
    assert [(r["group"], r["shape"], r["plan"]) for r in second.plans()] == [(r["group"], r["shape"], r["plan"])
                                                                            for r in plans]
    assert {r["source"] for r in second.plans()} == {"cache"}
    off = Engine(str(tiny_model), EngineConfig(device="cpu", kv_cache_mb=16, plan_tuning="off",
                                               plan_cache_dir=str(tmp_path / "other")))
    assert off.plans() == [] and not (tmp_path / "other").exists()
