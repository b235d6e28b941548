"""Adapter validation: every PEFT option lorabus cannot serve exactly is refused with a clear reason."""

import json
import shutil

import pytest
import torch

from lorabus.scheduler.adapters import AdapterLoadError, file_sha256, read_adapter
from lorabus.scheduler.engine import Engine
from lorabus.scheduler.config import EngineConfig
from helpers import make_peft_adapter


@pytest.fixture(scope="module")
def shapes(tiny_model):
    return Engine(str(tiny_model), EngineConfig(kv_cache_mb=4)).model.shapes


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_reads_peft_scales(peft_adapters, shapes):
    weights = read_adapter("p", peft_adapters["mlp-r16-patterns"], shapes, 64, torch.float32)
    a, b, scale = weights.modules[(0, "down_proj")]
    assert a.shape[0] == 4 and scale == 16 / 4  # rank_pattern
    assert weights.modules[(0, "o_proj")][2] == 64 / 16  # alpha_pattern
    rs = read_adapter("r", peft_adapters["all-r8-rslora"], shapes, 64, torch.float32)
    assert rs.modules[(1, "q_proj")][2] == pytest.approx(16 / 8 ** 0.5)


@pytest.mark.parametrize("change,fragment", [
    (dict(use_dora=True), "use_dora"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias"),
    (dict(peft_type="IA3"), "peft_type"),
])
def test_unsupported_options_are_refused(peft_adapters, shapes, tmp_path, change, fragment):
    path = _copy_with_config(peft_adapters["qv-r4"], tmp_path / "a", **change)
    with pytest.raises(AdapterLoadError, match=fragment):
        read_adapter("a", path, shapes, 64, torch.float32)


def test_bad_files_are_refused(peft_adapters, shapes, tmp_path, tiny_model):
    src = peft_adapters["qv-r4"]
    with pytest.raises(AdapterLoadError, match="rank 16 exceeds"):
        read_adapter("big", peft_adapters["mlp-r16-patterns"], shapes, 8, torch.float32)
    with pytest.raises(AdapterLoadError, match="sha256"):
        read_adapter("s", src, shapes, 64, torch.float32, sha256="0" * 64)
    assert read_adapter("s", src, shapes, 64, torch.float32, sha256=file_sha256(src / "adapter_model.safetensors"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(src / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterLoadError, match="pickled"):
        read_adapter("p", pickled, shapes, 64, torch.float32)
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        read_adapter("m", tmp_path / "missing", shapes, 64, torch.float32)
    embed = make_peft_adapter(tiny_model, tmp_path / "embed", seed=3, r=2, target_modules=["embed_tokens"])
    with pytest.raises(AdapterLoadError, match="unsupported tensor"):
        read_adapter("e", embed, shapes, 64, torch.float32)


# ---- every number that reaches the device pool is finite --------------------------------------------


def _copy_with_tensors(src, dst, change, whole_module=False):
    """A copy of a PEFT adapter whose first tensor (or both of its first module's) went through
    `change(name, tensor) -> tensor` in the safetensors file."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    prefix = first.split(".lora_")[0] + ".lora_" if whole_module else first
    save_file({name: change(name, t) if name.startswith(prefix) else t for name, t in tensors.items()}, str(path))
    return dst


def _set(index, value, dtype=None):
    def change(name, tensor):
        tensor = tensor.to(dtype or tensor.dtype).clone()
        tensor.view(-1)[index] = value
        return tensor
    return change


@pytest.mark.parametrize("change,dtype,fragment", [
    (_set(0, float("nan")), torch.float32, "NaN or infinite"),
    (_set(-1, float("inf")), torch.float32, "NaN or infinite"),
    (_set(3, -float("inf"), torch.float16), torch.float32, "NaN or infinite"),
    (_set(0, 1e39, torch.float64), torch.bfloat16, "overflows to infinity"),
    (_set(0, 1e39, torch.float64), torch.float16, "overflows to infinity"),
    (_set(0, 7e4), torch.float16, "overflows to infinity"),  # finite in float32, beyond float16's 65504
    (lambda name, t: t.to(torch.int32), torch.float32, "floating point"),
], ids=["nan", "inf", "fp16-minus-inf", "1e39-bf16", "1e39-fp16", "7e4-fp16", "int-weights"])
def test_non_finite_weights_are_refused(peft_adapters, shapes, tmp_path, change, dtype, fragment):
    path = _copy_with_tensors(peft_adapters["all-r8-rslora"], tmp_path / "a", change)
    with pytest.raises(AdapterLoadError, match=fragment):
        read_adapter("a", path, shapes, 64, dtype)


def test_large_but_finite_weights_load_in_a_wide_pool(peft_adapters, shapes, tmp_path):
    # The same 7e4 that float16 refuses is a legitimate float32 / bfloat16 value.
    path = _copy_with_tensors(peft_adapters["all-r8-rslora"], tmp_path / "a", _set(0, 7e4))
    for dtype in (torch.float32, torch.bfloat16):
        weights = read_adapter("a", path, shapes, 64, dtype)
        assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b, _ in weights.modules.values())


@pytest.mark.parametrize("change,fragment", [
    (dict(lora_alpha=float("nan")), "lora_alpha nan is not a finite number"),
    (dict(lora_alpha=float("inf")), "lora_alpha inf is not a finite number"),
    (dict(lora_alpha="16"), "lora_alpha '16' is not a finite number"),
    (dict(lora_alpha=True), "lora_alpha True is not a finite number"),
    (dict(lora_alpha=10**400), "is not a finite number"),
    (dict(lora_alpha=1e300), "not finite in torch.float32"),  # the scale alpha / r overflows the pool's scales
    (dict(alpha_pattern={"o_proj": float("inf")}), r"alpha_pattern\['o_proj'\] = inf"),
    (dict(alpha_pattern={"o_proj": None}), r"alpha_pattern\['o_proj'\] = None"),
    (dict(alpha_pattern=["o_proj"]), "alpha_pattern must be an object"),
    (dict(alpha_pattern={"(": 2}), "not a valid regular expression"),
    (dict(r=4.5), "r 4.5 is not a positive integer"),
    (dict(r="4"), "r '4' is not a positive integer"),
    (dict(r=0), "r 0 is not a positive integer"),
    (dict(r=10**12), "its config declares 1000000000000"),
    (dict(rank_pattern={"q_proj": -1}), r"rank_pattern\['q_proj'\] = -1"),
    (dict(rank_pattern={"q_proj": 2}), "has rank 8, its config declares 2"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_alphas_and_ranks_are_refused(peft_adapters, shapes, tmp_path, change, fragment):
    path = _copy_with_config(peft_adapters["all-r8-rslora"], tmp_path / "a", **change)
    with pytest.raises(AdapterLoadError, match=fragment):
        read_adapter("a", path, shapes, 64, torch.float32)


def test_zero_rank_weights_are_refused(peft_adapters, shapes, tmp_path):
    path = _copy_with_tensors(peft_adapters["qv-r4"], tmp_path / "a",
                              lambda name, t: (t[:0] if "lora_A" in name else t[:, :0]).contiguous(), whole_module=True)
    with pytest.raises(AdapterLoadError, match="has rank 0"):
        read_adapter("a", path, shapes, 64, torch.float32)


def test_a_poisoned_adapter_fails_only_its_jobs(tiny_model, peft_adapters, tmp_path):
    """Through the engine: the job gets `adapter_load_failed` with the reason; the base model still serves."""
    from lorabus.scheduler import AdapterSpec, Request, SamplingParams

    path = _copy_with_tensors(peft_adapters["qv-r4"], tmp_path / "nan", _set(0, float("nan")))
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=4))
    engine.register(AdapterSpec("nan@1", str(path)))
    engine.start()
    try:
        bad = engine.generate(Request("bad", "t", "nan@1", prompt="hello", params=SamplingParams(3)), 60)
        good = engine.generate(Request("good", "t", None, prompt="hello", params=SamplingParams(3)), 60)
    finally:
        engine.stop()
    assert bad.status == "error" and bad.error_code == "adapter_load_failed", bad
    assert "NaN or infinite" in bad.error_message
    assert good.status == "ok"


# ---- fused LoRA targets (Phi-3) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def phi3_model(tmp_path_factory):
    from lorabus.worker.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("phi3") / "phi3", model_type="phi3")


def test_fused_targets_map_onto_the_pools_slices(phi3_model, tmp_path):
    """A PEFT LoRA on qkv_proj / gate_up_proj: every slice gets the one A and its own rows of B."""
    from safetensors.torch import load_file

    from lorabus.scheduler.arch import ModelSpec

    spec = ModelSpec.from_dir(phi3_model)
    path = make_peft_adapter(phi3_model, tmp_path / "fused", seed=5, r=4, lora_alpha=8,
                             target_modules=["qkv_proj", "gate_up_proj"])
    weights = read_adapter("f", path, spec.shapes, 64, torch.float32)
    assert set(weights.modules) == {(layer, s) for layer in range(spec.num_layers)
                                    for s in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
    stored = load_file(str(path / "adapter_model.safetensors"))
    for module, slices in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                           ("mlp.gate_up_proj", ("gate_proj", "up_proj"))):
        prefix = f"base_model.model.model.layers.1.{module}"
        parts = [weights.modules[(1, s)] for s in slices]
        assert all(torch.equal(a, stored[f"{prefix}.lora_A.weight"]) for a, _, _ in parts)
        assert len({a.data_ptr() for a, _, _ in parts}) == 1  # one A in host memory
        assert [b.shape[0] for _, b, _ in parts] == [spec.projections[s][1] for s in slices]
        assert torch.equal(torch.cat([b for _, b, _ in parts]), stored[f"{prefix}.lora_B.weight"])
        assert {scale for _, _, scale in parts} == {8 / 4}


def test_targets_of_another_family_are_refused(phi3_model, peft_adapters, shapes, tmp_path):
    from lorabus.scheduler.arch import ModelSpec

    phi3_shapes = ModelSpec.from_dir(phi3_model).shapes
    with pytest.raises(AdapterLoadError, match="target module self_attn.q_proj is not supported"):
        read_adapter("llama-on-phi3", peft_adapters["qv-r4"], phi3_shapes, 64, torch.float32)
    fused = make_peft_adapter(phi3_model, tmp_path / "fused", seed=6, r=2, target_modules=["qkv_proj"])
    with pytest.raises(AdapterLoadError, match="target module self_attn.qkv_proj is not supported"):
        read_adapter("phi3-on-llama", fused, shapes, 64, torch.float32)


def test_sample_adapters_follow_the_family(phi3_model, tmp_path):
    from lorabus.scheduler.arch import ModelSpec
    from lorabus.worker.testing import build_sample_adapter

    spec = ModelSpec.from_dir(phi3_model)
    path = build_sample_adapter(tmp_path / "s", phi3_model, rank=4, target_modules=("qkv_proj", "down_proj"))
    weights = read_adapter("s", path, spec.shapes, 64, torch.float32)
    assert {proj for _, proj in weights.modules} == {"q_proj", "k_proj", "v_proj", "down_proj"}
    with pytest.raises(ValueError, match=r"\['q_proj'\] are not LoRA targets of this phi3 model"):
        build_sample_adapter(tmp_path / "bad", phi3_model, target_modules=("q_proj",))


@pytest.mark.parametrize("content, fragment", [
    (b"[" * 100_000, "RecursionError"),                 # nested past the JSON parser's depth
    (b"\xff\xfe\x00{", "unreadable adapter_config.json"),  # neither UTF-8 nor any JSON encoding
    (b'{"r": 8, "pad": "' + b"x" * (5 << 20) + b'"}', "is over 4194304 bytes"),  # far larger than any config
])
def test_hostile_adapter_configs_are_load_errors(peft_adapters, shapes, tmp_path, content, fragment):
    path = tmp_path / "a"
    shutil.copytree(peft_adapters["qv-r4"], path)
    (path / "adapter_config.json").write_bytes(content)
    with pytest.raises(AdapterLoadError, match=fragment):
        read_adapter("a", path, shapes, 64, torch.float32)
