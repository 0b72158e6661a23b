"""Measure structured pruning; write benchmarks/results/prune.json.

For each model (the tiny-shapes teacher, and the SD 1.5 UNet architecture with random weights,
since no weights can be downloaded here): params and MACs before and after 25/50/75% channel
pruning, and onnxruntime CPU latency against the MACs ratio, side by side in one run; BK-SDM
block-removal sizes on SD 1.5; time and peak memory of pruning SD 1.5; and the largest miss of
params/MACs budget targets.

    python benchmarks/prune.py [--skip-sd15-latency] [--out benchmarks/results/prune.json]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from edgesafe.bench.latency import measure_unet_ms
from edgesafe.io import write_json
from edgesafe.models.architectures import TEXT_LENGTH, UNET_CONFIGS, build_unet
from edgesafe.models.loading import load_pipeline
from edgesafe.models.stats import count_macs, count_params, unet_example_inputs
from edgesafe.prune import prune_to_budget, prune_width
from edgesafe.prune.blocks import bk_sdm_param_count
from edgesafe.recipe import Budget

RATIOS = (0.25, 0.5, 0.75)


def sweep(name: str, unet, *, text_length: int, latency_batch: int, repeats: int, latency: bool) -> dict:
    inputs = unet_example_inputs(unet, batch=1, text_length=text_length)
    p0, m0 = count_params(unet), count_macs(unet, batch=latency_batch, text_length=text_length)
    timing = dict(batch=latency_batch, text_length=text_length, repeats=repeats, warmup=min(3, repeats))
    ms0 = measure_unet_ms(unet, **timing) if latency else None
    rows = []
    for ratio in RATIOS:
        student = prune_width(unet, ratio, inputs)
        row = {"channel_ratio": ratio, "params_ratio": count_params(student) / p0,
               "macs_ratio": count_macs(student, batch=latency_batch, text_length=text_length) / m0}
        if latency:
            ms = measure_unet_ms(student, **timing)
            row |= {"ms": ms, "latency_ratio": ms / ms0,
                    "latency_efficiency": (1 - ms / ms0) / (1 - row["macs_ratio"])}
        rows.append(row)
        print(name, row, flush=True)
    return {"params": p0, "macs": m0, "ms": ms0, "latency_batch": latency_batch, "ratios": rows}


def budget_errors(unet, text_length: int) -> list[dict]:
    inputs = unet_example_inputs(unet, batch=1, text_length=text_length)
    out = []
    for metric, ratio, measure in (("params", 0.5, count_params),
                                   ("macs", 0.26, lambda u: float(count_macs(u, batch=2, text_length=text_length)))):
        result = prune_to_budget(unet, Budget(metric=metric, ratio=ratio), measure, inputs)
        out.append({"metric": metric, "ratio": ratio, "relative_error": result.relative_error,
                    "channel_ratio": result.ratio, "trials": len(result.trials)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-sd15-latency", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prune.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline("zoo:tiny-shapes")
    tiny_len = pipe.tokenizer.model_max_length
    models = {"tiny-shapes": sweep("tiny-shapes", pipe.unet, text_length=tiny_len, latency_batch=64, repeats=20,
                                   latency=True)}
    errors = budget_errors(pipe.unet, tiny_len)

    t0, rss0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sd15 = build_unet("sd-1.5").eval()
    sd15_inputs = unet_example_inputs(sd15, batch=1, text_length=TEXT_LENGTH["sd-1.5"])
    t1 = time.perf_counter()
    half = prune_width(sd15, 0.5, sd15_inputs)
    prune_seconds = time.perf_counter() - t1
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del half
    models["sd-1.5"] = sweep("sd-1.5", sd15, text_length=TEXT_LENGTH["sd-1.5"], latency_batch=2, repeats=2,
                             latency=not args.skip_sd15_latency)
    efficiencies = [r["latency_efficiency"] for m in models.values() for r in m["ratios"] if "latency_efficiency" in r]
    result = {
        "latency_efficiency": min(efficiencies),
        "bk_sdm_unet_params": {v: bk_sdm_param_count(UNET_CONFIGS["sd-1.5"], v) for v in ("base", "small", "tiny")},
        "sd15_prune_seconds": prune_seconds,
        "sd15_peak_rss_gib": peak_gib,
        "budget_error_max": max(abs(e["relative_error"]) for e in errors),
        "detail": {"models": models, "budget_errors": errors, "rss_before_gib": rss0 / 2**20,
                   "sd15_build_and_prune_seconds": time.perf_counter() - t0,
                   "sd15_latency_measured": not args.skip_sd15_latency},
    }
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k != "detail"})


if __name__ == "__main__":
    main()
