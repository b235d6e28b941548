"""Weighted adapter mixes without a broker: the wire rules of a job's `mix`, the concatenated-rank math
against a float64 reference and against PEFT's own "cat" combination, the canonical mix key,
re-publishing a member dropping the mixes built from it, and the engine serving mixes next to plain
adapters (Triton kernels, fused Phi-3 modules) with PEFT's greedy tokens."""

import json

import msgspec
import pytest
import torch

from lorabus.scheduler import adapter_manager
from lorabus.scheduler.adapter_manager import AdapterManager, AdapterSpec, mix_key, mix_spec
from lorabus.scheduler.adapters import AdapterLoadError, AdapterWeights, combine_adapters, read_adapter
from lorabus.scheduler.arch import ModelShapes
from lorabus.scheduler.config import EngineConfig
from lorabus.scheduler.engine import Engine
from lorabus.scheduler.policy import AdapterSlots
from lorabus.schemas import JobError, JobResult, MixUsed, decode_job, decode_result, encode
from lorabus.schemas.v1 import MAX_MIX_MEMBERS, MAX_MIX_WEIGHT
from lorabus.scheduler.requests import Request, SamplingParams
from lorabus.worker.testing import build_tiny_model
from helpers import MixOracle, make_peft_adapter, submit_all


def _job(**fields) -> bytes:
    return json.dumps({"id": "j", "tenant": "t", "prompt": "hi", **fields}).encode()


def _members(n: int, weight=0.5) -> list[dict]:
    return [{"adapter": f"a{i}", "weight": weight} for i in range(n)]


# ---- wire ----------------------------------------------------------------------------------------


def test_mix_decodes_with_versions_and_negative_weights():
    job = decode_job(_job(mix=[{"adapter": "legal@v2", "weight": 0.7}, {"adapter": "summarize", "weight": -0.3}]))
    assert [(m.adapter, m.weight) for m in job.mix] == [("legal@v2", 0.7), ("summarize", -0.3)]
    assert job.adapter is None
    assert len(decode_job(_job(mix=_members(MAX_MIX_MEMBERS))).mix) == MAX_MIX_MEMBERS


@pytest.mark.parametrize("raw,fragment", [
    (_job(mix=[]), "length >= 1"),
    (_job(mix=_members(MAX_MIX_MEMBERS + 1)), f"length <= {MAX_MIX_MEMBERS}"),
    (_job(mix=[{"adapter": "a", "weight": 0}]), "must not be 0"),
    (_job(mix=[{"adapter": "a", "weight": MAX_MIX_WEIGHT * 1.5}]), f"<= {MAX_MIX_WEIGHT}"),
    (_job(mix=[{"adapter": "a", "weight": -MAX_MIX_WEIGHT * 1.5}]), f">= {-MAX_MIX_WEIGHT}"),
    (_job(mix=[{"adapter": "a"}]), "weight"),
    (_job(mix=[{"adapter": "a", "weight": "0.5"}]), "Expected `float`"),
    (_job(mix=[{"adapter": "a", "weight": 1, "scale": 2}]), "unknown field"),
    (_job(mix=[{"adapter": "bad name", "weight": 1}]), "bad adapter reference"),
    (_job(adapter="a", mix=[{"adapter": "b", "weight": 1}]), "either `adapter` or `mix`"),
    (b'{"id":"j","tenant":"t","prompt":"hi","mix":[{"adapter":"a","weight":1e999}]}', "out of range"),  # inf
    (b'{"id":"j","tenant":"t","prompt":"hi","mix":[{"adapter":"a","weight":NaN}]}', "malformed"),
])
def test_bad_mixes_are_invalid_jobs(raw, fragment):
    with pytest.raises(JobError) as err:
        decode_job(raw)
    assert err.value.code == "invalid_job" and err.value.job_id == "j"
    assert fragment in err.value.message


