"""The architecture spec read from config.json: rotary frequencies equal transformers' for every supported
rope type and family, unsupported options are refused by name, context limits, and the safetensors reader."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabus.scheduler.arch import ModelSpec, UnsupportedModel
from lorabus.scheduler.model import CausalLM, Checkpoint, rope_cos_sin
from lorabus.worker.testing import TINY_MODEL

# A layer of 4 heads of 16 dims, like worker.testing.TINY_MODEL, without its tokenizer-dependent ids.
SHAPE = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
HEAD_DIM = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]


def _write_config(tmp_path, model_type, **fields) -> dict:
    config = {"model_type": model_type, **SHAPE, **fields}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return config


ROPE_CASES = {
    # old-style configs: top-level rope_theta, rope_scaling with "type"
    "llama-theta": ("llama", dict(rope_theta=500000.0, rope_scaling=None)),
    "llama-linear": ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0})),
    "llama-dynamic": ("llama", dict(rope_scaling={"type": "dynamic", "factor": 3.0})),
    # transformers 5 configs: rope_parameters
    "llama-llama3": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64})),
    "qwen2-yarn": ("qwen2", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                  "original_max_position_embeddings": 128})),
    "mistral-yarn-mscale": ("mistral", dict(head_dim=32, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 128,
        "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2})),
    "phi3-partial": ("phi3", dict(partial_rotary_factor=0.5)),
    "phi3-longrope": ("phi3", dict(original_max_position_embeddings=128, rope_scaling={
        "type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
        "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0], "partial_rotary_factor": 0.75})),
    # the legacy name; transformers' config check wants the length inside, its rotary takes the top-level one
    "phi3-su": ("phi3", dict(original_max_position_embeddings=256, rope_scaling={
        "type": "su", "short_factor": [1.0 + i / 10 for i in range(8)], "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 300})),
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rotary_matches_transformers(tmp_path, case):
    """Every position we serve gets transformers' cos/sin, bit for bit, whatever the rope type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields = ROPE_CASES[case]
    _write_config(tmp_path, model_type, **fields)
    spec = ModelSpec.from_dir(tmp_path)
    rotary = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path)).model.rotary_emb
    positions = torch.arange(spec.max_context)
    want_cos, want_sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    inv_freq, scaling = spec.rope.frequencies()
    cos, sin = rope_cos_sin(positions, inv_freq, scaling, torch.float32)
    assert cos.shape == (spec.max_context, spec.rope.rotary_dim)
    assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])


def test_longrope_serves_only_the_short_factor_context(tmp_path):
    _write_config(tmp_path, "phi3", **ROPE_CASES["phi3-longrope"][1])
    spec = ModelSpec.from_dir(tmp_path)
    assert spec.rope.scaling == "longrope" and spec.rope.rotary_dim == 12
    assert spec.max_context == 128 < spec.max_position_embeddings


@pytest.mark.parametrize("model_type,fields,fragment", [
    ("gpt2", {}, "model_type 'gpt2' is not supported"),
    ("llama", dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}),
     "rope type 'proportional' is not supported for llama"),
    ("phi3", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope type 'linear' is not supported for phi3"),
    ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported for llama"),
    ("llama", dict(rope_scaling={"type": "linear"}), "rope type 'linear' needs factor"),
    ("llama", dict(hidden_act="gelu_new"), "hidden_act 'gelu_new' is not supported"),
    ("phi3", dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}),
     "short_factor has 3 entries, rotary dims need 8"),
])
def test_unsupported_configs_are_refused(tmp_path, model_type, fields, fragment):
    _write_config(tmp_path, model_type, **fields)
    with pytest.raises(UnsupportedModel, match=fragment):
        ModelSpec.from_dir(tmp_path)


def test_spec_fields_from_config(tmp_path):
    _write_config(tmp_path, "mistral", sliding_window=100, eos_token_id=[3, 7], tie_word_embeddings=True, head_dim=32)
    mistral = ModelSpec.from_dir(tmp_path)
    assert mistral.max_context == 100 and mistral.eos_token_id == [3, 7] and mistral.tie_word_embeddings
    assert mistral.projections["q_proj"] == (64, 4 * 32) and mistral.projections["k_proj"] == (64, 2 * 32)
    _write_config(tmp_path, "qwen2", sliding_window=100, use_sliding_window=False, eos_token_id=None)
    qwen2 = ModelSpec.from_dir(tmp_path)
    assert qwen2.max_context == 512 and qwen2.eos_token_id == []
    assert qwen2.biases == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    _write_config(tmp_path, "phi3")  # no eps, eos or window: Phi3Config's defaults
    phi3 = ModelSpec.from_dir(tmp_path)
    assert phi3.norm_eps == 1e-5 and phi3.eos_token_id == [32000] and phi3.sliding_window is None
    assert phi3.targets == {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
                            "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}
    assert phi3.widths("qkv") == [64, 32, 32] and phi3.shapes.targets == phi3.targets


def test_sharded_checkpoint_loads_like_one_file(tiny_model, tmp_path):
    tensors = load_file(str(tiny_model / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({name: tensors[name] for name in part}, str(tmp_path / file))
    weight_map = {name: file for file, part in shards.items() for name in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    cpu = torch.device("cpu")
    whole, sharded = (CausalLM.from_pretrained(str(d), cpu, torch.float32) for d in (tiny_model, tmp_path))
    assert torch.equal(whole.embed, sharded.embed) and torch.equal(whole.lm_head, sharded.lm_head)
    for a, b in zip(whole.layers, sharded.layers):
        assert torch.equal(a.qkv, b.qkv) and torch.equal(a.gate_up, b.gate_up) and torch.equal(a.down, b.down)


def test_checkpoint_disagreeing_with_config_is_refused(tiny_model, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tiny_model / "config.json").read_text()),
                                                      "intermediate_size": TINY_MODEL["intermediate_size"] + 1}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Checkpoint(tmp_path)
    tensors = load_file(str(tiny_model / "model.safetensors"))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \(160, 64\), config.json implies \(161, 64\)"):
        CausalLM.from_pretrained(str(tmp_path), torch.device("cpu"), torch.float32)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    with pytest.raises(ValueError, match="no tensor model.layers.1.mlp.down_proj.weight"):
        CausalLM.from_pretrained(str(tmp_path), torch.device("cpu"), torch.float32)
