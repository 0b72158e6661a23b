"""Where the upper level's noisy latents come from, by the recipe's ``finetune.upper_latents``
(registry ``UPPER_LATENTS``). Every source gives, for one concept at one step, ``n`` noisy latents, their
timesteps and the concept prompts they are scored under, drawn from generators seeded by (seed, step,
concept), so a resumed run sees what an uninterrupted one would:

- ``lower-batch``: the step's lower batch (concept-free data), forward-noised as for L_ft;
- ``concept-images``: latents of the concept's prompts generated once by the teacher (cached in the
  fine-tune folder), forward-noised at a random timestep each step, as the paper's released code does;
- ``model-samples``: ESD's own: x_t sampled by the model being erased, from noise under a concept prompt
  to a random step of the sampler (``sampling.steps`` DDIM steps at ``sampling.guidance_scale``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from torch import nn

from ..errors import CheckpointError
from ..io import load_metadata, load_tensors, save_tensors
from ..recipe import Concept, Recipe
from .losses import DenoisingTask

CONCEPT_IMAGES = 64
"""Images the teacher generates per concept for ``concept-images`` (its prompts taken in turn)."""
CACHE = "concept-latents.safetensors"


@dataclass
class UpperBatch:
    sample: torch.Tensor
    timestep: torch.Tensor
    prompts: list[str]


LowerInputs = Callable[[], dict[str, torch.Tensor]]


def _rng(recipe: Recipe, step: int, index: int) -> np.random.Generator:
    return np.random.default_rng([recipe.seed, 13, step, index])


def _generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


class Source:
    """The upper batches of one run."""

    def __init__(self, recipe: Recipe, task: DenoisingTask, student: nn.Module, folder: Path, latent_size: int):
        self.recipe, self.task, self.student, self.folder, self.latent_size = recipe, task, student, folder, latent_size

    def __call__(self, concept: Concept, index: int, step: int, n: int, lower: LowerInputs) -> UpperBatch:
        rng = _rng(self.recipe, step, index)
        prompts = [concept.prompts[i] for i in rng.integers(0, len(concept.prompts), size=n)]
        return self.draw(concept, rng, prompts, lower)

    def draw(self, concept: Concept, rng: np.random.Generator, prompts: list[str], lower: LowerInputs) -> UpperBatch:
        raise NotImplementedError


class LowerBatch(Source):
    def draw(self, concept, rng, prompts, lower):
        inputs = lower()
        return UpperBatch(inputs["sample"][: len(prompts)], inputs["timestep"][: len(prompts)], prompts)


class ConceptImages(Source):
    def __init__(self, *args):
        super().__init__(*args)
        self.latents = self._cached()

    def _key(self) -> str:
        b = self.recipe.sampling
        return json.dumps({c.name: c.prompts for c in self.recipe.concepts} | {
            "steps": b.steps, "guidance_scale": b.guidance_scale, "size": self.latent_size, "seed": self.recipe.seed})

    @torch.no_grad()
    def _cached(self) -> dict[str, tuple[torch.Tensor, list[int]]]:
        path = self.folder / CACHE
        if path.is_file():
            try:
                fresh = load_metadata(path).get("key") == self._key()
            except CheckpointError:
                fresh = False
            if fresh:
                tensors = load_tensors(path)
                return {c.name: (tensors[f"{c.name}.latents"], tensors[f"{c.name}.prompts"].tolist())
                        for c in self.recipe.concepts}
        pipe: StableDiffusionPipeline = self.task.pipe
        pipe.set_progress_bar_config(disable=True)
        b, result, tensors = self.recipe.sampling, {}, {}
        for index, concept in enumerate(self.recipe.concepts):
            which = [i % len(concept.prompts) for i in range(CONCEPT_IMAGES)]
            gen = _generator(np.random.default_rng([self.recipe.seed, 19, index]))
            chunks = []
            for start in range(0, CONCEPT_IMAGES, 16):
                prompts = [concept.prompts[i] for i in which[start:start + 16]]
                noise = torch.randn(len(prompts), pipe.unet.config.in_channels, self.latent_size, self.latent_size,
                                    generator=gen)
                out = pipe(prompts, latents=noise.to(pipe.unet.device, pipe.unet.dtype), num_inference_steps=b.steps,
                           guidance_scale=b.guidance_scale, output_type="latent").images
                chunks.append(out.float())
            result[concept.name] = (torch.cat(chunks), which)
            tensors[f"{concept.name}.latents"] = result[concept.name][0].cpu()
            tensors[f"{concept.name}.prompts"] = torch.tensor(which)
        save_tensors(path, tensors, metadata={"key": self._key()})
        return result

    def draw(self, concept, rng, prompts, lower):
        latents, which = self.latents[concept.name]
        picks = rng.integers(0, len(latents), size=len(prompts))
        gen = _generator(rng)
        x0 = latents[torch.as_tensor(picks)].to(next(self.student.parameters()).device)  # the cache is on the CPU
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.randint(0, self.task.scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
        return UpperBatch(self.task.scheduler.add_noise(x0, noise, t), t,
                          [concept.prompts[which[i]] for i in picks])


class ModelSamples(Source):
    @torch.no_grad()
    def draw(self, concept, rng, prompts, lower):
        b, unet = self.recipe.sampling, self.student
        scheduler = DDIMScheduler.from_config(self.task.scheduler.config)
        scheduler.set_timesteps(b.steps)
        stop = int(rng.integers(0, b.steps))  # denoising steps taken before the upper step's x_t
        gen = _generator(rng)
        param = next(unet.parameters())
        latents = torch.randn(len(prompts), unet.config.in_channels, self.latent_size, self.latent_size,
                              generator=gen).to(param.device) * scheduler.init_noise_sigma
        states = torch.cat([self.task.encode_text([""] * len(prompts)), self.task.encode_text(prompts)]).float()
        for t in scheduler.timesteps[:stop]:
            uncond, cond = unet(torch.cat([latents] * 2), t, states).sample.chunk(2)
            latents = scheduler.step(uncond + b.guidance_scale * (cond - uncond), t, latents).prev_sample
        t = scheduler.timesteps[stop].to(param.device).repeat(len(prompts))
        return UpperBatch(latents, t, prompts)


UPPER_LATENTS: dict[str, type[Source]] = {
    "lower-batch": LowerBatch,
    "concept-images": ConceptImages,
    "model-samples": ModelSamples,
}
