"""Measure the shipped tiny-shapes teacher and its evaluator; write benchmarks/results/teacher.json.

    python benchmarks/teacher.py [--seeds 8] [--out benchmarks/results/teacher.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from harness import provenance

from edgesafe.io import write_json
from edgesafe.measure.images import frechet_distance
from edgesafe.models.loading import load_evaluator, load_pipeline, resolve_source
from edgesafe.models.stats import count_macs, count_params
from edgesafe.zoo.tiny_shapes import world
from edgesafe.zoo.tiny_shapes.evaluator import NONE, augment
from edgesafe.zoo.tiny_shapes.metrics import evaluate_pipeline, real_images

HELD_OUT_SEED = 12345  # never used by the builder's (seed, phase, step) streams


def evaluator_readings(evaluator, images: torch.Tensor, labels: np.ndarray) -> tuple[dict, dict]:
    """Per-head accuracy on labelled ``images``, and the share of each unwanted concept's images read
    as that concept."""
    names, _ = evaluator.classify(images)
    truth = {head: [world.HEADS[head][i] for i in labels[:, k]] for k, head in enumerate(world.HEADS)}
    pairs = {head: list(zip(names[head], truth[head], strict=True)) for head in world.HEADS}
    accuracy = {head: float(np.mean([a == b for a, b in pairs[head]])) for head in world.HEADS}
    recall = {name: float(np.mean([a == c.value for a, b in pairs[c.head] if b == c.value]))
              for name, c in world.UNWANTED.items()}
    return accuracy, recall


def none_shares(evaluator, n: int, rng: np.random.Generator) -> dict[str, float]:
    """The share of images with no object (backgrounds alone, shapeless blobs) read as object ``none``, and of
    images with no pattern (objects on blotches) read as style ``none``."""
    def read(images: list[np.ndarray]) -> dict[str, list[str]]:
        return evaluator.classify(torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2) * 2 - 1))[0]

    colours, styles, objects = [None, *world.HEADS["colour"]], world.HEADS["style"], world.HEADS["object"]
    blobs = read([world.render_unclear(None, colours[rng.integers(len(colours))], str(rng.choice(styles)), rng)
                  for _ in range(n)])
    smears = read([world.render_unclear(str(rng.choice(objects)), str(rng.choice(colours[1:])), None, rng)
                   for _ in range(n)])
    return {"no_object_read_as_none": float(np.mean([v == NONE for v in blobs["object"]])),
            "no_pattern_read_as_none": float(np.mean([v == NONE for v in smears["style"]]))}


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """``images`` encoded and decoded by ``vae``: the most a generation decoded by it can score."""
    return torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample.clamp(-1, 1) for c in images.split(256)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="noise seeds shared by all prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--real", type=int, default=2000, help="held-out real images for accuracy and FID")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "teacher.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pipe = load_pipeline("zoo:tiny-shapes")
    evaluator = load_evaluator("zoo:tiny-shapes-evaluator")
    images, _, labels = world.sample_batch(args.real, np.random.default_rng([HELD_OUT_SEED, 1]))
    images = torch.from_numpy(images)
    accuracy, _ = evaluator_readings(evaluator, images, labels)
    decoded_accuracy, decoded_recall = evaluator_readings(evaluator, vae_round_trip(pipe.vae, images), labels)
    augmented_accuracy, _ = evaluator_readings(
        evaluator, augment(images, torch.Generator().manual_seed(HELD_OUT_SEED)), labels)
    nones = none_shares(evaluator, args.real // 4, np.random.default_rng([HELD_OUT_SEED, 2]))
    _, real_features = evaluator.classify(real_images(args.real, seed=HELD_OUT_SEED))
    figures = evaluate_pipeline(pipe, evaluator, seeds=list(range(args.seeds)), steps=args.steps,
                                guidance_scale=args.guidance_scale, references={"real": real_features})
    # the noise floor of the FID: two disjoint sets of real images
    _, other_real = evaluator.classify(real_images(args.real, seed=HELD_OUT_SEED + 1))

    build = json.loads((resolve_source("zoo:tiny-shapes") / "build.json").read_text())
    result = {
        "evaluator_accuracy_min": min(accuracy.values()),
        "prompt_accuracy": figures["prompt_accuracy"],
        "concept_rate_direct_min": figures["concept_rate_direct_min"],
        "concept_rate_paraphrase_min": figures["concept_rate_paraphrase_min"],
        "fid_vs_real": figures["fid_vs_real"],
        "unet_params": count_params(pipe.unet),
        "unet_macs": count_macs(pipe.unet, batch=1, text_length=pipe.tokenizer.model_max_length),
        "build_seconds": build["build_seconds"],
        "provenance": provenance(),
        "detail": {
            "evaluator_accuracy": accuracy,
            "vae_decoded_real": {"evaluator_accuracy": decoded_accuracy, "concept_recall": decoded_recall},
            "augmented_real": {"evaluator_accuracy": augmented_accuracy},
            **nones,
            "evaluator_build": json.loads((resolve_source("zoo:tiny-shapes-evaluator") / "build.json").read_text()),
            "concepts": figures["concepts"],
            "generations": figures["generations"],
            "fid_real_vs_real": frechet_distance(real_features, other_real),
            "seeds": args.seeds, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "real_images": args.real,
            "build": build,
            "benchmark_seconds": round(time.perf_counter() - t0, 1),
        },
    }
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "detail"}, indent=2))


if __name__ == "__main__":
    main()
