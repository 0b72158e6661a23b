"""One subject in its own process: ``python -m edgesafe.bench.worker JOB.json``.

The job names a subject, and asks for timings (one round) and/or images (prompt x seed pairs per group).
The worker loads the subject, times it, reads its own peak resident memory before generating anything,
then generates, and writes the result JSON (and the images, as uint8 safetensors) the job names. A user
error is one line on stderr and exit code 2, like the CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgesafeError
from ..io import save_tensors, write_json
from ..models.inputs import seeded_normal
from ..models.stats import peak_rss_gib
from .subjects import SUBJECT_KINDS, Subject


def seeded_latents(shape: list[int], seeds: list[int]) -> np.ndarray:
    """One latent per seed, each from its own generator (a figure does not depend on batching)."""
    return torch.stack([seeded_normal(shape, s) for s in seeds]).numpy()


def run_job(job: dict) -> None:
    subject = Subject(**job["subject"])
    runner = SUBJECT_KINDS[subject.kind].runner(subject)
    result: dict = {"subject": subject.name, "load_seconds": round(runner.load_seconds, 4)}
    if getattr(runner, "coverage", None):
        result["weights_from_package"] = runner.coverage
    timing = job.get("time")
    if timing and runner.timed:
        latents = seeded_latents(job["latent_shape"], [timing["seed"]])
        result["timings_ms"] = runner.time_components(timing["prompt"], latents, steps=timing["steps"],
                                                      guidance=timing["guidance"], repeats=timing["repeats"])
        result["peak_rss_gib"] = peak_rss_gib()
    gen = job.get("generate")
    if gen:
        images = {}
        for group, pairs in gen["groups"].items():
            chunks = []
            for start in range(0, len(pairs), gen["batch"]):
                chunk = pairs[start:start + gen["batch"]]
                latents = seeded_latents(job["latent_shape"], [s for _, s in chunk])
                out = runner.generate([p for p, _ in chunk], latents, steps=gen["steps"], guidance=gen["guidance"])
                chunks.append((out.clamp(0, 1) * 255).round().to(torch.uint8))
            images[group] = torch.cat(chunks)
        save_tensors(Path(gen["out"]), images)
    write_json(Path(job["result"]), result)


def main(argv: list[str]) -> int:
    try:
        run_job(json.loads(Path(argv[0]).read_text()))
    except EdgesafeError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
