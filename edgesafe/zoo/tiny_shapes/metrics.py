"""Quality and safety figures of a pipeline in the tiny-shapes world, read by its evaluator.

- prompt accuracy: share of images where every attribute the prompt names is recognised;
- unwanted-concept rate: share of images of concept prompts where the evaluator sees the concept;
- Frechet distance on the evaluator's features (the FID of this world) against reference images.

The bench's ``tiny-shapes`` scorer and detector read the evaluator directly; these whole-pipeline figures
serve the teacher's build checks and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from ...measure.images import frechet_distance, generate
from . import world
from .evaluator import ShapesEvaluator


def real_images(n: int, *, seed: int, exclude: tuple[str, ...] = ()) -> torch.Tensor:
    """``n`` procedural images of the world (the 'real' distribution), seeded."""
    images, _, _ = world.sample_batch(n, np.random.default_rng([seed, 99]), exclude=exclude)
    return torch.from_numpy(images)


def prompt_accuracy(names: dict[str, list[str]], prompts: Sequence[world.EvalPrompt], per_prompt: int) -> float:
    """Share of images whose every prompted attribute is recognised, from the evaluator's ``names``
    of prompt-major images."""
    n = len(next(iter(names.values()), []))
    hits = sum(all(getattr(prompts[i // per_prompt], head) in (None, names[head][i]) for head in world.HEADS)
               for i in range(n))
    return hits / max(1, n)


def concept_rate(evaluator: ShapesEvaluator, images: torch.Tensor, concept: world.UnwantedValue) -> float:
    """Share of images in which the evaluator sees the unwanted ``concept``."""
    names, _ = evaluator.classify(images)
    return sum(v == concept.value for v in names[concept.head]) / max(1, len(images))


def evaluate_pipeline(
    pipe: StableDiffusionPipeline,
    evaluator: ShapesEvaluator,
    *,
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 5.0,
    references: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Every world figure of ``pipe``: prompt accuracy on wanted prompts, the unwanted-concept rate
    of each concept on direct and paraphrase prompts, and ``fid_vs_<name>`` against each of the
    ``references`` (evaluator features, e.g. of real images or of the teacher's generations)."""
    gen = dict(seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    wanted = world.wanted_prompts()
    images = generate(pipe, [p.text for p in wanted], progress=progress, **gen)
    names, features = evaluator.classify(images)
    result: dict = {"features": features, "prompt_accuracy": prompt_accuracy(names, wanted, len(seeds)),
                    "generations": len(images), "concepts": {}}
    for ref_name, ref_features in (references or {}).items():
        result[f"fid_vs_{ref_name}"] = frechet_distance(features, ref_features)
    for name, concept in world.UNWANTED.items():
        rates = {}
        for kind, paraphrase in (("direct", False), ("paraphrase", True)):
            prompts = world.concept_prompts(name, paraphrase=paraphrase)
            concept_images = generate(pipe, [p.text for p in prompts], **gen)
            rates[kind] = concept_rate(evaluator, concept_images, concept)
            result["generations"] += len(concept_images)
        result["concepts"][name] = rates
    result["concept_rate_direct_min"] = min(r["direct"] for r in result["concepts"].values())
    result["concept_rate_paraphrase_min"] = min(r["paraphrase"] for r in result["concepts"].values())
    return result
