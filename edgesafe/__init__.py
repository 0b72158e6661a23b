"""edgesafe: compress text-to-image diffusion models for edge devices without keeping unwanted concepts."""

import os

__version__ = "0.1.0"

# diffusers warns at import when two distributions provide `optimum` (optimum + optimum-onnx).
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from .errors import BudgetError, CheckpointError, EdgesafeError, ModelLoadError, RecipeError  # noqa: E402
from .models.loading import load_evaluator, load_pipeline  # noqa: E402
from .prune.structure import PrunedUNet2DConditionModel  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "BudgetError",
    "CheckpointError",
    "EdgesafeError",
    "ModelLoadError",
    "PrunedUNet2DConditionModel",
    "Recipe",
    "RecipeError",
    "__version__",
    "load_evaluator",
    "load_pipeline",
    "load_recipe",
]
