"""Run folders and the generic stage runner.

A run folder holds the resolved recipe and one sub-folder per stage, each with a ``stage.json``
manifest: its status (``running`` or ``complete``), the key of its inputs (the recipe fields it reads,
fingerprints of the files it reads, the keys of the stages before it), figures and wall time. What
``compress`` does with each stage is one of :data:`ACTIONS`: with ``--resume`` it skips a stage whose
manifest is complete with the same key, resumes one that was interrupted with the same key (the stage
continues from its own checkpoints), and runs one that is missing or stale. Manifests are written
atomically; a stage is complete only once its manifest says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .errors import EdgesafeError
from .io import read_json, write_json, write_text
from .recipe import Recipe

MANIFEST = "stage.json"
LOCK = ".lock"

Action = Literal["skip", "resume", "run"]
ACTIONS: dict[str, str] = {
    "skip": "complete with the same inputs",
    "resume": "interrupted with the same inputs: continues from its checkpoints",
    "run": "not run yet, or its inputs changed",
}
"""What ``compress`` does with a stage, and why (the plan, the terminal and the JSON events all say these)."""


def fingerprint(path: Path, *, chunk: int = 1 << 20) -> str:
    """A fast content fingerprint of a file or folder: names, sizes and the first and last MiB."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if f != path else f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(chunk))
            if size > 2 * chunk:
                fh.seek(-chunk, 2)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageContext:
    """What a stage's function receives."""

    recipe: Recipe
    run: RunDir
    folder: Path
    resume: bool
    """True when an interrupted attempt with the same inputs left state to continue from."""
    previous: dict[str, dict[str, Any]]
    """Completed manifests of the stages before this one, by stage name."""
    progress: Callable[[str, int, int], None] = lambda *_: None


@dataclass(frozen=True)
class Stage:
    """A named step of ``compress``: the recipe fields it reads and a function that returns figures."""

    name: str
    folder: str
    reads: Callable[[Recipe], list[str]]
    """The recipe fields the stage reads, as dotted paths (``concepts[].target``: that field of every concept;
    the seed is always read). Its key is built from their values, so a change to any of them redoes it and a
    change to any other field does not."""
    run: Callable[[StageContext], dict[str, Any]]
    description: str = ""
    inputs: Callable[[Recipe], dict[str, str]] = field(default=lambda recipe: {})
    summary: Callable[[dict[str, Any]], str] = field(default=lambda figures: "")
    """The key figures of the stage's manifest in one line (the end of ``compress`` shows them)."""
    keep: tuple[str, ...] = ()
    """Files of the stage folder kept when a stale stage is redone, until the stage replaces them (so a
    report is never lost to a run that fails before writing its new one)."""


@dataclass(frozen=True)
class StageOutcome:
    name: str
    action: Action
    manifest: dict[str, Any]


class RunDir:
    """A run folder on disk."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def stage_dir(self, stage: Stage) -> Path:
        return self.root / stage.folder

    def manifest(self, stage: Stage) -> dict[str, Any] | None:
        path = self.stage_dir(stage) / MANIFEST
        return read_json(path, "stage manifest (delete its stage folder to redo the stage)") if path.is_file() \
            else None

    def write_recipe(self, recipe: Recipe) -> None:
        write_text(self.root / "recipe.yaml", recipe.to_yaml())

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process: a second process stops at once with one line naming the first's
        process id. The lock is the operating system's (``flock``), so a run that crashes leaves none behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        with path.open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                raise EdgesafeError(f"{self.root}: in use by another edgesafe process (pid {holder}); wait for it "
                                    "to finish, or stop it") from None
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)


def field_values(recipe: Recipe, paths: list[str]) -> dict[str, Any]:
    """The values of the recipe's fields at dotted ``paths`` (see :attr:`Stage.reads`)."""
    def at(node: Any, path: str) -> Any:
        head, _, rest = path.partition(".")
        if head.endswith("[]"):
            return [at(item, rest) if rest else item for item in (node or {}).get(head[:-2]) or []]
        value = node.get(head) if isinstance(node, dict) else None
        return at(value, rest) if rest else value

    data = recipe.to_dict()
    return {path: at(data, path) if path else data for path in paths}


def stage_key(stage: Stage, recipe: Recipe, previous: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The key of a stage's inputs: the recipe fields it reads, its own input hashes and its predecessors' keys."""
    inputs = dict(stage.inputs(recipe))
    inputs.update({f"stage:{name}": m["key"] for name, m in previous.items()})
    settings = field_values(recipe, stage.reads(recipe))
    key = digest({"settings": settings, "inputs": inputs, "seed": recipe.seed})
    return key, {"settings": settings, "inputs": inputs}


def decide(manifest: dict[str, Any] | None, key: str, *, resume: bool) -> Action:
    """What to do with a stage whose folder holds ``manifest`` and whose inputs now have ``key``."""
    if not resume or manifest is None or manifest.get("key") != key:
        return "run"
    return "skip" if manifest.get("status") == "complete" else "resume"


def plan(recipe: Recipe, run: RunDir, stages: list[Stage], *, resume: bool) -> list[tuple[Stage, Action]]:
    """What ``run_stages`` would do with each stage (keys of earlier stages are assumed unchanged, so a stage
    after one that runs is shown as "run" only if stale)."""
    previous: dict[str, dict[str, Any]] = {}
    actions = []
    for stage in stages:
        key, _ = stage_key(stage, recipe, previous)
        actions.append((stage, decide(run.manifest(stage), key, resume=resume)))
        previous[stage.name] = {"key": key}
    return actions


def run_stages(
    recipe: Recipe,
    run: RunDir,
    stages: list[Stage],
    *,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    on_stage: Callable[[Stage, Action], None] | None = None,
) -> list[StageOutcome]:
    """Run ``stages`` in order into ``run``; see the module docstring for the resume rules. ``on_stage`` hears
    each stage's action before it starts."""
    with run.lock():
        return _run_held(recipe, run, stages, resume=resume, progress=progress, on_stage=on_stage)


def _run_held(recipe: Recipe, run: RunDir, stages: list[Stage], *, resume: bool,
                progress: Callable[[str, int, int], None] | None,
                on_stage: Callable[[Stage, Action], None] | None) -> list[StageOutcome]:
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_recipe(recipe)
    previous: dict[str, dict[str, Any]] = {}
    outcomes = []
    for stage in stages:
        key, detail = stage_key(stage, recipe, previous)
        folder = run.stage_dir(stage)
        old = run.manifest(stage)
        action = decide(old, key, resume=resume)
        if on_stage:
            on_stage(stage, action)
        if action == "skip":
            outcomes.append(StageOutcome(stage.name, action, old))
            previous[stage.name] = old
            continue
        continuing = action == "resume"
        if folder.exists() and not continuing:
            for child in folder.iterdir():
                if child.name not in stage.keep:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, Any] = {"stage": stage.name, "status": "running", "key": key, **detail,
                                    "edgesafe": __version__}
        write_json(folder / MANIFEST, manifest)
        ctx = StageContext(recipe, run, folder, continuing, dict(previous), progress or (lambda *_: None))
        t0 = time.perf_counter()
        figures = stage.run(ctx)
        if not isinstance(figures, dict):
            raise EdgesafeError(f"stage {stage.name!r} returned no figures")
        manifest.update(status="complete", figures=figures, wall_seconds=round(time.perf_counter() - t0, 3))
        write_json(folder / MANIFEST, manifest)
        previous[stage.name] = manifest
        outcomes.append(StageOutcome(stage.name, action, manifest))
    return outcomes
