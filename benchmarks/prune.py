"""Measure structured pruning; write benchmarks/results/prune.json.

- Latency against MACs: for the tiny-shapes teacher and the SD 1.5 UNet architecture with random
  weights (no weights can be downloaded here), params and MACs before and after 25/50/75% channel
  pruning and onnxruntime CPU latency, side by side in one run (direct ``prune_width`` calls: this
  part is about what a pruned shape costs, not about the stage).
- The stage as users run it: ``edgesafe prune`` with every shipped real-model recipe (Taylor
  importance, budget search) on random-weight SD 1.5 and SD 2.1-base folders, each in its own
  process: wall time and peak resident memory. The recipes run as shipped but for the stand-in
  model and images, ``data.resolution=256`` and ``finetune.batch_size=1`` (which sets the Taylor
  calibration to 4 samples); at the shipped 512 px and 64 samples, calibration is compute-bound
  (tens of minutes on 2 cores).
- BK-SDM block-removal sizes on SD 1.5 and the largest miss of params/MACs budget targets.

    python benchmarks/prune.py [--skip-sd15-latency] [--skip-cli] [--work DIR] [--out benchmarks/results/prune.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch
from harness import provenance, real_recipes, run_cli, small_run, stand_in

from edgesafe.io import write_json
from edgesafe.measure.latency import measure_unet_ms
from edgesafe.models.architectures import TEXT_LENGTH, UNET_CONFIGS, build_unet
from edgesafe.models.inputs import unet_example_inputs
from edgesafe.models.loading import load_pipeline
from edgesafe.models.stats import count_macs, count_params
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
        student = prune_width(unet, ratio, inputs).unet
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
    out = []
    for metric, ratio, measure in (("params", 0.5, count_params),
                                   ("macs", 0.29, lambda u: float(count_macs(u, batch=2, text_length=text_length)))):
        result = prune_to_budget(copy.deepcopy(unet), Budget(metric=metric, ratio=ratio), measure)
        out.append({"metric": metric, "ratio": ratio, "relative_error": result.relative_error,
                    "channel_ratio": result.ratio, "trials": len(result.trials)})
    return out


def cli_prune(work: Path) -> list[dict]:
    """``edgesafe prune`` with each shipped real-model recipe on each stand-in architecture."""
    rows = []
    for arch in ("sd-1.5", "sd-2.1-base"):
        model, images = stand_in(work, arch)
        for recipe in real_recipes():
            run = work / "prune-runs" / arch / recipe.stem
            shutil.rmtree(run, ignore_errors=True)
            done = run_cli("prune", "--recipe", str(recipe), "--model", str(model), "--out", str(run),
                           *small_run(images), log=run.parent / f"{recipe.stem}.log")
            row = {"arch": arch, "recipe": recipe.stem, "seconds": done.seconds, "peak_rss_gib": done.peak_rss_gib,
                   "returncode": done.returncode}
            if done.returncode == 0:
                figures = json.loads((run / "1-prune" / "stage.json").read_text())["figures"]
                row |= {k: figures[k] for k in ("budget_metric", "budget_relative_error", "channel_ratio",
                                                "unet_params", "ms_per_step")}
            else:
                row["error"] = done.output_tail.strip().splitlines()[-1]
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-sd15-latency", action="store_true")
    parser.add_argument("--skip-cli", action="store_true", help="skip the CLI prune runs on SD-size stand-ins")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgesafe-real-scale"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prune.json")
    args = parser.parse_args()
    cli = [] if args.skip_cli else cli_prune(args.work)  # first, while this process is small (see run_cli)
    torch.manual_seed(0)
    pipe = load_pipeline("zoo:tiny-shapes")
    tiny_len = pipe.tokenizer.model_max_length
    models = {"tiny-shapes": sweep("tiny-shapes", pipe.unet, text_length=tiny_len, latency_batch=64, repeats=20,
                                   latency=True)}
    errors = budget_errors(pipe.unet, tiny_len)

    sd15 = build_unet("sd-1.5").eval()
    models["sd-1.5"] = sweep("sd-1.5", sd15, text_length=TEXT_LENGTH["sd-1.5"], latency_batch=2, repeats=2,
                             latency=not args.skip_sd15_latency)
    del sd15
    done = [r for r in cli if r["returncode"] == 0]
    efficiencies = [r["latency_efficiency"] for m in models.values() for r in m["ratios"] if "latency_efficiency" in r]
    result = {
        "latency_efficiency": min(efficiencies),
        "bk_sdm_unet_params": {v: bk_sdm_param_count(UNET_CONFIGS["sd-1.5"], v) for v in ("base", "small", "tiny")},
        "cli_prune_peak_rss_gib_max": max((r["peak_rss_gib"] for r in done), default=None),
        "cli_prune_seconds_max": max((r["seconds"] for r in done), default=None),
        "cli_prune_all_succeeded": bool(cli) and len(done) == len(cli),
        "budget_error_max": max(abs(e["relative_error"]) for e in errors),
        "provenance": provenance(),
        "detail": {"models": models, "budget_errors": errors, "cli_prune": cli,
                   "sd15_latency_measured": not args.skip_sd15_latency},
    }
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k != "detail"})


if __name__ == "__main__":
    main()
