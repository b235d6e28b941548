"""Test and benchmark assets, shipped so the tests and the benchmarks build the same things (as
`numpy.testing` is): a tiny random Llama-architecture base model (or another supported family) with a
byte-level BPE tokenizer, and sample LoRA adapters in PEFT's on-disk layout (adapter_config.json +
adapter_model.safetensors) whose targets and shapes come from the model's spec (scheduler/arch.py).
The worker itself never imports it.

Everything is generated locally from a seed (no model hub); the demo runs the real SmolLM2 with the
trained adapters of deploy/demo-adapters instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorabus.scheduler.adapters import PEFT_PREFIX
from lorabus.scheduler.arch import ModelSpec

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "lorabus serves many lora adapters on one shared base model",
    "jobs arrive on kafka and results leave on reply topics",
    "translate english to french: hello world",
    "summarize: the meeting moved to thursday at noon",
    "classify sentiment: i loved this film",
    "0123456789 + - * / = ( ) , . ! ?",
]

TINY_MODEL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def build_tokenizer(out_dir: Path, vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<s>", "</s>", "<pad>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_model(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A random-init Llama (or any `model_type` of scheduler.arch.FAMILIES) saved with safetensors and a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    shape = {**TINY_MODEL, **overrides}
    model_type = shape.pop("model_type", "llama")
    tokenizer = build_tokenizer(out_dir, shape["vocab_size"])
    config = AutoConfig.for_model(model_type, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_sample_adapter(
    out_dir: str | Path,
    model_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.2,
) -> Path:
    """A LoRA adapter with random non-zero A and B, written exactly as PEFT's save_pretrained does.
    `target_modules` are PEFT target names of the model's family (Phi-3: qkv_proj, gate_up_proj, ...)."""
    spec = ModelSpec.from_dir(model_dir)
    by_name = {module.rsplit(".", 1)[-1]: module for module in spec.targets}
    unknown = set(target_modules) - set(by_name)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not LoRA targets of this {spec.model_type} model ({sorted(by_name)})")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for name in target_modules:
            slices = spec.targets[by_name[name]]
            d_in, d_out = spec.projections[slices[0]][0], sum(spec.projections[s][1] for s in slices)
            prefix = PEFT_PREFIX + spec.module_name(layer, by_name[name])
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * std
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
        "r": rank, "lora_alpha": alpha, "target_modules": list(target_modules), "lora_dropout": 0.0,
        "bias": "none", "use_rslora": use_rslora, "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out_dir
