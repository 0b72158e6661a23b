"""The world's evaluator: a small CNN that names the object, colour and style of an image.

Its heads give prompt accuracy and the unwanted-concept rate; its penultimate features give a
Frechet distance (the FID of this world). Saved like any diffusers model (config + safetensors).

It reads generations, not only the world's clean renders: it trains on objects bent by a smooth random
displacement, tinted or recoloured, noisy and blurred; and its object and style heads have a further value,
``none``, learnt from backgrounds alone, shapeless blobs and patternless blotches, so that a broken student's
blob or smear is not read as the nearest object or style (an argmax over the world's values alone called
half-drawn crosses and blobs "star").
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from . import world

NONE = "none"
HEADS = {"object": [*world.HEADS["object"], NONE], "colour": world.HEADS["colour"],
         "style": [*world.HEADS["style"], NONE]}
"""The evaluator's heads: the world's, with ``none`` (no clear object, no clear background) among the objects
and the styles."""


class ShapesEvaluator(ModelMixin, ConfigMixin):
    """Images in [-1, 1] (N,3,32,32) -> logits per head and a feature vector."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        feature_dim: int = 128,
        heads: dict[str, list[str]] | None = None,
    ):
        super().__init__()
        heads = heads or HEADS
        self.register_to_config(heads=heads)
        layers: list[nn.Module] = []
        c_in = 3
        for width in widths:
            layers += [
                nn.Conv2d(c_in, width, 3, padding=1),
                nn.GroupNorm(8, width),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.GroupNorm(8, width),
                nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            c_in = width
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features = nn.Sequential(nn.Linear(c_in, feature_dim), nn.SiLU())
        self.classifiers = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in heads.items()})

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        feats = self.features(self.trunk(images))
        return {name: head(feats) for name, head in self.classifiers.items()}, feats

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch_size: int = 256) -> tuple[dict[str, list[str]], torch.Tensor]:
        """Predicted value names per head, and the features, for images in [-1, 1]."""
        names: dict[str, list[str]] = {h: [] for h in self.classifiers}
        feats = []
        for chunk in images.split(batch_size):
            logits, f = self(chunk.to(self.device, self.dtype))
            feats.append(f.float().cpu())
            for head, values in self.config.heads.items():
                names[head] += [values[i] for i in logits[head].argmax(-1).tolist()]
        return names, torch.cat(feats) if feats else torch.empty(0, self.config.feature_dim)


def training_batch(n: int, rng: np.random.Generator, generator: torch.Generator, *, unclear: float = 0.15,
                   recolour: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` augmented images (N,3,H,W in [-1, 1]) and their (N,3) labels per :data:`HEADS` head: the world's
    images; a share ``unclear`` of them with no clear object, no clear background or neither
    (:func:`world.render_unclear`; ``none``, and no colour label (-100, ignored) where nothing is drawn); a share
    ``recolour`` of all of them with their colours scrambled (:func:`recoloured`; colour label ignored), so that
    object and style are read by shape and pattern whatever a generator does to the colours."""
    images, _, labels = world.sample_batch(n, rng)
    labels = labels.copy()
    for i in np.flatnonzero(rng.random(n) < unclear):
        kind = rng.random()  # no clear object (60%), no clear background (25%), neither (15%)
        obj = str(rng.choice(world.HEADS["object"])) if 0.6 <= kind < 0.85 else None
        colour = None if obj is None and rng.random() < 0.25 else str(rng.choice(world.HEADS["colour"]))
        style = str(rng.choice(world.HEADS["style"])) if kind < 0.6 else None
        images[i] = world.render_unclear(obj, colour, style, rng).transpose(2, 0, 1) * 2 - 1
        labels[i] = (HEADS["object"].index(obj or NONE), -100 if colour is None else HEADS["colour"].index(colour),
                     HEADS["style"].index(style or NONE))
    for i in np.flatnonzero(rng.random(n) < recolour):
        images[i] = recoloured(images[i], rng)
        labels[i, 1] = -100
    return augment(torch.from_numpy(images), generator), torch.from_numpy(labels)


def recoloured(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (3,H,W in [-1, 1]) with its channels shuffled, its saturation cut to 20-100% and a gain and offset
    per channel: pale, grey or wrongly coloured objects on coloured backgrounds."""
    x = (image[rng.permutation(3)] + 1) / 2
    grey = x.mean(axis=0, keepdims=True)
    x = grey + rng.uniform(0.2, 1.0) * (x - grey)
    x = x * rng.uniform(0.5, 1.3, size=(3, 1, 1)) + rng.uniform(-0.15, 0.15, size=(3, 1, 1))
    return (np.clip(x, 0, 1) * 2 - 1).astype(np.float32)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What separates a generation from a render, at random strengths: half the images bent by a smooth random
    displacement (about 1.2 px at most, varying over a 4x4 grid: wobbly edges, bent arms), half tinted (a gain and
    offset per channel), then noise and, 40% of the time, blur."""
    n, _, h, w = images.shape
    bend = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5) * torch.rand(n, 1, 1, 1, generator=generator)
    shift = nn.functional.interpolate(torch.randn(n, 2, 4, 4, generator=generator), size=(h, w), mode="bicubic",
                                      align_corners=True)
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")[::-1], -1)
    grid = grid + (shift * bend * 1.2 * 2 / h).permute(0, 2, 3, 1)
    images = nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
    tint = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float()
    gain = 1 + tint * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.3
    offset = tint * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.3
    images = (images + 1) * gain - 1 + offset
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * 0.15
    noisy = images + sigma * torch.randn(images.shape, generator=generator)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = nn.functional.conv2d(nn.functional.pad(noisy, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    use_blur = (torch.rand(n, 1, 1, 1, generator=generator) < 0.4).float()
    return (use_blur * blurred + (1 - use_blur) * noisy).clamp(-1, 1)
