"""The base model's architecture, read once from its config.json: the one place that knows model families.

`ModelSpec.from_dir(model_dir)` (in the spirit of gpt-fast's ModelArgs) holds every fact the rest of
lorabus needs about the base model: the decoder's projections and their (in, out) shapes, how they fuse
into groups, the checkpoint tensor names, the LoRA target modules PEFT names (fused ones included), biases,
tied embeddings, the rotary embedding, norm eps, heads, vocabulary, end-of-sequence ids and the context
that can be served exactly. scheduler/model.py, scheduler/adapters.py, scheduler/lora.py and
worker/testing.py read it; none of them names a family. (kernels/ imports nothing of ours: its benchmark
keeps its own shape table.)

Every supported family runs the same decoder layer: RMSNorm before attention and MLP, attention with
grouped-query heads and rotate-half rotary on the leading `rotary_dim` dims of each head, scaled by
1/sqrt(head_dim), and a gated MLP act(gate) * up. Families differ only in how their checkpoint names and
fuses the projections, which projections carry a bias, which rope types transformers accepts for them,
and the config defaults of their transformers config class. That is a `Family`.

Adding a family is one `FAMILIES` entry plus tests:
1. Read transformers' models/<type>/modeling_<type>.py and check that the layer is the one above (norm,
   rotary, attention scale, MLP order, residuals); if not, scheduler/model.py's forward needs a change first.
2. Add `FAMILIES["<model_type>"] = Family(...)`: per group of `GROUPS` the checkpoint modules of a layer
   (one module per slice, or one fused module whose output spans the group's slices in order; PEFT targets
   exactly these modules), which of them carry a bias, the rope types its config class validates, whether
   it honours `partial_rotary_factor`, and its config class defaults for keys a config.json may omit.
3. Tests: add the family to tests/test_engine.py's PEFT parity parametrization (a tiny random model from
   worker.testing.build_tiny_model(model_type=...), adapters on its PEFT target names) and its rotary to
   tests/test_arch.py's comparison with transformers' rotary embedding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# The decoder layer as the forward pass and the adapter pool see it: each group is one matmul and one LoRA
# launch on a shared input; its slices lie in this order along the group's output.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}

# transformers' ACT2FN entries that are exactly these torch functions.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}

# transformers' RotaryEmbeddingConfigMixin.default_theta: the rope base when a config.json names none.
DEFAULT_ROPE_THETA = 10_000.0
# Rope types whose frequencies we compute exactly as transformers does (see Rope.frequencies).
ROPE_TYPES = frozenset({"default", "linear", "dynamic", "yarn", "llama3", "longrope"})
# YaRN's ramp bounds when the config leaves them out (transformers' _compute_yarn_parameters).
YARN_BETA_FAST, YARN_BETA_SLOW = 32, 1


class UnsupportedModel(ValueError):
    """config.json describes a model this spec cannot serve exactly; the message says which option."""


@dataclass(frozen=True)
class ModelShapes:
    """What an adapter must fit: per projection slice its (in_features, out_features), the layer count, and
    per PEFT target module of a layer (`self_attn.q_proj`, `self_attn.qkv_proj`) the slices it spans."""

    num_layers: int
    projections: dict[str, tuple[int, int]]
    # The Llama layout unless given: what shapes built by hand (without a ModelSpec) always meant.
    targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_TARGETS))


@dataclass(frozen=True)
class Family:
    """How one model_type's checkpoint lays out the shared decoder layer."""

    modules: dict[str, tuple[str, ...]]  # group -> checkpoint modules of a layer, in output order
    biases: Callable[[dict], frozenset[str]] = lambda config: frozenset()  # modules with a bias, given config.json
    rope_types: frozenset[str] = ROPE_TYPES  # rope types its transformers config accepts and we support
    rope_aliases: dict[str, str] = field(default_factory=dict)  # legacy rope type names its config renames
    partial_rotary: bool = False  # whether its transformers rotary honours partial_rotary_factor
    defaults: dict = field(default_factory=dict)  # its config class's values for keys config.json may omit
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"


LLAMA_MODULES = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
LLAMA_TARGETS = {module: (slice_,) for group, modules in LLAMA_MODULES.items()
                 for module, slice_ in zip(modules, GROUPS[group])}
# Defaults every family's transformers config class shares (PretrainedConfig's own tie default is True).
COMMON_DEFAULTS = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None)


def _llama_biases(config: dict) -> frozenset[str]:
    attention = LLAMA_MODULES["qkv"] + LLAMA_MODULES["o"] if config.get("attention_bias") else ()
    mlp = LLAMA_MODULES["gate_up"] + LLAMA_MODULES["down"] if config.get("mlp_bias") else ()
    return frozenset(attention + mlp)


