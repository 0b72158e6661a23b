"""The ``bench`` stage: every subject of a run (teacher, pruned, fine-tuned, each export) timed, and its
images scored for quality and for each unwanted concept, into ``4-bench/report.json`` and ``report.html``.

Each subject runs in its own process (:mod:`edgesafe.bench.worker`), so that its load time and peak memory
are its own. Latency is taken in rounds, every subject once per round in a rotating order, so that the
host's drift spreads over all of them alike. Each finished process leaves its result in ``work/``: an
interrupted bench resumes where it stopped. The report, its images and its HTML replace the previous ones
only once all are written.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import __version__, data
from ..errors import EdgesafeError
from ..io import load_tensors, read_json, write_json
from ..measure.host import cpu_name, speed_isa
from ..models.loading import resolve_source
from ..runs import StageContext
from .detectors import build_detectors
from .prompts import concept_prompts
from .quality import SCORERS
from .statistics import rate, spread
from .subjects import SUBJECT_KINDS, Subject, discover

COMPONENTS = ("text_encoder", "unet_step", "vae_decode", "end_to_end")
GENERATION_LATENT_ELEMENTS = 16384
"""Latent pixels per generation batch: 64 images of tiny-shapes' 16x16 latents, 4 of SD's 64x64 ones."""


def prompt_groups(recipe) -> dict[str, list[tuple[str, int]]]:
    """``{"wanted": [(prompt, seed), ...], "<set>/<concept>": [...]}``: every prompt at every seed."""
    seeds = [recipe.seed + i for i in range(recipe.bench.seeds)]
    safety_seeds = [recipe.seed + i for i in range(recipe.bench.safety_seeds)]
    wanted = data.wanted_prompts(recipe)
    if not wanted:
        raise EdgesafeError("data: no caption is free of the unwanted concepts, so the bench has no wanted prompts")
    groups = {"wanted": [(p, s) for p in wanted for s in seeds]}
    for set_name, per_concept in concept_prompts(recipe).items():
        for concept, prompts in per_concept.items():
            groups[f"{set_name}/{concept}"] = [(p, s) for p in prompts for s in safety_seeds]
    return groups


def latent_shape(source: str) -> list[int]:
    """(C, H, W) of the teacher's latents (pruning keeps both)."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(resolve_source(source) / "unet")
    size = config["sample_size"]
    size = size if isinstance(size, int) else size[0]
    return [config["in_channels"], size, size]


def _slug(name: str) -> str:
    return name.replace("/", "--")


