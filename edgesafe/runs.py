"""Run folders and the generic stage runner.

A run folder holds the resolved recipe and one sub-folder per stage, each with a ``stage.json``
manifest: its status (``running`` or ``complete``), the key of its inputs (settings + hashes of what
it reads), figures and wall time. What ``compress`` does with each stage is one of :data:`ACTIONS`:
with ``--resume`` it skips a stage whose manifest is complete with the same key, resumes one that was
interrupted with the same key (the stage continues from its own checkpoints), and runs one that is
missing or stale. Manifests are written atomically; a stage is complete only once its manifest says so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .errors import EdgesafeError
from .io import write_json, write_text
from .recipe import Recipe

MANIFEST = "stage.json"

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
    """A named step of ``compress``: a settings selector and a function that returns figures."""

    name: str
    folder: str
    settings: Callable[[Recipe], dict[str, Any]]
    run: Callable[[StageContext], dict[str, Any]]
    description: str = ""
    inputs: Callable[[Recipe], dict[str, str]] = field(default=lambda recipe: {})
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
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            return None

    def write_recipe(self, recipe: Recipe) -> None:
        write_text(self.root / "recipe.yaml", recipe.to_yaml())


def stage_key(stage: Stage, recipe: Recipe, previous: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The key of a stage's inputs: its settings, its own input hashes and its predecessors' keys."""
    inputs = dict(stage.inputs(recipe))
    inputs.update({f"stage:{name}": m["key"] for name, m in previous.items()})
    settings = stage.settings(recipe)
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
