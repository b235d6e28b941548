"""The CPU attention backend chosen by measurement (scheduler/attention_tuning.py): with `auto`, the engine
times decode steps through seats and torch at start-up, keeps the backend faster over the probe points,
caches the times with the LoRA plans, and follows the times (not a rule) when they say otherwise. The
probe leaves nothing behind: an engine that probed computes what one told its backend does."""

import json
import math
import random
from pathlib import Path

import torch

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from lorabus.scheduler.attention_tuning import CANDIDATES, GROUP
from helpers import record_logits, submit_all

SETTINGS = dict(kv_cache_mb=8, max_running=8, max_model_len=256)


def _engine(model_dir: Path, cache_dir: Path, **overrides) -> Engine:
    return Engine(str(model_dir), EngineConfig(plan_cache_dir=str(cache_dir), **{**SETTINGS, **overrides}))


def _attention_rows(engine: Engine) -> list[dict]:
    return [row for row in engine.plans() if row["group"] == GROUP]


def _faster_over(rows: list[dict]) -> str:
    """The backend with the lower geometric mean of its time relative to the faster one, per probe point."""
    def score(name):
        return sum(math.log(r["times_us"][name] / min(r["times_us"].values())) for r in rows)
    return min(CANDIDATES, key=score)


def _rewrite_times(cache_dir: Path, times: dict[str, float]) -> None:
    """Every attention entry of the plan cache file(s) says `times` (as if measured so on this machine)."""
    files = list(cache_dir.glob("*.json"))
    assert files, "no plan cache file written"
    for path in files:
        data = json.loads(path.read_text())
        for entry in data["plans"]:
            if entry["group"] == GROUP:
                entry["times_us"] = dict(times)
                entry["plan"] = min(times, key=times.get)
        path.write_text(json.dumps(data))


def test_auto_times_both_backends_at_startup_and_keeps_the_faster(tiny_model, tmp_path):
    engine = _engine(tiny_model, tmp_path)
    rows = _attention_rows(engine)
    # Two probe points (contexts 64 and 255: the model length caps 512), a full batch of 8 each.
    assert [r["shape"].split(".")[:2] for r in rows] == [["b8", "c255"], ["b8", "c64"]], rows
    for row in rows:
        assert row["source"] == "measured" and set(row["times_us"]) == set(CANDIDATES), row
        assert all(t > 0 for t in row["times_us"].values()), row
    assert engine.model.attention.name == _faster_over(rows)

    again = _engine(tiny_model, tmp_path)  # the same machine and shapes: read from the cache, nothing timed
    assert [r["source"] for r in _attention_rows(again)] == ["cache", "cache"]
    assert again.adapters.pool.tuner.measured_s == 0.0
    assert again.model.attention.name == engine.model.attention.name


def test_the_choice_follows_the_times(tiny_model, tmp_path):
    _engine(tiny_model, tmp_path)
    _rewrite_times(tmp_path, {"seats": 900.0, "torch": 300.0})
    assert _engine(tiny_model, tmp_path).model.attention.name == "torch"
    _rewrite_times(tmp_path, {"seats": 300.0, "torch": 900.0})
    assert _engine(tiny_model, tmp_path).model.attention.name == "seats"
    # With tuning off the cached times still decide; with none cached, seats serves untimed.
    _rewrite_times(tmp_path, {"seats": 900.0, "torch": 300.0})
    assert _engine(tiny_model, tmp_path, plan_tuning="off").model.attention.name == "torch"
    untimed = _engine(tiny_model, tmp_path / "empty", plan_tuning="off")
    assert untimed.model.attention.name == "seats" and not _attention_rows(untimed)


def test_a_backend_asked_for_is_not_probed(tiny_model, tmp_path):
    for backend in ("seats", "torch"):
        engine = _engine(tiny_model, tmp_path, attention_backend=backend)
        assert engine.model.attention.name == backend and not _attention_rows(engine)


def test_an_engine_that_probed_computes_what_its_backend_computes_untimed(tiny_model, peft_adapters, tmp_path):
    """The probe writes K/V into cache blocks and builds runners over both backends: none of it may leak into
    serving. Same jobs, same logits as an engine given that backend outright."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 23, 40, 17, 64, 9)]
    results = {}
    for name, overrides in (("probed", {}), ("told", None)):
        if overrides is None:
            overrides = dict(attention_backend=results["probed"][0], plan_tuning="off")
        engine = _engine(tiny_model, tmp_path / name, max_step_tokens=32, **overrides)
        chosen = engine.model.attention.name
        logits = record_logits(engine)
        engine.register(AdapterSpec("a", str(peft_adapters["all-r8-rslora"])))
        engine.start()
        try:
            done = submit_all(engine, [Request(f"r{i}", "t", "a" if i % 2 else None, prompt_ids=p,
                                               params=SamplingParams(6)) for i, p in enumerate(prompts)], timeout=300)
        finally:
            engine.stop()
        assert all(c.status == "ok" for c in done.values()), done
        results[name] = (chosen, {rid: c.token_ids for rid, c in done.items()}, logits)
    assert results["told"][0] == results["probed"][0]
    assert results["probed"][1] == results["told"][1]
    assert results["probed"][2].keys() == results["told"][2].keys()
    for key, row in results["probed"][2].items():
        torch.testing.assert_close(row, results["told"][2][key], rtol=0, atol=0)