def test_adapter_header_does_not_add_to_a_mix():
    job = decode_job(_job(mix=[{"adapter": "a", "weight": 1}]), [("x-adapter-id", b"other")])
    assert job.adapter is None and job.mix[0].adapter == "a"


def test_result_names_every_member():
    result = JobResult(id="j", status="ok", mix=[MixUsed("legal", "v2", 0.7), MixUsed("summarize", "v1", -0.3)])
    back = decode_result(encode(result))
    assert back.mix == result.mix and back.adapter is None
    assert json.loads(encode(result))["mix"][1] == {"adapter": "summarize", "version": "v1", "weight": -0.3}
    assert decode_result(encode(JobResult(id="k", status="ok"))).mix is None  # v1 readers of plain results


# ---- the canonical key ---------------------------------------------------------------------------


def test_mix_key_is_canonical():
    a, b = AdapterSpec("legal@v2", "/a"), AdapterSpec("summarize@v1", "/b")
    one, other = mix_spec([(a, 0.7), (b, -0.3)]), mix_spec([(b, -0.3), (a, 0.7)])
    assert one == other and one.key == "mix:legal@v2*0.7+summarize@v1*-0.3"
    assert mix_key([("summarize@v1", -0.3), ("legal@v2", 0.7)]) == one.key
    assert mix_key([("legal@v2", 1)]) == mix_key([("legal@v2", 1.0)]) != mix_key([("legal@v2", 1.0000001)])
    assert mix_spec([(AdapterSpec("legal@v2", "/a", "f" * 64), 0.7), (b, -0.3)]) != one  # new content, new spec


# ---- the math --------------------------------------------------------------------------------------


def _random_adapter(key: str, ranks: dict[tuple[int, str], int], dims: dict[str, tuple[int, int]], seed: int):
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for (layer, proj), r in ranks.items():
        d_in, d_out = dims[proj]
        modules[(layer, proj)] = (torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen),
                                  float(torch.rand((), generator=gen)) * 4)
    return AdapterWeights(key, modules)


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * b.double() @ a.double()


def test_combined_adapter_is_the_exact_weighted_sum():
    dims = {"q_proj": (12, 12), "v_proj": (12, 4), "down_proj": (20, 12)}
    members = [
        (_random_adapter("x", {(0, "q_proj"): 2, (1, "v_proj"): 3}, dims, 1), 0.7),
        (_random_adapter("y", {(0, "q_proj"): 5, (1, "down_proj"): 1}, dims, 2), -1.25),  # other targets, ranks
        (_random_adapter("z", {(1, "v_proj"): 4}, dims, 3), 2.0),
    ]
    mixed = combine_adapters("m", members, max_rank=7, dtype=torch.float32)
    want: dict = {}
    for adapter, weight in members:
        for module, (a, b, scale) in adapter.modules.items():
            want[module] = want.get(module, 0) + weight * _delta(a, b, scale)
    assert set(mixed.modules) == set(want)
    for module, (a, b, scale) in mixed.modules.items():
        assert scale == 1.0 and a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(_delta(a, b, scale), want[module], rtol=1e-5, atol=1e-5)
    assert mixed.modules[(0, "q_proj")][0].shape[0] == 7 and mixed.modules[(1, "down_proj")][0].shape[0] == 1


def test_mix_rank_over_the_pool_limit_is_refused():
    dims = {"q_proj": (8, 8)}
    members = [(_random_adapter(k, {(0, "q_proj"): 4}, dims, i), 1.0) for i, k in enumerate("abc")]
    with pytest.raises(AdapterLoadError, match=r"m: mix rank 12 \(layer 0 q_proj\) exceeds the pool's max rank 8"):
        combine_adapters("m", members, max_rank=8, dtype=torch.float32)


def test_folded_weight_overflowing_the_pool_dtype_is_refused():
    dims = {"q_proj": (8, 8)}
    big = _random_adapter("a", {(0, "q_proj"): 2}, dims, 0)
    big.modules[(0, "q_proj")] = (big.modules[(0, "q_proj")][0] * 6e4, big.modules[(0, "q_proj")][1], 1.0)
    with pytest.raises(AdapterLoadError, match="overflows"):
        combine_adapters("m", [(big, 50.0)], max_rank=8, dtype=torch.float16)


