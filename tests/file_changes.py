"""What a careless operator does to a published adapter's weights file, and how a test undoes it: truncate it
in place (a `cp` or `rsync --inplace` cut short), overwrite it in place with other valid weights of the
same size, or delete it. Shared by the engine-level and the broker tests of changed adapter files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load, save

WEIGHTS = "adapter_model.safetensors"
CHANGES = ("truncate", "overwrite", "delete")


def copy_adapter(src: Path, dst: Path) -> tuple[Path, str]:
    """A copy of an adapter directory that a test may change, and the sha256 of its weights (to publish)."""
    shutil.copytree(src, dst)
    return dst, hashlib.sha256((dst / WEIGHTS).read_bytes()).hexdigest()


def other_weights(weights: bytes) -> bytes:
    """Valid weights of the same names, shapes and file size, with every lora_B doubled: what an in-place
    overwrite with another training run's file looks like."""
    header_length = int.from_bytes(weights[:8], "little")
    metadata = json.loads(weights[8:8 + header_length]).get("__metadata__")
    tensors = {name: t * 2 if "lora_B" in name else t for name, t in load(weights).items()}
    changed = save(tensors, metadata=metadata)
    assert len(changed) == len(weights), "the overwrite must keep the file's size (no SIGBUS from a shorter file)"
    return changed


def change(adapter: Path, how: str) -> bytes:
    """Change the adapter's weights file `how` (one of CHANGES), in place; returns its bytes from before."""
    path = adapter / WEIGHTS
    original = path.read_bytes()
    if how == "truncate":
        os.truncate(path, len(original) // 2)
    elif how == "overwrite":
        replacement = other_weights(original)
        with open(path, "r+b") as fh:  # the same inode, as `cp` over an existing file writes it
            fh.write(replacement)
    elif how == "delete":
        path.unlink()
    else:
        raise ValueError(how)
    return original


def restore(adapter: Path, original: bytes) -> None:
    """Put the published bytes back (in place where the file still exists)."""
    with open(adapter / WEIGHTS, "r+b" if (adapter / WEIGHTS).exists() else "wb") as fh:
        fh.write(original)
        fh.truncate()


# What a job for the changed version is told once its weights are read from disk again.
REASONS = {"truncate": "sha256", "overwrite": "sha256", "delete": "no adapter_model.safetensors"}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
                                        for k in a)
