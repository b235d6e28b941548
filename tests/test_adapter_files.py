"""An adapter's bytes belong to the worker once loaded (engine level, no broker): the weights file is read
once into memory the process owns and verified there, so truncating, overwriting or deleting it later
never kills the process (SIGBUS from a mapped page) and never changes what is served; a version read
from disk again (after eviction) is verified again, and a file restored to its published bytes loads
again without a restart."""

import asyncio
import hashlib
import json
import subprocess
import sys
import threading

import pytest
import torch

import lorabus.scheduler.adapters as adapters_module
from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from lorabus.scheduler.adapter_manager import mix_spec
from lorabus.scheduler.adapters import AdapterLoadError, read_adapter
from lorabus.worker.load_retry import LoadRetries
from file_changes import CHANGES, REASONS, WEIGHTS, change, copy_adapter, other_weights, restore, same_weights
from helpers import MixOracle, PeftOracle, submit_all

PROMPT = "the quick brown fox"
MAX_NEW = 5


@pytest.fixture(scope="module")
def shapes(tiny_model):
    return Engine(str(tiny_model), EngineConfig(kv_cache_mb=4)).model.shapes


@pytest.fixture(scope="module")
def oracle(tiny_model):
    return PeftOracle(tiny_model)


# ---- read_adapter: what it returns is the process's own -------------------------------------------------

# Runs in a child Python: if the tensors were still mapped from the file, touching them after the
# truncation raises SIGBUS, which would kill pytest itself.
_TOUCH_AFTER_TRUNCATE = """
import json, os, sys, torch
from lorabus.scheduler.adapters import read_adapter
from lorabus.scheduler.arch import ModelShapes
path, shapes = sys.argv[1], json.loads(sys.argv[2])
shapes = ModelShapes(shapes["num_layers"], {k: tuple(v) for k, v in shapes["projections"].items()},
                     {k: tuple(v) for k, v in shapes["targets"].items()})
weights = read_adapter("t", path, shapes, 64, torch.float32)
os.truncate(os.path.join(path, "adapter_model.safetensors"), 0)
print(sum(float(a.double().sum() + b.double().sum()) for a, b, _ in weights.modules.values()))
"""


