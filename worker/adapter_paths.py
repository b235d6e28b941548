"""Adapter paths confined to the configured roots (`--adapter-root`).

A control event names a path the worker will read; without confinement whoever can write the control
topic can make the worker open any file it can read. With roots configured, the published path and
the files the loader reads from it must resolve (symlinks followed) under one of the roots.

An `s3://bucket/prefix/` path is no local path and never comes here: the roots do not apply to it, the
worker downloads it into its disk tier (worker/store_fetches.py), and `local_path` refuses it like any
other scheme.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

FILE_SCHEME = "file://"
STORE_SCHEME = "s3://"  # an adapter in the object store (worker/adapter_store.py)
# The files the adapter loader opens inside an adapter directory (scheduler/adapters.py).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_LOCAL_HOSTS = ("", "localhost")


class AdapterPathError(ValueError):
    """A published adapter path that the roots do not allow; the message is the reason."""


def is_store_path(path: str) -> bool:
    """Whether a published path names the object store rather than a local directory."""
    return path.startswith(STORE_SCHEME)


def local_path(path: str) -> str:
    """The filesystem path a published path (local path or file:// URI) names."""
    if path.startswith(FILE_SCHEME):
        parts = urlsplit(path)
        if parts.netloc not in _LOCAL_HOSTS:
            raise AdapterPathError(f"adapter path {path}: file:// URI names host {parts.netloc!r}, only local paths are allowed")
        if parts.query or parts.fragment:
            raise AdapterPathError(f"adapter path {path}: file:// URI has a query or fragment")
        return unquote(parts.path)
    if "://" in path:
        raise AdapterPathError(f"adapter path {path}: only local directories and file:// URIs are allowed")
    return path


def _under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # e.g. different drives
        return False


def confine_adapter_path(path: str, roots: list[str]) -> str:
    """The resolved adapter directory when it lies under one of `roots`; AdapterPathError otherwise.

    Empty `roots` = no confinement: the local path it names (a file:// URI decoded) is returned as is.
    """
    if not roots:
        return local_path(path)
    if not all(roots):
        raise AdapterPathError("an adapter root is the empty string")  # fail closed: never read it as the cwd
    local = local_path(path)
    if "\x00" in local:
        raise AdapterPathError(f"adapter path {path!r} contains a NUL byte")
    if not os.path.isabs(local):
        # Relative to what? The publisher's and the worker's working directories differ.
        raise AdapterPathError(f"adapter path {path} is not absolute")
    real_roots = [os.path.realpath(root) for root in roots]
    resolved = os.path.realpath(local)
    if not any(_under(resolved, root) for root in real_roots):
        via = " (through a symlink)" if os.path.normpath(local) != resolved else ""
        raise AdapterPathError(f"adapter path {path} resolves to {resolved}{via}, outside the adapter roots {real_roots}")
    for name in ADAPTER_FILES:
        # A file inside the directory may itself be a symlink out of the roots.
        target = os.path.realpath(os.path.join(resolved, name))
        if not any(_under(target, root) for root in real_roots):
            raise AdapterPathError(f"adapter path {path}: {name} resolves to {target}, outside the adapter roots {real_roots}")
    return resolved
