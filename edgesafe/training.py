"""What every edgesafe training loop shares (fine-tuning a student, building a zoo model): kill-safe checkpoints
and a resumable step loop that stops cleanly on SIGINT / SIGTERM.

A checkpoint is one safetensors file, ``step-NNNNNNN.safetensors``: the modules' states, the optimizers' states
and any extra tensors, with a JSON header (the step, the optimizers' layout and what the loop adds). It is
written beside the previous one and only then named in ``latest.json``, so the last good checkpoint is never
overwritten; the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, EdgesafeError
from .io import load_metadata, load_tensors, optimizer_from_tensors, optimizer_to_tensors, save_tensors, write_json


class Interrupted(EdgesafeError):
    """The run was stopped by a signal after writing a checkpoint."""

    exit_code = 130


class Checkpoints:
    """The checkpoints of one training run in ``folder`` (see the module docstring); ``writer`` says whether this
    process writes them (one rank of a multi-process run does)."""

    def __init__(self, folder: Path, *, keep: int = 2, writer: bool = True):
        self.folder, self.keep, self.writer = Path(folder), keep, writer

    def save(self, step: int, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], *,
             tensors: dict[str, torch.Tensor] | None = None, header: dict[str, str] | None = None,
             state: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint of ``step``: every module's and optimizer's state (by name), extra ``tensors``,
        ``state`` (JSON) and extra ``header`` strings."""
        out = dict(tensors or {})
        meta: dict[str, Any] = {"step": step, **(state or {})}
        for name, module in modules.items():
            out.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        for name, opt in optimizers.items():
            t, layout = optimizer_to_tensors(opt, prefix=name)
            out.update(t)
            meta[f"optimizer.{name}"] = layout
        path = self.folder / f"step-{step:07d}.safetensors"
        if self.writer:
            save_tensors(path, out, metadata={"state": json.dumps(meta), **(header or {})})
            write_json(self.folder / "latest.json", {"file": path.name, "step": step})
            for old in sorted(self.folder.glob("step-*.safetensors"))[: -self.keep]:
                old.unlink()
        return path

    def load(self) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], dict[str, str]] | None:
        """The latest checkpoint as (path, tensors, state, header); None when there is none.

        Raises:
            CheckpointError: an unreadable pointer, or a file that is not a readable checkpoint.
        """
        pointer = self.folder / "latest.json"
        if not pointer.is_file():
            return None
        try:
            path = self.folder / json.loads(pointer.read_text())["file"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{pointer}: unreadable checkpoint pointer") from None
        tensors, header = load_tensors(path), load_metadata(path)
        try:
            state = json.loads(header["state"])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not an edgesafe checkpoint") from None
        return path, tensors, state, header

    @staticmethod
    def restore(tensors: dict[str, torch.Tensor], state: dict[str, Any], modules: dict[str, nn.Module],
                optimizers: dict[str, torch.optim.Optimizer]) -> int:
        """Load a checkpoint's states into ``modules`` and ``optimizers``; returns its step."""
        for name, module in modules.items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        for name, opt in optimizers.items():
            optimizer_from_tensors(opt, tensors, state[f"optimizer.{name}"], prefix=name)
        return int(state["step"])


@contextmanager
def _signals_noted() -> Iterator[dict[str, int | None]]:
    flag: dict[str, int | None] = {"signal": None}

    def note(signum, _frame):
        flag["signal"] = signum

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_steps(start: int, total: int, step: Callable[[int], None], save: Callable[[int], Any], *,
              every: int, progress: Callable[[int, int], None] | None = None) -> int:
    """Run ``step(i)`` for i in [start, total), calling ``save(i + 1)`` every ``every`` steps and at the end.

    Returns:
        The number of steps run.

    Raises:
        Interrupted: SIGINT or SIGTERM arrived; the step under way finished and was saved first.
    """
    with _signals_noted() as stop:
        for i in range(start, total):
            step(i)
            if progress:
                progress(i + 1, total)
            if stop["signal"] is not None:
                save(i + 1)
                raise Interrupted(f"stopped by signal {stop['signal']} at step {i + 1}; checkpoint written, "
                                  "rerun with --resume to continue")
            if (i + 1) % every == 0 and i + 1 < total:
                save(i + 1)
    save(total)
    return total - start