# `defaults` are the values of transformers' LlamaConfig, MistralConfig, Qwen2Config and Phi3Config for keys a
# config.json may leave out.
FAMILIES: dict[str, Family] = {
    "llama": Family(LLAMA_MODULES, biases=_llama_biases, defaults=dict(max_position_embeddings=2048, eos_token_id=2)),
    "mistral": Family(LLAMA_MODULES, defaults=dict(max_position_embeddings=4096 * 32, sliding_window=4096,
                                                   eos_token_id=2)),
    "qwen2": Family(LLAMA_MODULES, biases=lambda config: frozenset(LLAMA_MODULES["qkv"]),
                    defaults=dict(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False)),
    # Phi-3 fuses q/k/v and gate/up in the checkpoint, and so in PEFT: a LoRA on qkv_proj spans all three slices.
    "phi3": Family(
        {"qkv": ("self_attn.qkv_proj",), "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_up_proj",),
         "down": ("mlp.down_proj",)},
        rope_types=frozenset({"default", "longrope"}), rope_aliases={"su": "longrope", "yarn": "longrope"},
        partial_rotary=True,
        defaults=dict(rms_norm_eps=1e-5, max_position_embeddings=4096, original_max_position_embeddings=4096,
                      sliding_window=None, eos_token_id=32000),
    ),
}


@dataclass(frozen=True)
class Rope:
    """Rotary embedding: which dims rotate, and the inverse frequencies transformers computes for its type."""

    theta: float
    rotary_dim: int  # leading dims of each head that rotate (head_dim * partial_rotary_factor)
    scaling: str  # rope type: default, linear, dynamic, yarn, llama3 or longrope
    params: dict  # that type's parameters, config defaults filled in
    max_context: int  # positions beyond this would switch frequencies mid-sequence in transformers

    def frequencies(self, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
        """(inv_freq [rotary_dim / 2] float32, attention scaling of cos/sin), as transformers' rope init does
        at load time; within `max_context` it never recomputes them (dynamic and longrope update only past it)."""
        p, dim, base = self.params, self.rotary_dim, self.theta
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq, scaling = 1.0 / (base ** exponents), 1.0
        if self.scaling == "linear":
            inv_freq = inv_freq / p["factor"]
        elif self.scaling == "dynamic":  # at its initial length the NTK base formula leaves the base unchanged
            factor, length = p["factor"], p["max_position_embeddings"]
            base = base * ((factor * length / length) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** exponents)
        elif self.scaling == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, p)
        elif self.scaling == "yarn":
            inv_freq, scaling = _yarn_inv_freq(base, dim, p)
        elif self.scaling == "longrope":  # the short factors: transformers takes the long ones only past max_context
            inv_freq = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * base ** exponents)
            scaling = p["attention_factor"]
        return inv_freq.to(device), scaling


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, p: dict) -> tuple[torch.Tensor, float]:
    factor, original = p["factor"], p["original_max_position_embeddings"]

    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scaling = p.get("attention_factor")
    if scaling is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            scaling = float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
        else:
            scaling = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or YARN_BETA_FAST, p.get("beta_slow") or YARN_BETA_SLOW

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of each frequency left as it was trained (extrapolated)
    return interpolation * (1 - keep) + extrapolation * keep, scaling