def test_weights_outlive_their_file_being_truncated(peft_adapters, shapes, tmp_path):
    path, _ = copy_adapter(peft_adapters["all-r8-rslora"], tmp_path / "a")
    want = sum(float(a.double().sum() + b.double().sum())
               for a, b, _ in read_adapter("t", path, shapes, 64, torch.float32).modules.values())
    shapes_json = json.dumps({"num_layers": shapes.num_layers, "projections": shapes.projections,
                              "targets": shapes.targets})
    child = subprocess.run([sys.executable, "-P", "-c", _TOUCH_AFTER_TRUNCATE, str(path), shapes_json],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, (f"the child died ({child.returncode}; -7 is SIGBUS): its tensors were still "
                                   f"mapped from the truncated file\n{child.stderr[-2000:]}")
    assert float(child.stdout.split()[-1]) == want


def test_weights_do_not_follow_an_overwrite_in_place(peft_adapters, shapes, tmp_path):
    path, sha = copy_adapter(peft_adapters["qv-r4"], tmp_path / "a")
    before = read_adapter("t", path, shapes, 64, torch.float32, sha)
    kept = {k: (a.clone(), b.clone()) for k, (a, b, _) in before.modules.items()}
    change(path, "overwrite")
    assert same_weights({k: (a, b) for k, (a, b, _) in before.modules.items()}, kept), \
        "the loaded weights changed with the file: they are mapped from it"


def test_the_sha256_checked_is_that_of_the_bytes_served(peft_adapters, shapes, tmp_path, monkeypatch):
    """The file is overwritten in place right after its bytes are hashed: what is served must be what was
    verified (hashing the file, then reading it again, would serve the overwrite)."""
    path, sha = copy_adapter(peft_adapters["qv-r4"], tmp_path / "a")
    published = read_adapter("t", path, shapes, 64, torch.float32, sha)
    want = {k: (a.clone(), b.clone()) for k, (a, b, _) in published.modules.items()}
    original = (path / WEIGHTS).read_bytes()

    class OverwrittenOnceHashed:
        def __init__(self, *args):
            self._digest = hashlib.sha256(*args)

        def update(self, data):
            self._digest.update(data)

        def hexdigest(self):
            with open(path / WEIGHTS, "r+b") as fh:
                fh.write(other_weights(original))
            return self._digest.hexdigest()

    monkeypatch.setattr(adapters_module, "hashlib", type("hashlib", (), {"sha256": OverwrittenOnceHashed}))
    got = read_adapter("t", path, shapes, 64, torch.float32, sha)
    assert (path / WEIGHTS).read_bytes() != original  # the overwrite did happen
    assert same_weights({k: (a, b) for k, (a, b, _) in got.modules.items()}, want), \
        "the weights served are not the bytes whose sha256 was checked"


def test_a_file_larger_than_any_adapter_could_be_is_not_read(peft_adapters, shapes, tmp_path, monkeypatch):
    # With no header allowance and rank 1, the limit is the weights of a rank-1 adapter on every target
    # in float64: the rank-8 file is larger, and is refused on its size before anything is parsed.
    monkeypatch.setattr(adapters_module, "SAFETENSORS_MAX_HEADER_BYTES", 0)
    path = peft_adapters["all-r8-rslora"]
    with pytest.raises(AdapterLoadError, match="larger than any adapter for this model"):
        read_adapter("t", path, shapes, 1, torch.float32)
    assert (path / WEIGHTS).stat().st_size > adapters_module.max_weights_file_bytes(shapes, 1)


# ---- through the engine: each tier ------------------------------------------------------------------------


def _job(job_id, adapter, prompt_ids):
    return Request(job_id, "t", adapter, prompt_ids=prompt_ids, params=SamplingParams(MAX_NEW))


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
@pytest.mark.parametrize("how", CHANGES)
def test_a_changed_file_affects_only_its_version_in_each_tier(tiny_model, peft_adapters, oracle, tmp_path,
                                                              how, tier):
    """One device slot, two host entries. The changed version keeps serving what was verified while the
    worker holds it (device slot or host cache), fails with adapter_load_failed once it must be read from
    disk again, and loads again after its file is restored and a warm-up tries it; the others never notice."""
    target, sha = copy_adapter(peft_adapters["qv-r4"], tmp_path / "t")
    others = {"o1": peft_adapters["all-r8-rslora"], "o2": peft_adapters["mlp-r16-patterns"]}
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=4, max_loras=1, max_cpu_loras=2))
    spec = AdapterSpec("t", str(target), sha)
    engine.register(spec)
    for key, path in others.items():
        engine.register(AdapterSpec(key, str(path)))
    ids = oracle.prompt_ids(PROMPT)
    engine.start()
    try:
        def served(adapter, job_id):
            c = engine.generate(_job(job_id, adapter, ids), 60)
            assert c.status == "ok", c
            oracle.assert_matches(peft_adapters["qv-r4"] if adapter == "t" else others.get(adapter), ids,
                                  c.token_ids, MAX_NEW, job_id)

        def held():
            return "t" in engine.resident(), spec in engine.adapters.host_cache

        # Into the tier: a job for it puts it in the slot (and the host cache), others push it down.
        for i, adapter in enumerate(["t", "o1", "o2"][:{"device": 1, "host": 2, "disk": 3}[tier]]):
            served(adapter, f"place{i}")
        assert held() == {"device": (True, True), "host": (False, True), "disk": (False, False)}[tier]

        original = change(target, how)
        jobs = [_job(f"j{i}", adapter, ids) for i, adapter in enumerate(["t", "o1", None, "t", "o1", "t"])]
        results = submit_all(engine, jobs)
        for job in jobs:
            c = results[job.id]
            if job.adapter == "t" and tier == "disk":
                assert (c.status, c.error_code) == ("error", "adapter_load_failed"), c
                assert REASONS[how] in c.error_message, c.error_message
            else:  # what the engine holds is what was verified: the published weights
                assert c.status == "ok", c
                oracle.assert_matches(peft_adapters["qv-r4"] if job.adapter == "t" else others.get(job.adapter),
                                      ids, c.token_ids, MAX_NEW, job.id)

        # Pushed out of both tiers, it is read from disk again, and verified again.
        served("o2", "evict0")
        served("o1", "evict1")
        assert held() == (False, False)
        again = engine.generate(_job("again", "t", ids), 60)
        assert (again.status, again.error_code) == ("error", "adapter_load_failed"), again
        assert REASONS[how] in again.error_message, again.error_message

        # Restored: the failure is remembered (jobs answered at once) until a warm-up tries the disk again.
        restore(target, original)
        remembered = engine.generate(_job("remembered", "t", ids), 60)
        assert remembered.error_code == "adapter_load_failed", remembered
        warmed, done = [], threading.Event()
        engine.warm("t", lambda c: (warmed.append(c), done.set()))
        assert done.wait(60) and warmed[0].status == "ok", warmed
        served("t", "after")
    finally:
        engine.stop()