def _run_worker(job: dict, folder: Path, subject: Subject) -> None:
    path = folder / f"{Path(job['result']).stem}.job.json"
    write_json(path, job)
    proc = subprocess.run([sys.executable, "-m", "edgesafe.bench.worker", str(path)], capture_output=True, text=True)
    (folder / f"{Path(job['result']).stem}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        where = "" if proc.returncode == 2 else f" (worker log: {folder / Path(job['result']).stem}.log)"
        raise EdgesafeError(f"bench of {subject.name}: {last}{where}")


def run_subjects(
    recipe, subjects: list[Subject], groups: dict[str, list[tuple[str, int]]], work: Path, shape: list[int],
    progress: Callable[[str, int, int], None],
) -> dict[str, dict]:
    """Run every worker process the bench needs (skipping those whose result is on disk); return, per
    subject, its rounds' results and its images' path."""
    bench = recipe.bench
    timed = [s for s in subjects if SUBJECT_KINDS[s.kind].latency_note is None]
    prompt = groups["wanted"][0][0]
    batch = max(1, min(64, GENERATION_LATENT_ELEMENTS // (shape[1] * shape[2])))
    plan: list[tuple[Subject, int | None, bool]] = []  # (subject, round or None, generate)
    for r in range(bench.latency_rounds):
        shift = r % max(1, len(timed))
        for s in timed[shift:] + timed[:shift]:
            plan.append((s, r, r == 0))
    plan += [(s, None, True) for s in subjects if s not in timed]
    outcomes: dict[str, dict] = {s.name: {"rounds": [], "images": None} for s in subjects}
    for i, (subject, round_, generate) in enumerate(plan):
        folder = work / _slug(subject.name)
        folder.mkdir(parents=True, exist_ok=True)
        result = folder / (f"round-{round_}.json" if round_ is not None else "images.json")
        images = folder / "images.safetensors"
        if not result.is_file():
            job: dict[str, Any] = {"subject": subject.to_dict(), "latent_shape": shape, "result": str(result)}
            if round_ is not None:
                job["time"] = {"prompt": prompt, "seed": recipe.seed, "steps": recipe.sampling.steps,
                               "guidance": recipe.sampling.guidance_scale, "repeats": bench.latency_repeats}
            if generate:
                job["generate"] = {"groups": groups, "steps": recipe.sampling.steps,
                                   "guidance": recipe.sampling.guidance_scale, "batch": batch, "out": str(images)}
            _run_worker(job, folder, subject)
        if round_ is not None:
            outcomes[subject.name]["rounds"].append(read_json(result))
        if generate:
            outcomes[subject.name]["images"] = images
            outcomes[subject.name]["generation"] = read_json(result)
        progress("bench: subjects", i + 1, len(plan))
    return outcomes


def latency_section(recipe, subject: Subject, outcome: dict, estimate: dict | None) -> dict:
    note = SUBJECT_KINDS[subject.kind].latency_note
    section: dict[str, Any] = {}
    if note:
        section["host"] = {"unavailable": note}
    else:
        rounds = outcome["rounds"]
        host: dict[str, Any] = {f"{c}_ms": spread([t for r in rounds for t in r["timings_ms"][c]]) for c in COMPONENTS}
        host["load_s"] = spread([r["load_seconds"] for r in rounds])
        host["rounds"] = len(rounds)
        host["calls_per_round"] = recipe.bench.latency_repeats
        section["host"] = host
    section["estimate"] = estimate or {"unavailable": "the device profile is measured on this host: the host "
                                                      "figures are the device's"}
    section["devices"] = {}
    return section


def device_estimate(recipe, figures: dict | None) -> dict | None:
    """The recipe device's UNet step estimate from its profile, for a UNet's MACs and weight bytes."""
    from ..devices import get_profile

    profile = get_profile(recipe.device)
    if profile.measured or not figures:
        return None
    ms = profile.estimate_ms_per_step(figures["unet_macs_per_step"], figures["unet_param_bytes"])
    return {"device": profile.name, "unet_step_ms": round(ms, 3), "denoising_ms": round(ms * recipe.sampling.steps, 1),
            "kind": "estimate", "source": profile.provenance()}


def safety_section(recipe, images: dict[str, torch.Tensor], detectors: dict) -> dict:
    """Each concept's rate on each prompt set's images, and on the wanted prompts' images (``wanted``), which
    never ask for it: there the rate is the detector's false positives, or the concept leaking into ordinary
    images; either way the floor the other rates are read against."""
    section: dict[str, Any] = {}
    for concept in recipe.concepts:
        detector = detectors.get(concept.name)
        per_set: dict[str, Any] = {}
        for set_name in [*recipe.bench.prompt_sets, "wanted"]:
            group = "wanted" if set_name == "wanted" else f"{set_name}/{concept.name}"
            if group not in images:
                per_set[set_name] = {"unavailable": f"the concept has no {set_name} prompts"}
            elif detector is None:
                per_set[set_name] = {"unavailable": f"no detector for {concept.name} (set concepts[].detector)"}
            else:
                flags = detector(images[group].float() / 255)
                per_set[set_name] = {**rate(sum(flags), len(flags)), "detector": concept.detector.name}
        section[concept.name] = per_set
    return section


def environment() -> dict[str, Any]:
    import coremltools
    import diffusers
    import onnxruntime
    import transformers

    return {"edgesafe": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "coremltools": coremltools.__version__,
            "platform": platform.platform(), "cpu": cpu_name(), "isa": speed_isa(),
            "threads": torch.get_num_threads()}


def _parity(export_dir: Path, subject: Subject, recipe) -> dict | None:
    """An exported subject's parity figures from the export stage, with the tolerance its precision had (None
    where its target's artefacts are not judged against PyTorch here)."""
    from ..export.targets import TARGETS

    path = export_dir / "parity.json"
    target, _, variant = subject.name.partition("/")
    precision = TARGETS[target].precisions.get(variant) if target in TARGETS else None
    figures = read_json(path).get(target, {}).get(variant) if precision and path.is_file() else None
    if not figures:
        return None
    tolerance = recipe.export.parity[precision]
    return {"image_psnr_db": round(figures["image_psnr_db"], 3),
            "unet_max_abs": figures["components"]["unet"]["max_abs"], "tolerance_psnr_db": tolerance.psnr_db}


def _size(subject: Subject, manifests: dict) -> dict:
    from ..export.onnx import folder_bytes

    path = resolve_source(subject.path) if subject.kind == "pytorch" else Path(subject.path)
    figures = manifests["teacher" if subject.name == "teacher" else "prune"]["figures"]
    return {"bytes": folder_bytes(path), "unet_params": figures["unet_params"]}


def bench_stage(ctx: StageContext) -> dict[str, Any]:
    """Measure every subject of the run, score its images, and write the report, its images and its HTML."""
    import time

    from ..devices import get_profile
    from .html import write_outputs
    from .report import SCHEMA_NAME, SCHEMA_VERSION, edge_subject, erasure, recipe_gates, validate

    t0 = time.perf_counter()
    recipe, root = ctx.recipe, ctx.run.root
    subjects = discover(root, recipe.model.source, ctx.previous)
    for s in subjects:  # a corrupt artefact stops here, before any subject runs
        SUBJECT_KINDS[s.kind].check(s)
    detectors = build_detectors(recipe)  # missing weights stop here, before any image is made
    groups = prompt_groups(recipe)
    shape = latent_shape(recipe.model.source)
    outcomes = run_subjects(recipe, subjects, groups, ctx.folder / "work", shape, ctx.progress)

    images = {s.name: load_tensors(outcomes[s.name]["images"]) for s in subjects}
    wanted = [p for p, _ in groups["wanted"]]
    teacher_wanted = images["teacher"]["wanted"].float() / 255
    real = lambda: data.reference_images(recipe, len(wanted), resolution=teacher_wanted.shape[-1],  # noqa: E731
                                         seed=recipe.seed)
    scorers = {}
    for name, scorer in SCORERS.items():
        why = scorer.unavailable(recipe)
        scorers[name] = {"unavailable": why} if why else scorer.build(recipe, teacher_wanted, real)

    manifests = ctx.previous
    profile = get_profile(recipe.device)
    report_subjects: dict[str, Any] = {}
    for s in subjects:
        ctx.progress("bench: scoring", len(report_subjects), len(subjects))
        outcome = outcomes[s.name]
        estimate = device_estimate(recipe, manifests["teacher" if s.name == "teacher" else "prune"]["figures"])
        entry: dict[str, Any] = {"kind": s.kind, "label": s.label, "stage": s.stage, "path": s.path,
                                 "size": _size(s, manifests), "latency": latency_section(recipe, s, outcome, estimate)}
        rounds = outcome["rounds"]
        entry["memory"] = ({"peak_rss_gib": max(r["peak_rss_gib"] for r in rounds),
                            "note": "peak resident memory of the subject's own process, after load and timing"}
                           if rounds else {"unavailable": SUBJECT_KINDS[s.kind].latency_note})
        mine = images[s.name]["wanted"].float() / 255
        entry["quality"] = {}
        for name, scorer in scorers.items():
            if isinstance(scorer, dict):
                entry["quality"][name] = scorer
            elif name == "fidelity" and s.name == "teacher":
                entry["quality"][name] = {"unavailable": "the teacher is the reference"}
            else:
                entry["quality"][name] = scorer(mine, wanted)
        entry["safety"] = safety_section(recipe, images[s.name], detectors)
        parity = _parity(root / "3-export", s, recipe)
        if parity:
            entry["parity"] = parity
        if "weights_from_package" in outcome.get("generation", {}):
            entry["weights_from_package"] = outcome["generation"]["weights_from_package"]
        report_subjects[s.name] = entry

    teacher_host = report_subjects["teacher"]["latency"]["host"]
    for entry in report_subjects.values():
        host = entry["latency"]["host"]
        if "end_to_end_ms" in host:
            entry["latency"]["speedup_vs_teacher"] = {
                c: round(teacher_host[f"{c}_ms"]["median"] / host[f"{c}_ms"]["median"], 4) for c in COMPONENTS}

    names = [s.name for s in subjects]
    curves = root / "2-finetune" / "curves.json"
    report: dict[str, Any] = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {"folder": str(root), "recipe": recipe.to_dict(),
                "stage_keys": {name: m["key"] for name, m in manifests.items()}},
        "environment": environment(),
        "seeds": {"wanted": sorted({s for _, s in groups["wanted"]}),
                  "safety": [recipe.seed + i for i in range(recipe.bench.safety_seeds)], "latency": recipe.seed,
                  "steps": recipe.sampling.steps, "guidance_scale": recipe.sampling.guidance_scale},
        "prompt_sets": {"wanted": {"source": f"data ({recipe.data.kind})", "prompts": list(dict.fromkeys(wanted))},
                        **{k: v for k, v in concept_prompts(recipe).items()}},
        "detectors": {c: d.description for c, d in detectors.items()},
        "device": {"name": profile.name, "title": profile.title, "runtime": profile.runtime,
                   "estimate_source": profile.provenance(), "memory_budget_mb": profile.memory_budget_mb},
        "subjects": report_subjects,
        "erasure": erasure(recipe, {n: e["safety"] for n, e in report_subjects.items()}, names,
                           {s.name: s.stage for s in subjects}),
        "edge_subject": edge_subject(names, profile.runtime),
        "finetune": {"solver": recipe.finetune.solver, "curves": read_json(curves) if curves.is_file() else []},
    }
    report["gates"] = recipe_gates(recipe, report)
    report["bench"] = {"seconds": round(time.perf_counter() - t0, 2), "processes": sum(
        len(o["rounds"]) + (0 if o["rounds"] else 1) for o in outcomes.values())}
    validate(report, source="the new report")
    write_outputs(report, images, groups, ctx.folder)
    return {"report": str(ctx.folder / "report.json"), "html": str(ctx.folder / "report.html"),
            "edge_subject": report["edge_subject"], "gates_passed": all(g["passed"] for g in report["gates"]),
            "subjects": names, "bench_seconds": report["bench"]["seconds"]}
