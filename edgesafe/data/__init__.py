"""Image-caption data for calibration and fine-tuning: the zoo world, an image folder, or JSONL.

- ``zoo``: the generator of a zoo world (``zoo.WORLDS``), seeded per batch;
- ``folder``: images with a same-named ``.txt`` caption beside each;
- ``jsonl``: one ``{"image": path, "text": caption}`` per line, paths relative to the file.

With ``exclude_concepts`` every sample whose caption names an unwanted concept is dropped (the
paper's setting: the fine-tuning data lacks the concepts the teacher knows).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import EdgesafeError
from ..recipe import Recipe
from ..zoo import load_world

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _folder_samples(path: Path) -> list[tuple[Path, str]]:
    if not path.is_dir():
        raise EdgesafeError(f"data.path: no such folder {path}")
    return [(img, img.with_suffix(".txt").read_text().strip()) for img in sorted(path.iterdir())
            if img.suffix.lower() in IMAGE_SUFFIXES and img.with_suffix(".txt").is_file()]


def _jsonl_samples(path: Path) -> list[tuple[Path, str]]:
    if not path.is_file():
        raise EdgesafeError(f"data.path: no such file {path}")
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            samples.append((path.parent / row["image"], str(row["text"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EdgesafeError(f"{path}:{n}: expected {{\"image\": ..., \"text\": ...}}") from None
    return samples


FILE_SOURCES: dict[str, Callable[[Path], list[tuple[Path, str]]]] = {"folder": _folder_samples, "jsonl": _jsonl_samples}
"""``data.kind``s read from files: ``data.path`` -> (image path, caption) pairs."""
DATA_KINDS = ("zoo", *FILE_SOURCES)
"""Every ``data.kind``: a zoo world's generator, or a file source."""


def _concept_words(recipe: Recipe) -> list[str]:
    return [c.target.lower() for c in recipe.concepts]


def _world(recipe: Recipe) -> tuple[ModuleType, tuple[str, ...]]:
    """The zoo world of ``recipe``'s data and the values its samples leave out: those the concepts' targets
    name, when the data excludes the concepts."""
    world = load_world(recipe.data.name or "")
    return world, world.values_named(_concept_words(recipe)) if recipe.data.exclude_concepts else ()


def _file_samples(recipe: Recipe) -> list[tuple[Path, str]]:
    spec = recipe.data
    path = Path(spec.path or "")
    samples = FILE_SOURCES[spec.kind](path)
    if spec.exclude_concepts:
        words = _concept_words(recipe)
        samples = [(p, t) for p, t in samples if not any(w in t.lower() for w in words)]
    if not samples:
        raise EdgesafeError(f"data.path: {path} has no images with captions")
    for image, _ in samples:  # headers only: a broken file stops the run before any heavy work
        try:
            with Image.open(image):
                pass
        except (OSError, UnidentifiedImageError):
            raise EdgesafeError(f"{image}: not a readable image") from None
    return samples


def _load_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    except (OSError, UnidentifiedImageError):
        raise EdgesafeError(f"{path}: not a readable image") from None
    return np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1


def training_resolution(recipe: Recipe, pipe) -> int:
    """The image size batches are drawn at: ``data.resolution``, else the model's native size. A size the
    pipeline cannot take (not a multiple of its VAE factor times the UNet's downsampling) is an error."""
    unet = pipe.unet.config
    native = (unet.sample_size if isinstance(unet.sample_size, int) else unet.sample_size[0]) * pipe.vae_scale_factor
    size = recipe.data.resolution or native
    multiple = pipe.vae_scale_factor * 2 ** (len(unet.down_block_types) - 1)
    if size % multiple:
        raise EdgesafeError(f"data.resolution: {size} px is not a multiple of {multiple} px, which this model "
                            f"needs (VAE factor {pipe.vae_scale_factor} x UNet downsampling "
                            f"{2 ** (len(unet.down_block_types) - 1)}); its native size is {native}")
    return size


class Batches:
    """Seeded image-caption batches: batch ``step`` is the same whenever it is drawn (so a resumed
    run sees the data an uninterrupted one would)."""

    def __init__(self, recipe: Recipe, *, batch_size: int, resolution: int, seed: int):
        self.recipe, self.batch_size, self.resolution, self.seed = recipe, batch_size, resolution, seed
        self.world = _world(recipe) if recipe.data.kind == "zoo" else None
        self.samples = None if self.world else _file_samples(recipe)

    def __call__(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """Images in [-1, 1] (N,3,H,W) and their captions."""
        rng = np.random.default_rng([self.seed, 7, step])
        if self.world:
            world, exclude = self.world
            images, captions, _ = world.sample_batch(self.batch_size, rng, exclude=exclude)
            return torch.from_numpy(images), captions
        picks = rng.integers(0, len(self.samples), size=self.batch_size)
        images = np.stack([_load_image(self.samples[i][0], self.resolution) for i in picks])
        return torch.from_numpy(images), [self.samples[i][1] for i in picks]


def _spread(items: list, count: int) -> list:
    """``count`` items evenly spaced through ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] if count > 1 else items[0] for i in range(count)]


WANTED_CAPTIONS = 32
"""Wanted prompts drawn from a caption folder when ``bench.wanted_prompts`` is not set."""


def wanted_prompts(recipe: Recipe) -> list[str]:
    """The bench's quality prompts, from the captions the model is meant to serve (those naming an unwanted
    concept left out): ``bench.wanted_prompts`` of a zoo world's prompts covering its caption distribution (all
    of them by default), or of the data's distinct captions (:data:`WANTED_CAPTIONS` by default), evenly spread."""
    count = recipe.bench.wanted_prompts
    if recipe.data.kind == "zoo":
        world = load_world(recipe.data.name or "")
        prompts = world.coverage_prompts(exclude=world.values_named(_concept_words(recipe)))
        return prompts if count is None else _spread(prompts, count)
    words = _concept_words(recipe)
    captions = sorted({t for _, t in _file_samples(recipe) if not any(w in t.lower() for w in words)})
    return _spread(captions, count or WANTED_CAPTIONS)


def reference_images(recipe: Recipe, count: int, *, resolution: int, seed: int) -> torch.Tensor:
    """``count`` real images of the data (N,3,H,W in [0, 1]), for Frechet distances against real images."""
    if recipe.data.kind == "zoo":
        world = load_world(recipe.data.name or "")
        images, _, _ = world.sample_batch(count, np.random.default_rng([seed, 99]),
                                          exclude=world.values_named(_concept_words(recipe)))
        return torch.from_numpy(images) / 2 + 0.5
    samples = _spread(_file_samples(recipe), count)
    return torch.from_numpy(np.stack([_load_image(p, resolution) for p, _ in samples])) / 2 + 0.5
