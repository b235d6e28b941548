"""Reading PEFT LoRA adapters from disk into host memory, with every unsupported option refused.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's layout).
`read_adapter` validates both against the base model's shapes and returns `AdapterWeights`: per
(layer, projection) the A and B matrices and the scale PEFT would apply (`lora_alpha / r`, or
`lora_alpha / sqrt(r)` with rsLoRA; `rank_pattern` / `alpha_pattern` honoured per module).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

# Projections of a Llama-family decoder layer that an adapter may target, and where they sit.
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# Config options whose non-default values change the math; we refuse them rather than serve wrong output.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "bias": ("none",),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
}


class AdapterLoadError(Exception):
    """The adapter cannot be served; the message says why (it reaches the job's error result)."""


@dataclass(frozen=True)
class ModelShapes:
    """What an adapter must fit: per projection its (in_features, out_features), and the layer count."""

    num_layers: int
    projections: dict[str, tuple[int, int]]


@dataclass
class AdapterWeights:
    """One adapter in host memory: {(layer, projection): (A [r, in], B [out, r], scale)}."""

    key: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]
    max_rank: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.modules.values())


def _pattern_value(patterns: dict, module_name: str, default):
    # PEFT matches pattern keys against the end of the module name (peft.utils.other.get_pattern_key).
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_adapter(
    key: str, path: str | Path, shapes: ModelShapes, max_rank: int, dtype: torch.dtype, sha256: str | None = None
) -> AdapterWeights:
    """Load and validate one PEFT LoRA adapter directory; raise AdapterLoadError with a clear reason."""
    root = Path(str(path).removeprefix("file://"))
    config_path, weights_path = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not config_path.is_file():
        raise AdapterLoadError(f"{key}: no adapter_config.json in {root}")
    if not weights_path.is_file():
        if (root / "adapter_model.bin").exists():
            raise AdapterLoadError(f"{key}: pickled adapter_model.bin is refused; save it with safetensors")
        raise AdapterLoadError(f"{key}: no adapter_model.safetensors in {root}")
    if sha256 is not None and file_sha256(weights_path) != sha256.lower():
        raise AdapterLoadError(f"{key}: sha256 of adapter_model.safetensors does not match the published one")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"{key}: unreadable adapter_config.json: {exc}") from None

    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{key}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for option, allowed in _UNSUPPORTED.items():
        if config.get(option, allowed[0]) not in allowed:
            raise AdapterLoadError(f"{key}: PEFT option {option}={config[option]!r} is not supported")

    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterLoadError(f"{key}: unreadable adapter_model.safetensors: {exc}") from None

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _KEY.search(name)
        if match is None:
            raise AdapterLoadError(f"{key}: unsupported tensor {name!r} (only LoRA on decoder projections)")
        layer, parent, proj, which = int(match[1]), match[2], match[3], match[4]
        if PROJECTIONS.get(proj) != parent:
            raise AdapterLoadError(f"{key}: target module {parent}.{proj} is not supported")
        if layer >= shapes.num_layers:
            raise AdapterLoadError(f"{key}: layer {layer} does not exist in the base model")
        pairs.setdefault((layer, proj), {})[which] = tensor

    alpha, use_rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora", False))
    modules, top_rank = {}, 0
    for (layer, proj), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterLoadError(f"{key}: layer {layer} {proj} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        d_in, d_out = shapes.projections[proj]
        rank = a.shape[0]
        if a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise AdapterLoadError(
                f"{key}: layer {layer} {proj} has A {tuple(a.shape)} / B {tuple(b.shape)}, "
                f"base model needs A [r, {d_in}] / B [{d_out}, r]"
            )
        if rank > max_rank:
            raise AdapterLoadError(f"{key}: rank {rank} exceeds the pool's max rank {max_rank}")
        module_name = f"model.layers.{layer}.{PROJECTIONS[proj]}.{proj}"
        module_alpha = _pattern_value(config.get("alpha_pattern"), module_name, alpha)
        scale = module_alpha / (math.sqrt(rank) if use_rslora else rank)
        modules[(layer, proj)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous(), float(scale))
        top_rank = max(top_rank, rank)
    if not modules:
        raise AdapterLoadError(f"{key}: adapter holds no LoRA weights")
    return AdapterWeights(key=key, modules=modules, max_rank=top_rank)
