"""Atomic writes and pickle-free state files (safetensors for tensors, JSON for the rest)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, DiskFullError, EdgesafeError, first_line

NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
"""errnos of a write that ran out of room: the device is full, the quota spent, or the file size limit reached."""


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that ran out of room: an ``OSError`` with its errno, or an error that carries one
    in its text (a Rust or C++ writer's, ``shutil.copytree``'s list of failed files)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in NO_SPACE
    return any(text in str(exc) for text in ("os error 28", "No space left on device", "Disk quota exceeded",
                                             "File too large"))


@contextmanager
def space_checked(path: Path) -> Iterator[None]:
    """Turn a write into ``path`` that runs out of space into a :class:`DiskFullError` line."""
    try:
        yield
    except Exception as exc:
        if out_of_space(exc):
            raise DiskFullError(f"{path}: no space left to write it; what was there before is intact. Free some "
                                "space and rerun (--resume continues)") from None
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename. Running out of space
    leaves ``path`` as it was and raises :class:`DiskFullError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with space_checked(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with space_checked(path):
            yield Path(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path, *, copy_from: Path | None = None) -> Iterator[Path]:
    """Yield ``<path>.partial`` (empty, or a copy of ``copy_from``); on success it replaces ``path``
    whole, on failure it is removed and ``path`` is left as it was (running out of space is a
    :class:`DiskFullError`)."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with space_checked(path):
            if copy_from is not None:
                shutil.copytree(copy_from, partial)
            else:
                partial.mkdir(parents=True)
            yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: Path, what: str = "file") -> Any:
    """The JSON in ``path``; a missing, unreadable or invalid file is one :class:`EdgesafeError` line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgesafeError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgesafeError(f"{path}: {what} is not readable JSON ({first_line(exc)})") from None


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors, atomically. Only what must be copied is (tensors off the CPU, not
    contiguous, or sharing storage with one already listed): a checkpoint of an SD-size student with its
    optimizer states does not double the memory."""
    clean, storages = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        storage = v.untyped_storage().data_ptr()
        clean[k] = v.clone() if storage in storages else v
        storages.add(storage)
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt one raises :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_metadata(path: Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _flatten(slots: dict[str, Any], into: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested state (bitsandbytes keeps its quantisation state in a dict) as ``outer/inner`` keys."""
    for name, value in slots.items():
        if isinstance(value, dict):
            _flatten(value, into, f"{prefix}{name}/")
        else:
            into[prefix + name] = value
    return into


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *outer, leaf = key.split("/")
        node = nested
        for part in outer:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able metadata."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for name, value in _flatten(slots, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optim"
) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    flat: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1 :].split(".", 1)
            flat.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        flat.setdefault(int(idx), {})[name] = value
    state = {idx: _nest(slots) for idx, slots in flat.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
