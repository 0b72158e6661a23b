"""Train the tiny-shapes evaluator alone (``edgesafe zoo build tiny-shapes-evaluator``), resumably: phase 1
of the teacher's build (:mod:`.build`), for a new evaluator beside the committed teacher. Every figure read
by the evaluator (prompt accuracy, concept rates, FID of this world) changes with it."""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path

from . import evaluator, world
from .build import SCHEDULES, ProgressFn, Schedule, save_evaluator, train_evaluator
from .evaluator import ShapesEvaluator

__all__ = ["SCHEDULES", "architecture_id", "build"]


def architecture_id() -> str:
    """A short hash of the evaluator's config and of the code that draws its training images, so that checkpoints
    of another evaluator, or of one trained on other images, are never resumed."""
    config = {k: v for k, v in dict(ShapesEvaluator().config).items() if not k.startswith("_")}
    text = json.dumps(config, sort_keys=True, default=str) + inspect.getsource(evaluator) + inspect.getsource(world)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def build(out: Path, *, work: Path, seed: int = 0, schedule: Schedule = SCHEDULES["full"],
          progress: ProgressFn | None = None) -> dict:
    """Train the evaluator (``schedule``'s ``evaluator_*`` fields) and write ``out/tiny-shapes-evaluator``."""
    t0 = time.perf_counter()
    trained = train_evaluator(work, seed=seed, schedule=schedule, progress=progress)
    seconds = time.perf_counter() - t0
    save_evaluator(trained, out, seed=seed, schedule=schedule, seconds=seconds)
    return {"seed": seed, "build_seconds": seconds}