@pytest.fixture(scope="module")
def shapes(tiny_model) -> ModelShapes:
    return Engine(str(tiny_model), EngineConfig(kv_cache_mb=4)).model.shapes


def test_combined_peft_adapters_equal_peft_cat(tiny_model, peft_adapters, shapes):
    """The weights-level oracle: each module's mixed delta equals the one PEFT's "cat" combination builds
    (different ranks and targets, rank/alpha patterns, rsLoRA, a negative weight)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = ["mlp-r16-patterns", "qv-r4", "all-r8-rslora"]  # PEFT copies the first one's use_rslora: not rsLoRA
    weights = [0.6, -0.8, 1.3]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), peft_adapters[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(peft_adapters[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "mix", combination_type="cat")
    members = [(read_adapter(n, peft_adapters[n], shapes, 64, torch.float32), w) for n, w in zip(names, weights)]
    mixed = combine_adapters("m", members, max_rank=64, dtype=torch.float32)
    checked = 0
    for module_name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "mix" not in module.lora_A:
            continue
        layer = int(module_name.split("layers.")[1].split(".")[0])
        peft_delta = module.get_delta_weight("mix").double()
        a, b, scale = mixed.modules[(layer, module_name.rsplit(".", 1)[-1])]
        torch.testing.assert_close(_delta(a, b, scale), peft_delta, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == len(mixed.modules) == 2 * 7  # two layers, every projection targeted by some member


# ---- the manager: building through the host cache, invalidation -----------------------------------------


def test_republished_member_drops_its_mixes(peft_adapters, shapes):
    manager = AdapterManager(shapes, EngineConfig(max_loras=2, max_lora_rank=32), torch.float32,
                             torch.device("cpu"), device_bytes=0)
    qv, rs = AdapterSpec("qv@v1", str(peft_adapters["qv-r4"])), AdapterSpec("rs@v1", str(peft_adapters["all-r8-rslora"]))
    for spec in (qv, rs):
        manager.register(spec)
    mix = mix_spec([(qv, 0.5), (rs, -1.0)])
    manager.register(mix)
    slots = AdapterSlots(2)
    slots.take(0, mix.key, 0.0)
    manager._load(mix, 0)
    slots.loaded(mix.key, True)
    assert manager.host_cache.get(mix) is not None and manager.host_cache.get(qv) is not None  # members cached too
    assert manager.pool._rank["qkv"][0] == 4 + 8

    new_qv = AdapterSpec("qv@v1", str(peft_adapters["mlp-r16-patterns"]))
    old = manager.register(new_qv)
    assert old == qv
    manager.invalidate(old, slots)
    assert manager.host_cache.get(mix) is None and manager.host_cache.get(qv) is None
    assert not slots.is_ready(mix.key)  # new jobs of the mix load it again
    assert manager.spec(new_qv.key) == new_qv


def test_registered_mixes_are_bounded(monkeypatch, shapes):
    """Any weights make a new mix: the least recently asked are forgotten past MAX_MIX_SPECS."""
    monkeypatch.setattr(adapter_manager, "MAX_MIX_SPECS", 2)
    manager = AdapterManager(shapes, EngineConfig(max_loras=1), torch.float32, torch.device("cpu"), device_bytes=0)
    member = AdapterSpec("qv@v1", "/qv")
    manager.register(member)
    mixes = [mix_spec([(member, weight)]) for weight in (0.5, 0.25, 0.125)]
    for mix in mixes[:2]:
        manager.register(mix)
    manager.register(mixes[0])  # asked again: the most recent now
    manager.register(mixes[2])
    assert [manager.knows(m.key) for m in mixes] == [True, False, True]
    assert manager.knows(member.key)  # published adapters are never forgotten


def test_mix_of_unreadable_member_fails_with_its_reason(tmp_path, peft_adapters, shapes):
    manager = AdapterManager(shapes, EngineConfig(max_loras=1, max_lora_rank=32), torch.float32,
                             torch.device("cpu"), device_bytes=0)
    good, missing = AdapterSpec("qv@v1", str(peft_adapters["qv-r4"])), AdapterSpec("gone@v1", str(tmp_path / "nothing"))
    with pytest.raises(AdapterLoadError, match="gone@v1: no adapter_config.json"):
        manager._load(mix_spec([(good, 1.0), (missing, 1.0)]), None)


def test_result_mix_members_need_a_weight():
    with pytest.raises(msgspec.ValidationError):
        decode_result(b'{"id":"j","status":"ok","mix":[{"adapter":"a","version":"v1"}]}')


# ---- the engine against PEFT ---------------------------------------------------------------------


def _engine_matches_peft(model_dir, adapters: dict, mixes: list, config: EngineConfig, max_new: int = 5) -> None:
    """Mix and plain-adapter requests submitted together (they share steps); each equals PEFT's greedy."""
    oracle = MixOracle(model_dir, adapters)
    engine = Engine(str(model_dir), config)
    specs = {name: AdapterSpec(f"{name}@v1", str(path)) for name, path in adapters.items()}
    for spec in specs.values():
        engine.register(spec)
    mix_keys = []
    for mix in mixes:
        spec = mix_spec([(specs[name], weight) for name, weight in mix])
        engine.register(spec)
        mix_keys.append(spec.key)
    prompts = ["the quick brown fox", "hello world", "summarize: the meeting"]
    requests, want = [], {}
    for i, prompt in enumerate(prompts):
        for j, mix in enumerate(mixes):
            requests.append(Request(f"mix{j}-{i}", "t", mix_keys[j], prompt=prompt, params=SamplingParams(max_new)))
            want[requests[-1].id] = (tuple(mix), prompt)
        name = list(adapters)[i % len(adapters)]
        requests.append(Request(f"plain-{i}", "t", specs[name].key, prompt=prompt, params=SamplingParams(max_new)))
        want[requests[-1].id] = (adapters[name], prompt)
    engine.start()
    try:
        results = submit_all(engine, requests)
    finally:
        engine.stop()
    for request_id, (which, prompt) in want.items():
        completion = results[request_id]
        assert completion.status == "ok", completion
        oracle.assert_matches(which, oracle.prompt_ids(prompt), completion.token_ids, max_new, label=request_id)


