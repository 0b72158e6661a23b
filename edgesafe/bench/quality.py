"""Quality of a subject's images of the wanted prompts, by the scorers a recipe makes available:

- ``fidelity`` (always): PSNR and SSIM of each image against the teacher's at the same prompt and seed;
- ``tiny-shapes`` (``model.evaluator`` set): prompt accuracy (every attribute a prompt names is seen)
  and the world's FID (evaluator features) against real images and against the teacher's;
- ``clip`` (``bench.clip_model`` set): CLIP score, and FID on CLIP image features against real images
  and against the teacher's.

A scorer the recipe cannot run gives ``{"unavailable": why}``; no figure is ever made up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..measure.images import frechet_distance


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR per image pair in [0, 1] (capped at 100 dB for identical images)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp(min=1e-10))).float()


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image pair in [0, 1] (Wang et al. 2004: Gaussian window, per channel, averaged); the
    window shrinks to the image for images smaller than it."""
    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    kernel = g.expand(a.shape[1], 1, window, window).to(torch.float64)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=a.shape[1])

    a, b = a.double(), b.double()
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1).float()


def _mean(x: torch.Tensor) -> float:
    return round(float(x.mean()), 4)


class Fidelity:
    """Closeness to the teacher's images at the same seeds (the figure real models always have)."""

    def __init__(self, recipe, teacher: torch.Tensor, real: Callable[[], torch.Tensor]):
        self.teacher = teacher

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict:
        return {"psnr_db_vs_teacher": _mean(psnr_db(images, self.teacher)),
                "ssim_vs_teacher": _mean(ssim(images, self.teacher))}


class ShapesQuality:
    """The tiny-shapes world's evaluator: prompt accuracy and FID of its features."""

    def __init__(self, recipe, teacher: torch.Tensor, real: Callable[[], torch.Tensor]):
        from ..models.loading import load_evaluator

        self.evaluator = load_evaluator(recipe.model.evaluator)
        self.references = {"real": self._features(real()), "teacher": self._features(teacher)}

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.classify(images * 2 - 1)[1]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict:
        from ..zoo.tiny_shapes import world

        names, features = self.evaluator.classify(images * 2 - 1)
        asked = [world.parse_prompt(p) for p in prompts]
        hits = [all(getattr(a, head) in (None, names[head][i]) for head in world.HEADS) for i, a in enumerate(asked)]
        return {"prompt_accuracy": round(sum(hits) / len(hits), 4),
                **{f"fid_vs_{name}": round(frechet_distance(features, ref), 4)
                   for name, ref in self.references.items()}}


class ClipQuality:
    """A local CLIP: CLIP score against the prompts, FID of CLIP image features."""

    def __init__(self, recipe, teacher: torch.Tensor, real: Callable[[], torch.Tensor]):
        from .clip import LocalClip

        self.clip = LocalClip(recipe.bench.clip_model)
        self.references = {"real": self.clip.images(real()), "teacher": self.clip.images(teacher)}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict:
        features = self.clip.images(images)
        return {"clip_score": _mean(self.clip.score(images, prompts)),
                **{f"clip_fid_vs_{name}": round(frechet_distance(features, ref), 4)
                   for name, ref in self.references.items()}}


@dataclass(frozen=True)
class Scorer:
    """A registered quality scorer: ``build`` makes a callable from (images, prompts) to figures."""

    build: Callable[..., Callable[[torch.Tensor, list[str]], dict]]
    unavailable: Callable[..., str | None]
    """(recipe) -> why the scorer cannot run for this recipe, or None."""


SCORERS: dict[str, Scorer] = {
    "fidelity": Scorer(Fidelity, lambda recipe: None),
    "tiny-shapes": Scorer(ShapesQuality, lambda recipe: None if recipe.model.evaluator else
                          "the model names no zoo evaluator (model.evaluator); it exists for the tiny-shapes world"),
    "clip": Scorer(ClipQuality, lambda recipe: None if recipe.bench.clip_model else
                   "no local CLIP weights (bench.clip_model); edgesafe downloads nothing"),
}