def _rope(config: dict, family: Family, head_dim: int, max_positions: int) -> Rope:
    """The rotary embedding as transformers' config standardization resolves it (rope_scaling wins over
    rope_parameters; values inside them win over top-level rope_theta / partial_rotary_factor)."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if any(isinstance(value, dict) for value in params.values()):
        raise UnsupportedModel("per-layer-type rope parameters are not supported")
    declared = params.get("rope_type", params.get("type", "default"))
    rope_type = family.rope_aliases.get(declared, declared)
    if rope_type not in family.rope_types:
        raise UnsupportedModel(f"rope type {rope_type!r} is not supported for {config['model_type']} "
                               f"(supported: {sorted(family.rope_types)})")
    theta = float(params.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))
    partial_factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial_factor != 1.0 and not family.partial_rotary:
        raise UnsupportedModel(f"partial_rotary_factor {partial_factor} is not supported for {config['model_type']}")
    rotary_dim = int(head_dim * partial_factor)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise UnsupportedModel(f"rotary dims {rotary_dim} (head_dim {head_dim} x {partial_factor}) "
                               "must be even and > 0")
    required = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "longrope": ("short_factor", "long_factor")}.get(rope_type, ())
    if any(params.get(key) is None for key in required):
        raise UnsupportedModel(f"rope type {rope_type!r} needs {', '.join(required)} in its rope parameters")
    if rope_type in ("yarn", "llama3", "longrope"):  # the pretraining length; a top-level value wins (Phi-3)
        params["original_max_position_embeddings"] = config.get(
            "original_max_position_embeddings", params.get("original_max_position_embeddings", max_positions))
    max_context = max_positions
    if rope_type == "dynamic":
        params["max_position_embeddings"] = max_positions
    elif rope_type == "longrope":
        # transformers switches every position to the long factors once a sequence passes the pretraining
        # length (keys already cached keep the short ones); we serve only what stays on the short factors.
        original = params["original_max_position_embeddings"]
        max_context = min(max_positions, original)
        if len(params["short_factor"]) != rotary_dim // 2:
            raise UnsupportedModel(f"longrope short_factor has {len(params['short_factor'])} entries, "
                                   f"rotary dims need {rotary_dim // 2}")
        factor = params["factor"] if params.get("factor") is not None else max_positions / original
        if params.get("attention_factor") is None:
            params["attention_factor"] = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return Rope(theta, rotary_dim, rope_type, params, max_context)


@dataclass(frozen=True)
class ModelSpec:
    """Everything lorabus knows about the base model's architecture, from config.json alone."""

    model_type: str
    family: Family
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int  # < num_heads: grouped-query attention
    head_dim: int
    vocab_size: int
    hidden_act: str
    norm_eps: float
    tie_word_embeddings: bool  # lm_head reuses the embedding matrix
    biases: frozenset[str]  # checkpoint modules of a layer that carry a bias
    rope: Rope
    max_position_embeddings: int
    sliding_window: int | None
    max_context: int  # longest sequence served exactly: never past the window or a rope frequency switch
    eos_token_id: list[int]  # config.json's end-of-sequence id(s) (int, list or null there)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelSpec":
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    @classmethod
    def from_config(cls, raw: dict) -> "ModelSpec":
        model_type = raw.get("model_type")
        family = FAMILIES.get(model_type)
        if family is None:
            raise UnsupportedModel(f"config.json model_type {model_type!r} is not supported; serve a model of "
                                   f"one of: {', '.join(sorted(FAMILIES))}")
        config = {**COMMON_DEFAULTS, **family.defaults, **raw}
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        max_positions = config["max_position_embeddings"]
        if config["hidden_act"] not in ACTIVATIONS:
            raise UnsupportedModel(f"hidden_act {config['hidden_act']!r} is not supported "
                                   f"(supported: {sorted(ACTIVATIONS)})")
        rope = _rope(config, family, head_dim, max_positions)
        # Sequences never exceed the attention window, so sliding-window models run as full attention.
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        eos = config["eos_token_id"]
        return cls(
            model_type=model_type,
            family=family,
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            vocab_size=config["vocab_size"],
            hidden_act=config["hidden_act"],
            norm_eps=config["rms_norm_eps"],
            tie_word_embeddings=bool(config["tie_word_embeddings"]),
            biases=family.biases(config),
            rope=rope,
            max_position_embeddings=max_positions,
            sliding_window=window,
            max_context=min(max_positions, window or max_positions, rope.max_context),
            eos_token_id=list(eos) if isinstance(eos, list) else [] if eos is None else [eos],
        )

    @property
    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every projection slice."""
        hidden, inter = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
                "o_proj": (q_out, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                "down_proj": (inter, hidden)}

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        return GROUPS

    @property
    def targets(self) -> dict[str, tuple[str, ...]]:
        """PEFT target modules of a layer (`self_attn.qkv_proj`) and the slices their output spans, in order."""
        targets = {}
        for group, modules in self.family.modules.items():
            slices = GROUPS[group]
            if len(modules) == len(slices):
                targets.update({module: (slice_,) for module, slice_ in zip(modules, slices)})
            elif len(modules) == 1:
                targets[modules[0]] = slices
            else:
                raise UnsupportedModel(f"{self.model_type}: group {group} needs one module per slice "
                                       "or one fused module")
        return targets

    @property
    def shapes(self) -> ModelShapes:
        return ModelShapes(num_layers=self.num_layers, projections=self.projections, targets=self.targets)

    def widths(self, group: str) -> list[int]:
        """Output widths of a group's slices, in order."""
        return [self.projections[slice_][1] for slice_ in GROUPS[group]]

    def module_name(self, layer: int, module: str) -> str:
        """A layer module's full name in the checkpoint and in PEFT (`model.layers.3.self_attn.qkv_proj`)."""
        return f"{self.family.layers}.{layer}.{module}"
