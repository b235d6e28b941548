"""Reading PEFT LoRA adapters from disk into host memory, with every unsupported option refused.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's layout).
`read_adapter` validates both against the base model's shapes and LoRA targets (`ModelShapes`, from
scheduler/arch.py) and returns `AdapterWeights`: per (layer, projection slice) the A and B matrices and
the scale PEFT would apply (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA; `rank_pattern` /
`alpha_pattern` honoured per module). A LoRA on a fused module (Phi-3's `qkv_proj`, `gate_up_proj`) has
one A and a B whose rows span the fused output: each slice gets that A and its own rows of B, which is
the same update, since B·A·x split by rows is each slice's rows of B times the shared A·x.
Every number that reaches the device pool is finite: weights with NaN or inf (in the file, or once cast
to the pool's dtype), a non-numeric or non-finite alpha, a rank that is not a positive integer (or
differs from what the config declares), and a scale that is not finite in float32 (the pool's scale
dtype) are refused, because a NaN in a pool slot reaches every token of every job on that adapter.

The weights file is read once into memory this process owns, never memory-mapped: a file truncated or
overwritten in place later (`cp`, `rsync --inplace`) cannot reach tensors built from it (a mapped page
of a truncated file kills the process with SIGBUS when touched). A published sha256 is checked against
those same bytes, so what is verified is what is served; the read is bounded by the largest file that
could hold a valid adapter for the model (`max_weights_file_bytes`).

`combine_adapters` builds a weighted mix of adapters as one adapter of concatenated rank, whose update
is exactly the weighted sum of the members' updates (no merge into the base, no SVD truncation).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from lorabus.scheduler.arch import ModelShapes  # noqa: F401 (read_adapter's parameter type; importable from here as before)

# PEFT's tensor names: `base_model.model.<module>.lora_A[.<adapter name>].weight`; the module within a
# layer (`self_attn.qkv_proj`) is what the base model's LoRA targets list.
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"layers\.(\d+)\.(\w+(?:\.\w+)*?)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
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


# Bounds on a valid weights file: safetensors' own limit on its JSON header (MAX_HEADER_SIZE in the
# safetensors crate), its 8-byte header length, and the widest floating-point element it stores (F64).
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
SAFETENSORS_LENGTH_BYTES = 8
WIDEST_ELEMENT_BYTES = 8
# PEFT's adapter_config.json is a few KB (rank and alpha patterns of large models included): a file far
# larger is not one, and is refused before it is read whole.
ADAPTER_CONFIG_MAX_BYTES = 4 << 20

# The pool keeps scales in float32 (scheduler/lora.py): a scale must be finite there.
SCALE_DTYPE = torch.float32


class AdapterLoadError(Exception):
    """The adapter cannot be served; the message says why (it reaches the job's error result)."""


class MemberLoadError(AdapterLoadError):
    """A mix cannot be built because one of its members cannot be loaded (`member`, its spec)."""

    def __init__(self, member, message: str):
        super().__init__(message)
        self.member = member


@dataclass
class AdapterWeights:
    """One adapter in host memory: {(layer, projection slice): (A [r, in], B [out, r], scale)}.
    The slices of a fused target share one A tensor and hold views of one B."""

    key: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]


def _pattern_value(key: str, patterns: dict, module_name: str, default):
    # PEFT matches pattern keys against the end of the module name (peft.utils.other.get_pattern_key).
    for pattern, value in (patterns or {}).items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", module_name)
        except re.error as exc:
            raise AdapterLoadError(f"{key}: pattern {pattern!r} is not a valid regular expression: {exc}") from None
        if matched:
            return value
    return default


def _is_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond any float
        return False


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_numbers(key: str, config: dict) -> None:
    """lora_alpha, r and their per-module patterns must be numbers a scale can be computed from."""
    if not _is_number(config.get("lora_alpha", 8)):
        raise AdapterLoadError(f"{key}: lora_alpha {config.get('lora_alpha')!r} is not a finite number")
    if "r" in config and not _is_rank(config["r"]):
        raise AdapterLoadError(f"{key}: r {config['r']!r} is not a positive integer")
    for name, valid, what in (("alpha_pattern", _is_number, "a finite number"),
                              ("rank_pattern", _is_rank, "a positive integer")):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise AdapterLoadError(f"{key}: {name} must be an object, got {type(patterns).__name__}")
        for pattern, value in patterns.items():
            if not valid(value):
                raise AdapterLoadError(f"{key}: {name}[{pattern!r}] = {value!r} is not {what}")


