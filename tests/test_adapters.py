"""Adapter validation: every PEFT option lorabus cannot serve exactly is refused with a clear reason."""

import json
import shutil

import pytest
import torch

from scheduler.adapters import AdapterLoadError, file_sha256, read_adapter
from scheduler.engine import Engine
from scheduler.config import EngineConfig
from tests.helpers import make_peft_adapter


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
