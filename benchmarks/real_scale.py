"""Run the shipped real-model recipes end to end on random-weight SD 1.5 and SD 2.1-base folders;
write benchmarks/results/real_scale.json.

No weights can be downloaded here, so each architecture is written by ``edgesafe zoo standin`` (the
published configs, random weights, a small tokenizer vocabulary) with 24 captioned images. Each
recipe runs through the CLI, one stage per process (prune, finetune, export, bench), with the recipe as
shipped except: the stand-in model and images, ``data.resolution`` (256 by default, the calibration
and fine-tuning size), a few fine-tuning steps at batch 1, as few sampling steps for the export's
INT8 calibration and parity images and the bench's images (which run at the model's 512 px), and a bench of
one seed per prompt, two wanted prompts and one latency round. Per stage: wall time, the process's peak
resident memory (its worker processes included), and the stage's own figures; the fine-tune's memory
estimate against its measured peak; whether plain diffusers loads the pruned folder.

Resumable: results are written after every run, each with the commit it ran at; a rerun skips the
completed runs (delete the file to measure everything afresh) and starts an incomplete one again from
its first stage. Heavy: one run at a time, about 20 GB of disk in --work.

    python benchmarks/real_scale.py [--arch sd-1.5] [--recipe iphone15] [--work /tmp/edgesafe-real-scale]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from harness import ROOT, provenance, real_recipes, run_cli, small_run, stand_in

from edgesafe.io import write_json

ARCHS = ("sd-1.5", "sd-2.1-base")
STAGES = (("prune", "1-prune"), ("finetune", "2-finetune"), ("export", "3-export"), ("bench", "4-bench"))
LOADS_WITH_DIFFUSERS = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False,
                                               local_files_only=True)
print(type(pipe.unet).__name__, sum(p.numel() for p in pipe.unet.parameters()))
"""


def loads_with_diffusers(folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", LOADS_WITH_DIFFUSERS, str(folder)], capture_output=True, text=True)
    if done.returncode:
        return {"ok": False, "error": done.stderr.strip().splitlines()[-1]}
    cls, params = done.stdout.split()
    return {"ok": True, "unet_class": cls, "unet_params": int(params)}


def unet_steps(report: Path) -> dict:
    """Each subject's median UNet step on this host from a bench report, and its speed-up over the teacher's."""
    subjects = json.loads(report.read_text())["subjects"]
    return {name: {"median": s["latency"]["host"]["unet_step_ms"]["median"],
                   "speedup_vs_teacher": s["latency"]["speedup_vs_teacher"]["unet_step"]}
            for name, s in subjects.items() if "unet_step_ms" in s["latency"]["host"]}


def run_recipe(recipe: Path, arch: str, work: Path, args: argparse.Namespace) -> dict:
    model, images = stand_in(work, arch)
    run = work / "runs" / arch / recipe.stem
    shutil.rmtree(run, ignore_errors=True)  # every stage measured afresh at this commit
    sets = small_run(images, resolution=args.resolution, steps=args.steps)
    entry: dict = {"recipe": recipe.stem, "arch": arch, "overrides": sets[1::2], "stages": {}}
    for command, folder in STAGES:
        done = run_cli(command, "--recipe", str(recipe), "--model", str(model), "--out", str(run), "--resume",
                       *sets, log=run.parent / f"{recipe.stem}.{command}.log")
        stage = {"seconds": done.seconds, "peak_rss_gib": done.peak_rss_gib, "returncode": done.returncode}
        manifest = run / folder / "stage.json"
        if manifest.is_file():
            stage["figures"] = json.loads(manifest.read_text()).get("figures")
        if done.returncode:
            stage["error"] = done.output_tail.strip().splitlines()[-1] if done.output_tail.strip() else ""
        entry["stages"][command] = stage
        print(recipe.stem, arch, command, {k: v for k, v in stage.items() if k != "figures"}, flush=True)
        if done.returncode:
            break
        if command == "prune":
            entry["pruned_student"] = loads_with_diffusers(run / folder)
        if command == "bench":
            entry["unet_step_ms"] = unet_steps(run / folder / "report.json")
    ft = entry["stages"].get("finetune", {})
    if ft.get("returncode") == 0:
        estimate = ft["figures"]["memory_estimate_gib"]["total"]
        entry["memory_estimate_error"] = round(estimate / ft["peak_rss_gib"] - 1, 3)
    return entry


def complete(run: dict) -> bool:
    """Whether every stage of :data:`STAGES` finished in ``run`` (a run from before a stage was added is not)."""
    return all(run["stages"].get(command, {}).get("returncode") == 0 for command, _ in STAGES)


def summary(runs: list[dict]) -> dict:
    def stage_max(stage: str, key: str) -> float | None:
        values = [r["stages"][stage][key] for r in runs if r["stages"].get(stage, {}).get("returncode") == 0]
        return max(values) if values else None

    done: dict[str, dict[str, bool]] = {}
    for r in runs:
        done.setdefault(r["recipe"], {})[r["arch"]] = complete(r)
    loads = [r["pruned_student"] for r in runs if "pruned_student" in r]
    errors = [abs(r["memory_estimate_error"]) for r in runs if "memory_estimate_error" in r]
    return {
        "prune_peak_rss_gib_max": stage_max("prune", "peak_rss_gib"),
        "prune_seconds_max": stage_max("prune", "seconds"),
        "compress_complete": done,
        "finetune_peak_rss_gib_max": stage_max("finetune", "peak_rss_gib"),
        "memory_estimate_error_max": max(errors) if errors else None,
        "pruned_student_loads_with_diffusers": bool(loads) and all(x["ok"] for x in loads) and any(
            x.get("unet_class") == "PrunedUNet2DConditionModel" for x in loads),
        "gpu": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=ARCHS)
    parser.add_argument("--recipe", action="append", help="recipe name (default: every real-model recipe)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgesafe-real-scale"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_scale.json")
    args = parser.parse_args()
    here = provenance()
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs = old.get("runs", [])
    recipes = [p for p in real_recipes() if not args.recipe or p.stem in args.recipe]
    for arch in args.arch or ARCHS:
        for recipe in recipes:
            if any(r["recipe"] == recipe.stem and r["arch"] == arch and complete(r) for r in runs):
                continue
            runs = [r for r in runs if not (r["recipe"] == recipe.stem and r["arch"] == arch)]
            runs.append({**run_recipe(recipe, arch, args.work, args), "commit": here["commit"]})
            write_json(args.out, {**summary(runs), "provenance": here, "runs": runs})
    print(json.dumps(summary(runs), indent=2))


if __name__ == "__main__":
    main()
