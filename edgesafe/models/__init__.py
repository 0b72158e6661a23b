"""Loading and saving pipelines, and facts about UNet architectures."""

from .loading import load_evaluator, load_pipeline, resolve_source

__all__ = ["load_evaluator", "load_pipeline", "resolve_source"]