def test_engine_serves_mixes_on_the_triton_kernels(tiny_model, peft_adapters):
    """Σr 24 of 32 through the Triton shrink/expand kernels (interpreted on CPU), next to plain adapters."""
    mixes = [[("mlp-r16-patterns", 0.6), ("qv-r4", -0.8), ("all-r8-rslora", 1.3)], [("qv-r4", -1.5)]]
    _engine_matches_peft(tiny_model, peft_adapters, mixes,
                         EngineConfig(kv_cache_mb=16, lora_backend="triton", max_lora_rank=32), max_new=3)


def test_engine_serves_mixes_of_fused_modules(tmp_path):
    """Phi-3's fused qkv_proj / gate_up_proj: each slice of the mix gets its rows of every member's B."""
    model_dir = build_tiny_model(tmp_path / "phi3", model_type="phi3")
    adapters = {
        "fused-r2": make_peft_adapter(model_dir, tmp_path / "a", seed=1, r=2, lora_alpha=4,
                                      target_modules=["qkv_proj", "down_proj"]),
        "all-r6-rslora": make_peft_adapter(model_dir, tmp_path / "b", seed=2, r=6, lora_alpha=3, use_rslora=True,
                                           target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    }
    _engine_matches_peft(model_dir, adapters, [[("all-r6-rslora", -0.9), ("fused-r2", 0.7)]],
                         EngineConfig(kv_cache_mb=16, max_lora_rank=8))
