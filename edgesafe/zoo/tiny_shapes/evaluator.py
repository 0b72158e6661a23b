"""The world's evaluator: a small CNN that names the object, colour and style of an image.

Its heads give prompt accuracy and the unwanted-concept rate; its penultimate features give a
Frechet distance (the FID of this world). Saved like any diffusers model (config + safetensors).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from . import world


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
        heads = heads or world.HEADS
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


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise and blur of random strength, so the evaluator also reads imperfect generations."""
    n = images.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * 0.15
    noisy = images + sigma * torch.randn(images.shape, generator=generator)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = nn.functional.conv2d(nn.functional.pad(noisy, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    use_blur = (torch.rand(n, 1, 1, 1, generator=generator) < 0.4).float()
    return (use_blur * blurred + (1 - use_blur) * noisy).clamp(-1, 1)