def _check_weights(key: str, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensor cast to the pool's dtype, refused unless it is floating point and finite both before and after."""
    if not tensor.is_floating_point():
        raise AdapterLoadError(f"{key}: {name} has dtype {tensor.dtype}, LoRA weights must be floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterLoadError(f"{key}: {name} holds NaN or infinite values")
    cast = tensor.to(dtype).contiguous()
    if not bool(torch.isfinite(cast).all()):
        raise AdapterLoadError(f"{key}: {name} overflows to infinity in the pool's dtype {dtype}")
    return cast


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def max_weights_file_bytes(shapes: ModelShapes, max_rank: int) -> int:
    """The size of the largest safetensors file that could hold a valid adapter for this model: every
    target of every layer at `max_rank` in the widest float, plus the largest header the format allows."""
    elements = 0
    for slices in shapes.targets.values():
        d_in = shapes.projections[slices[0]][0]
        d_out = sum(shapes.projections[slice_][1] for slice_ in slices)
        elements += max_rank * (d_in + d_out)
    return (SAFETENSORS_LENGTH_BYTES + SAFETENSORS_MAX_HEADER_BYTES
            + shapes.num_layers * elements * WIDEST_ELEMENT_BYTES)


def read_owned_bytes(key: str, path: Path, limit: int) -> bytes:
    """The whole file, copied into this process's memory: refused unless a regular file of at most `limit` bytes."""
    try:
        # Non-blocking: a FIFO put in the file's place must not hang the loader thread in open().
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise AdapterLoadError(f"{key}: {path.name} is not a regular file")
            data = fh.read(limit + 1)  # one byte more than allowed tells a file that is too large
    except OSError as exc:  # deleted or replaced since it was found
        raise AdapterLoadError(f"{key}: unreadable {path.name}: {exc}") from None
    if len(data) > limit:
        raise AdapterLoadError(f"{key}: {path.name} is over {limit} bytes, larger than any adapter for this "
                               "model up to the pool's max rank can be")
    return data


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
    data = read_owned_bytes(key, weights_path, max_weights_file_bytes(shapes, max_rank))
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise AdapterLoadError(f"{key}: sha256 of adapter_model.safetensors ({len(data)} bytes read, sha256 "
                                   f"{actual}) does not match the published one")
    try:
        config = json.loads(read_owned_bytes(key, config_path, ADAPTER_CONFIG_MAX_BYTES))
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past the parser's depth
        raise AdapterLoadError(f"{key}: unreadable adapter_config.json: {type(exc).__name__}: {exc}"[:500]) from None

    if not isinstance(config, dict):
        raise AdapterLoadError(f"{key}: adapter_config.json must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{key}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for option, allowed in _UNSUPPORTED.items():
        if config.get(option, allowed[0]) not in allowed:
            raise AdapterLoadError(f"{key}: PEFT option {option}={config[option]!r} is not supported")
    _check_numbers(key, config)

    try:
        tensors = load_safetensors(data)  # tensors over copies of `data`'s bytes: nothing maps the file
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterLoadError(f"{key}: unreadable adapter_model.safetensors: {exc}") from None
    del data  # the tensors hold their own copies: free the file's bytes before the casts below

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    module_names: dict[tuple[int, str], str] = {}
    for name, tensor in sorted(tensors.items()):  # by name, as safe_open lists them: the same first error each time
        match = _KEY.search(name)
        if match is None:
            raise AdapterLoadError(f"{key}: unsupported tensor {name!r} (only LoRA on decoder projections)")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in shapes.targets:
            raise AdapterLoadError(f"{key}: target module {module} is not supported "
                                   f"(the base model's LoRA targets: {', '.join(shapes.targets)})")
        if layer >= shapes.num_layers:
            raise AdapterLoadError(f"{key}: layer {layer} does not exist in the base model")
        pairs.setdefault((layer, module), {})[which] = tensor
        module_names[(layer, module)] = name[:match.end(2)].removeprefix(PEFT_PREFIX)

    alpha, use_rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora", False))
    modules = {}
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layer {layer} {module.rsplit('.', 1)[-1]}"
        if set(ab) != {"A", "B"}:
            raise AdapterLoadError(f"{key}: {where} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        slices = shapes.targets[module]
        d_in = shapes.projections[slices[0]][0]
        d_out = sum(shapes.projections[slice_][1] for slice_ in slices)
        rank = a.shape[0]
        if a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise AdapterLoadError(
                f"{key}: {where} has A {tuple(a.shape)} / B {tuple(b.shape)}, "
                f"base model needs A [r, {d_in}] / B [{d_out}, r]"
            )
        if rank > max_rank:
            raise AdapterLoadError(f"{key}: rank {rank} exceeds the pool's max rank {max_rank}")
        if rank < 1:
            raise AdapterLoadError(f"{key}: {where} has rank 0")
        module_name = module_names[(layer, module)]
        declared = _pattern_value(key, config.get("rank_pattern"), module_name, config.get("r", rank))
        if declared != rank:  # PEFT would build rank `declared` here and fail to load these weights
            raise AdapterLoadError(f"{key}: {where} has rank {rank}, its config declares {declared}")
        module_alpha = _pattern_value(key, config.get("alpha_pattern"), module_name, alpha)
        scale = float(module_alpha / (math.sqrt(rank) if use_rslora else rank))
        if not bool(torch.isfinite(torch.tensor(scale, dtype=SCALE_DTYPE))):
            raise AdapterLoadError(f"{key}: {where} has scale {scale!r}, not finite in {SCALE_DTYPE}")
        a = _check_weights(key, f"{where} lora_A", a, dtype)
        b = _check_weights(key, f"{where} lora_B", b, dtype)
        row = 0
        for slice_ in slices:  # a fused target: one A for every slice, each slice its own rows of B
            width = shapes.projections[slice_][1]
            if (layer, slice_) in modules:
                raise AdapterLoadError(f"{key}: layer {layer} {slice_} is targeted by more than one module")
            modules[(layer, slice_)] = (a, b[row:row + width], scale)
            row += width
    if not modules:
        raise AdapterLoadError(f"{key}: adapter holds no LoRA weights")
    return AdapterWeights(key=key, modules=modules)


def combine_adapters(key: str, members: list[tuple[AdapterWeights, float]], max_rank: int,
                     dtype: torch.dtype) -> AdapterWeights:
    """The mix Σ wᵢ·scaleᵢ·Bᵢ·Aᵢ·x as one adapter: per (layer, slice) A = cat(wᵢ·scaleᵢ·Aᵢ) [Σr, in],
    B = cat(Bᵢ) [out, Σr], scale 1; B·A·x splits by rank into exactly the members' weighted updates
    (PEFT's `add_weighted_adapter(..., combination_type="cat")`). A member without a module adds nothing
    there. Refused when some module's Σr exceeds the pool's max rank, or a folded weight is not finite."""
    parts: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for adapter, weight in members:
        for module, (a, b, scale) in adapter.modules.items():
            parts.setdefault(module, []).append((a, b, weight * scale))
    if not parts:
        raise AdapterLoadError(f"{key}: mix holds no LoRA weights")
    ranks = {module: sum(a.shape[0] for a, _, _ in group) for module, group in parts.items()}
    (layer, slice_), rank = max(ranks.items(), key=lambda item: item[1])
    if rank > max_rank:
        raise AdapterLoadError(f"{key}: mix rank {rank} (layer {layer} {slice_}) exceeds the pool's max rank {max_rank}")
    modules = {}
    for (layer, slice_), group in sorted(parts.items()):
        # The factor folds into A in float32, so the pool's dtype rounds the product once.
        a = torch.cat([a.float() * factor for a, _, factor in group])
        b = torch.cat([b for _, b, _ in group], dim=1)
        modules[(layer, slice_)] = (_check_weights(key, f"layer {layer} {slice_} mixed lora_A", a, dtype),
                                    b.to(dtype).contiguous(), 1.0)
    return AdapterWeights(key=key, modules=modules)
