"""Loading and saving pipelines (pruned UNets included), and facts about UNet architectures."""

from .loading import load_evaluator, load_pipeline, resolve_source
from .structure import load_unet, read_structure, save_unet

__all__ = ["load_evaluator", "load_pipeline", "load_unet", "read_structure", "resolve_source", "save_unet"]
