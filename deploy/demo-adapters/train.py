#!/usr/bin/env python3
"""Train the demo's LoRA adapters on SmolLM2-135M-Instruct with PEFT, on CPU, in a few minutes.

    .venv/bin/python deploy/demo-adapters/train.py                 # all adapters, then the check below
    .venv/bin/python deploy/demo-adapters/train.py pirate          # one of them
    .venv/bin/python deploy/demo-adapters/train.py --check-only    # only the check: greedy answers, base vs adapters

Each adapter learns from the tiny hand-written set in data.py: every example is rendered with the model's
chat template (the user's message, no system message, so the template's default system prompt, exactly as a
demo job renders) and the loss is on the assistant's answer and its end-of-turn token only. Training is
seeded: the LoRA initialisation (torch.manual_seed) and the order of the examples (random.Random(seed)) are
fixed. The result is a PEFT directory per adapter, <out>/<name>/ (adapter_config.json,
adapter_model.safetensors with bfloat16 weights to keep them small, and training.json: the settings, the
loss per step and the time it took). The check then loads the saved adapters back with PEFT and prints the
greedy answers of the base model and of each adapter to questions none of them saw in training.

The model is the one lorabus serves by default: `lorabus model fetch` (downloaded and converted once into
~/.cache/lorabus/models), or --model DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import ADAPTERS  # noqa: E402

BASE_MODEL = "smollm2-135m-instruct"  # lorabus's name for it: `lorabus model fetch smollm2-135m-instruct`
# The questions the demo asks (worker/demo.py): none of them is in data.py.
HELD_OUT = ["What is the capital of France?", "Tell me about the sea.", "Barack Obama visited Paris in 2015.",
            "How do I make a cup of tea?"]


@dataclass(frozen=True)
class Recipe:
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    epochs: int
    lr: float
    batch_size: int = 6
    seed: int = 0


RECIPES = {  # a distinct rank and set of target modules each
    "pirate": Recipe(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), epochs=4, lr=3e-3, seed=1),
    "french": Recipe(rank=16, alpha=32, target_modules=("gate_proj", "up_proj", "down_proj"), epochs=8, lr=1e-3,
                     seed=2),
    "entities": Recipe(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), epochs=4, lr=2e-3,
                       seed=3),
}


def load_base(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return tokenizer, model


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def encode(tokenizer, user: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat and their labels: -100 (no loss) everywhere but the answer and its <|im_end|>."""
    prompt = _ids(tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                                tokenize=True))
    full = _ids(tokenizer.apply_chat_template([{"role": "user", "content": user},
                                               {"role": "assistant", "content": answer}], tokenize=True))
    if full[:len(prompt)] != prompt:
        raise SystemExit(f"the chat template does not extend the generation prompt for {user!r}")
    end = full.index(tokenizer.eos_token_id, len(prompt)) + 1  # the answer's end-of-turn token, not what follows it
    ids = full[:end]
    return ids, [-100] * len(prompt) + ids[len(prompt):]


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (i, l) in enumerate(chunk):
            ids[row, :len(i)] = torch.tensor(i)
            labels[row, :len(l)] = torch.tensor(l)
            mask[row, :len(i)] = 1
        yield ids, mask, labels


def _save_bfloat16(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = path / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)


def train(name: str, model_dir: str, out_dir: Path) -> dict:
    from peft import LoraConfig, get_peft_model

    recipe = RECIPES[name]
    examples, purpose = ADAPTERS[name]
    tokenizer, model = load_base(model_dir)
    encoded = [encode(tokenizer, user, answer) for user, answer in examples]
    torch.manual_seed(recipe.seed)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(encoded) // recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total)  # linear decay to 0
    order = random.Random(recipe.seed)
    print(f"[{name}] {purpose}: {len(encoded)} examples, r={recipe.rank} alpha={recipe.alpha} "
          f"on {','.join(recipe.target_modules)} ({sum(p.numel() for p in params) / 1e6:.2f}M parameters), "
          f"{recipe.epochs} epochs x {steps_per_epoch} steps, lr {recipe.lr}", flush=True)
    started, losses, step = time.monotonic(), [], 0
    for epoch in range(recipe.epochs):
        shuffled = list(encoded)
        order.shuffle(shuffled)
        for ids, mask, labels in batches(shuffled, recipe.batch_size, tokenizer.pad_token_id):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(loss.item(), 4))
            print(f"[{name}] epoch {epoch + 1}/{recipe.epochs} step {step}/{total} loss {loss.item():.3f} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
    elapsed = time.monotonic() - started
    path = out_dir / name
    model.save_pretrained(str(path))
    _save_bfloat16(path)
    config_path = path / "adapter_config.json"  # the model's lorabus name, not this machine's cache path
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = BASE_MODEL
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (path / "README.md").unlink(missing_ok=True)  # PEFT's model card template; ../README.md describes these
    summary = {"name": name, "purpose": purpose, "recipe": asdict(recipe), "examples": len(encoded),
               "steps": total, "train_seconds": round(elapsed, 1), "threads": torch.get_num_threads(),
               "loss_first": losses[0], "loss_last_epoch": round(sum(losses[-steps_per_epoch:]) / steps_per_epoch, 4),
               "losses": losses, "versions": {"torch": torch.__version__, "peft": _version("peft"),
                                             "transformers": _version("transformers")}}
    (path / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    size = (path / "adapter_model.safetensors").stat().st_size
    print(f"[{name}] trained in {elapsed:.0f} s; loss {losses[0]:.3f} -> {summary['loss_last_epoch']:.3f} "
          f"(mean of the last epoch); saved {path} ({size / 2**20:.2f} MiB)", flush=True)
    return summary


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def generate(model, tokenizer, question: str, max_new_tokens: int = 48) -> str:
    ids = _ids(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=True))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0][len(ids):], skip_special_tokens=True).strip()


def check(model_dir: str, out_dir: Path, names: list[str], questions: list[str]) -> None:
    """Greedy answers of the base model and of each saved adapter (loaded back with PEFT) to the held-out questions."""
    from peft import PeftModel

    tokenizer, base = load_base(model_dir)
    answers = {"base model": [generate(base, tokenizer, q) for q in questions]}
    for name in names:
        model = PeftModel.from_pretrained(load_base(model_dir)[1], str(out_dir / name))
        model.eval()
        answers[name] = [generate(model, tokenizer, q) for q in questions]
    for i, question in enumerate(questions):
        print(f"\n{question}")
        for who, said in answers.items():
            print(f"  {who:<10} {said[i]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"adapters to train (default: all of {', '.join(RECIPES)})")
    parser.add_argument("--model", help="base model directory (default: lorabus's smollm2-135m-instruct, fetched once)")
    parser.add_argument("--out", default=str(HERE), help="where the adapter directories go (default: next to this script)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--check-only", action="store_true", help="skip training; print the held-out answers")
    parser.add_argument("--no-check", action="store_true", help="skip the held-out answers")
    args = parser.parse_args()
    names = args.names or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown adapter {unknown[0]!r}; known: {', '.join(RECIPES)}")
    torch.set_num_threads(args.threads)
    if args.model:
        model_dir = args.model
    else:
        from lorabus.worker.model_store import fetch_model

        model_dir = str(fetch_model(BASE_MODEL))
    out_dir = Path(args.out)
    started = time.monotonic()
    if not args.check_only:
        for name in names:
            train(name, model_dir, out_dir)
        print(f"trained {len(names)} adapters in {time.monotonic() - started:.0f} s", flush=True)
    if not args.no_check:
        check(model_dir, out_dir, names, HELD_OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
