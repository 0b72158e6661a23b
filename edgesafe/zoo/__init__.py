"""The model zoo: pipelines and evaluators that ship inside the package, addressed as ``zoo:NAME``."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).parent / "weights"

ZOO: dict[str, str] = {
    "tiny-shapes": "the tiny-shapes teacher: a StableDiffusionPipeline trained by `edgesafe zoo build`",
    "tiny-shapes-evaluator": "object / colour / style classifier of the tiny-shapes world",
}


def zoo_path(name: str) -> Path:
    """The folder of zoo entry ``name``; unknown names and unbuilt entries are a ModelLoadError."""
    if name not in ZOO:
        raise ModelLoadError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    path = WEIGHTS_DIR / name
    if not path.is_dir():
        raise ModelLoadError(f"zoo model {name!r} is not built: run `edgesafe zoo build tiny-shapes`")
    return path
