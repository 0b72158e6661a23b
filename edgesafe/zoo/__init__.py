"""The model zoo: pipelines and evaluators that ship inside the package, addressed as ``zoo:NAME``, and the
procedural worlds they were trained on (``data.kind: zoo`` draws fine-tuning data from a world)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ZooEntry:
    description: str
    builder: str | None = None
    """Module whose ``build`` trains the entry (``edgesafe zoo build NAME``); it builds its companions too."""
    world: str | None = None
    """Module of the procedural world the entry draws (``sample_batch``, ``coverage_prompts``, ``values_named``)."""


ZOO: dict[str, ZooEntry] = {
    "tiny-shapes": ZooEntry("the tiny-shapes teacher: a StableDiffusionPipeline trained by `edgesafe zoo build`",
                            builder="edgesafe.zoo.tiny_shapes.build", world="edgesafe.zoo.tiny_shapes.world"),
    "tiny-shapes-evaluator": ZooEntry("object / colour / style classifier of the tiny-shapes world",
                                      builder="edgesafe.zoo.tiny_shapes.build_evaluator"),
}
WORLDS = {name: entry.world for name, entry in ZOO.items() if entry.world}
"""The zoo's procedural worlds, the names ``data.kind: zoo`` takes."""


def zoo_path(name: str) -> Path:
    """The folder of zoo entry ``name``; unknown names and unbuilt entries are a ModelLoadError."""
    if name not in ZOO:
        raise ModelLoadError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    path = WEIGHTS_DIR / name
    if not path.is_dir():
        builders = [n for n, e in ZOO.items() if e.builder]
        raise ModelLoadError(f"zoo model {name!r} is not built: run `edgesafe zoo build {builders[0]}`")
    return path


def load_world(name: str) -> ModuleType:
    """The world module of zoo entry ``name`` (see :class:`ZooEntry`)."""
    return importlib.import_module(WORLDS[name])


def load_builder(name: str) -> ModuleType:
    """The builder module of zoo entry ``name``; a name without one is a ModelLoadError."""
    builder = ZOO[name].builder if name in ZOO else None
    if builder is None:
        known = ", ".join(n for n, e in ZOO.items() if e.builder)
        raise ModelLoadError(f"zoo build: {name!r} has no builder; known: {known}")
    return importlib.import_module(builder)
