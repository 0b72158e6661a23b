"""Measure the shipped tiny-shapes teacher and its evaluator; write benchmarks/results/teacher.json.

    python benchmarks/teacher.py [--seeds 2] [--out benchmarks/results/teacher.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgesafe.bench.world_metrics import evaluate_pipeline, frechet_distance, real_images
from edgesafe.io import write_json
from edgesafe.models.loading import load_evaluator, load_pipeline, resolve_source
from edgesafe.models.stats import count_macs, count_params
from edgesafe.zoo.tiny_shapes import world

HELD_OUT_SEED = 12345  # never used by the builder's (seed, phase, step) streams


def evaluator_accuracy(evaluator, n: int) -> dict[str, float]:
    images, _, labels = world.sample_batch(n, np.random.default_rng([HELD_OUT_SEED, 1]))
    names, _ = evaluator.classify(torch.from_numpy(images))
    return {head: float(np.mean([names[head][i] == world.HEADS[head][labels[i, k]] for i in range(n)]))
            for k, head in enumerate(world.HEADS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--real", type=int, default=2000, help="held-out real images for accuracy and FID")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "teacher.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pipe = load_pipeline("zoo:tiny-shapes")
    evaluator = load_evaluator("zoo:tiny-shapes-evaluator")
    accuracy = evaluator_accuracy(evaluator, args.real)
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
        "detail": {
            "evaluator_accuracy": accuracy,
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
