"""edgesafe: compress text-to-image diffusion models for edge devices without keeping unwanted concepts."""

import logging
import os

__version__ = "0.1.0"

# diffusers warns at import when two distributions provide `optimum` (optimum + optimum-onnx).
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# diffusers imports bitsandbytes when it is installed (finetune.optimizer adamw-8bit), which on CPUs with
# AVX512-BF16 warns that an optional hub-downloaded 4-bit kernel is missing; edgesafe uses no 4-bit kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.msg)

from .errors import BudgetError, CheckpointError, EdgesafeError, ModelLoadError, RecipeError  # noqa: E402

_LAZY = {"load_evaluator": "models.loading", "load_pipeline": "models.loading",
         "PrunedUNet2DConditionModel": "models.structure", "Recipe": "recipe", "load_recipe": "recipe"}
"""Names imported on first use (torch and diffusers take seconds to import; ``edgesafe check`` needs neither).
diffusers finds ``PrunedUNet2DConditionModel`` here by name when it loads a pruned student's folder."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'edgesafe' has no attribute {name!r}")


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
