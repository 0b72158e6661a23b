"""Images of a pipeline at fixed seeds, and the Frechet distance between two sets of image features."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from scipy import linalg

from ..models.inputs import seeded_normal


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] (N,3,H,W) for every prompt x seed, prompt-major; each image's noise comes
    from its own seed, so a figure does not depend on the batch size."""
    jobs = [(p, s) for p in prompts for s in seeds]
    unet = pipe.unet
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        latents = torch.stack([seeded_normal(shape, s) for _, s in chunk])
        images = pipe(
            [p for p, _ in chunk], latents=latents.to(unet.device, unet.dtype), num_inference_steps=steps,
            guidance_scale=guidance_scale, output_type="pt",
        ).images
        out.append(images.float().cpu() * 2 - 1)
        if progress:
            progress(min(start + batch_size, len(jobs)), len(jobs))
    return torch.cat(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N,D)."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    cov_a, cov_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