def test_a_mix_that_failed_on_a_member_builds_once_the_member_loads_again(tiny_model, peft_adapters, tmp_path):
    """A mix's failure is remembered like any adapter's, and reported as its member's own failure (the worker
    then serves name-only members from another version); a member that loads again lets it be built again."""
    member, sha = copy_adapter(peft_adapters["qv-r4"], tmp_path / "m")
    oracle = MixOracle(tiny_model, {"m": peft_adapters["qv-r4"], "o": peft_adapters["all-r8-rslora"]})
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=4))
    specs = {"m": AdapterSpec("m", str(member), sha), "o": AdapterSpec("o", str(peft_adapters["all-r8-rslora"]))}
    for spec in specs.values():
        engine.register(spec)
    mix = mix_spec([(specs["m"], 0.7), (specs["o"], -0.4)])
    engine.register(mix)
    ids = oracle.prompt_ids(PROMPT)
    loads = []
    engine.on_load = lambda key, _seconds, error, _source: loads.append((key, error))
    engine.start()
    try:
        original = change(member, "delete")
        failed = engine.generate(_job("failed", mix.key, ids), 60)
        assert failed.error_code == "adapter_load_failed" and "no adapter_model.safetensors" in failed.error_message
        assert ("m", failed.error_message) in loads and (mix.key, failed.error_message) in loads, loads
        assert loads.index(("m", failed.error_message)) < loads.index((mix.key, failed.error_message))
        alone = engine.generate(_job("alone", "m", ids), 60)  # remembered for the member's own jobs too
        assert alone.error_code == "adapter_load_failed", alone
        restore(member, original)
        warmed, done = [], threading.Event()
        engine.warm("m", lambda c: (warmed.append(c), done.set()))
        assert done.wait(60) and warmed[0].status == "ok", warmed
        built = engine.generate(_job("built", mix.key, ids), 60)
    finally:
        engine.stop()
    assert built.status == "ok", built
    oracle.assert_matches((("m", 0.7), ("o", -0.4)), ids, built.token_ids, MAX_NEW, "built")


# ---- the worker's tries of a failed version (worker/load_retry.py) -----------------------------------------


async def test_a_failed_version_is_tried_again_ever_less_often(monkeypatch):
    loop, tried, waits = asyncio.get_running_loop(), [], []
    call_later = loop.call_later

    def at_once(wait, fn, *args):  # a try's wait is recorded, and the try runs at once
        if getattr(fn, "__name__", "") != "_fire":  # asyncio.sleep's own timers
            return call_later(wait, fn, *args)
        waits.append(wait)
        return call_later(0, fn, *args)

    monkeypatch.setattr(loop, "call_later", at_once)

    async def fail_and_try(retries):
        retries.failed("t@v1")
        retries.failed("t@v1")  # a second failure while a try is due schedules nothing more
        await asyncio.sleep(0.01)

    retries = LoadRetries(1.0, 5.0, tried.append)
    for _ in range(5):
        await fail_and_try(retries)
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0] and tried == ["t@v1"] * 5
    retries.settled("t@v1")  # it loaded: the next failure starts afresh
    await fail_and_try(retries)
    assert waits[-1] == 1.0
    retries.failed("t@v1")
    retries.settled("t@v1")  # a try due is called off
    await asyncio.sleep(0.01)
    assert len(tried) == 6

    off = LoadRetries(0, 5.0, tried.append)
    off.failed("t@v1")
    await asyncio.sleep(0.01)
    assert len(tried) == 6 and len(waits) == 7
