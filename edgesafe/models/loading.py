"""One way in: ``load_pipeline(source)`` for ``zoo:NAME`` or a local diffusers folder, offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError, safe_open

from ..errors import ModelLoadError, first_line
from ..zoo import zoo_path
from .structure import SPEC_NAME, load_unet

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def resolve_source(source: str | Path) -> Path:
    """The folder behind ``zoo:NAME`` or a path; a missing folder is a ModelLoadError."""
    text = str(source)
    if text.startswith("zoo:"):
        return zoo_path(text[4:])
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model folder")
    return path


def _check_pipeline_folder(path: Path) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{index}: invalid JSON ({exc.msg})") from None
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = path / name
        if not folder.is_dir():
            raise ModelLoadError(f"{path}: component folder {name}/ is missing")
        if name in ("unet", "vae", "text_encoder") and not any((folder / w).is_file() for w in _WEIGHT_NAMES):
            raise ModelLoadError(f"{folder}: no safetensors weights (edgesafe loads safetensors only)")
    _check_files(path)


def _check_files(path: Path) -> None:
    """Every JSON file parses and every safetensors header reads (cheap: headers only), so that a corrupt or
    truncated file is named in the error rather than lost in a loader's message."""
    for f in sorted(path.rglob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{f}: not valid JSON ({first_line(exc)})") from None
    for f in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{f}: not a readable safetensors file ({first_line(exc)})") from None


def load_pipeline(source: str | Path, *, torch_dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline, offline, safetensors only (pruned students included).

    Args:
        source: ``zoo:NAME`` (a model shipped in the package) or a local diffusers pipeline folder.
        torch_dtype: the dtype of every component.

    Returns:
        A ``StableDiffusionPipeline`` without a safety checker, its progress bars off.

    Raises:
        ModelLoadError: a missing or unbuilt source, a folder that is not a pipeline, a component without
            safetensors weights, or weights that do not load (the first line of the loader's error).
    """
    diffusers_logging.disable_progress_bar()
    path = resolve_source(source)
    _check_pipeline_folder(path)
    try:
        extra = {}
        if (path / "unet" / SPEC_NAME).is_file():  # a pruned UNet: rebuilt from its structure spec
            extra["unet"] = load_unet(path / "unet", torch_dtype=torch_dtype)
        pipe = StableDiffusionPipeline.from_pretrained(
            path, torch_dtype=torch_dtype, use_safetensors=True, local_files_only=True,
            safety_checker=None, requires_safety_checker=False, **extra,
        )
    except (OSError, ValueError, SafetensorError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot load pipeline ({first_line(exc)})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_evaluator(source: str | Path):
    """Load the zoo world's evaluator (``ShapesEvaluator``) from ``zoo:NAME`` or a folder."""
    from ..zoo.tiny_shapes.evaluator import ShapesEvaluator

    path = resolve_source(source)
    _check_files(path)
    try:
        return ShapesEvaluator.from_pretrained(path, use_safetensors=True, local_files_only=True).eval()
    except (OSError, ValueError, SafetensorError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot load evaluator ({first_line(exc)})") from None
