"""The stages of ``edgesafe compress`` and their registry.

Each stage is a :class:`~edgesafe.runs.Stage`: the settings it depends on, the hashes of what it
reads, and a function that does the work and returns figures for its manifest. ``STAGES`` lists
them in order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from . import data
from .devices import get_profile
from .finetune.curves import save_curves
from .finetune.losses import DenoisingTask
from .finetune.memory import peak_gib
from .finetune.trainer import Trainer
from .finetune.trainer import stage_reads as finetune_reads
from .measure.latency import measure_unet_ms
from .models.loading import load_pipeline, resolve_source
from .models.saving import save_student
from .models.stats import count_macs, count_params, param_bytes, peak_rss_gib
from .models.structure import load_unet, read_structure
from .prune import accumulate_taylor_gradients, prune_to_budget
from .recipe import Recipe
from .runs import Stage, StageContext, fingerprint


def unet_figures(unet: UNet2DConditionModel, recipe: Recipe, *, text_length: int) -> dict[str, Any]:
    """Parameters, MACs and ms per denoising step (UNet at batch 2 for guidance) on the recipe's device."""
    profile = get_profile(recipe.device)
    macs_step = count_macs(unet, batch=2, text_length=text_length)
    figures: dict[str, Any] = {
        "unet_params": count_params(unet),
        "unet_param_bytes": param_bytes(unet),
        "unet_macs": macs_step // 2,
        "unet_macs_per_step": macs_step,
        "device": profile.name,
    }
    if profile.measured:
        figures["ms_per_step"] = round(measure_unet_ms(unet, batch=2, text_length=text_length), 3)
        figures["ms_per_step_source"] = "measured (onnxruntime CPU, median)"
    else:
        figures["ms_per_step"] = round(profile.estimate_ms_per_step(macs_step, param_bytes(unet)), 3)
        figures["ms_per_step_source"] = f"estimated ({profile.provenance()})"
    return figures


def _teacher(ctx: StageContext) -> dict[str, Any]:
    pipe = load_pipeline(ctx.recipe.model.source)
    return unet_figures(pipe.unet, ctx.recipe, text_length=pipe.tokenizer.model_max_length)


def _unet_line(f: dict[str, Any]) -> str:
    return (f"UNet {f['unet_params'] / 1e6:.2f}M params, {f['unet_macs_per_step'] / 1e9:.2f} GMACs and "
            f"{f['ms_per_step']:.1f} ms per step on {f['device']}")


TEACHER = Stage(
    name="teacher",
    folder="0-teacher",
    description="load the teacher and measure its size, cost and step latency on the device",
    reads=lambda r: ["model.source", "device"],
    inputs=lambda r: {"model": fingerprint(resolve_source(r.model.source))},
    run=_teacher,
    summary=_unet_line,
)

def budget_measure(recipe: Recipe, *, text_length: int) -> Callable[[UNet2DConditionModel], float]:
    """The figure a recipe's budget is expressed in, as a function of a UNet (on the ``meta`` device too:
    a measured latency then runs it with random weights)."""
    metric = recipe.budget.metric
    if metric == "params":
        return count_params
    if metric == "macs":
        return lambda unet: float(count_macs(unet, batch=2, text_length=text_length))
    profile = get_profile(recipe.device)
    if profile.measured:
        return lambda unet: measure_unet_ms(materialize(unet), batch=2, text_length=text_length)
    return lambda unet: profile.estimate_ms_per_step(count_macs(unet, batch=2, text_length=text_length),
                                                     param_bytes(unet))


def materialize(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """``unet`` itself, or for a ``meta``-device UNet a CPU copy with small random weights (for timing)."""
    if not next(unet.parameters()).is_meta:
        return unet
    real = copy.deepcopy(unet).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in real.parameters():
            p.normal_(0, 0.02, generator=generator)
    return real


CALIBRATION_MICROBATCH = 1
"""Samples per backward pass in Taylor calibration: the gradient is that of the whole batch, the memory
that of one sample (with gradient checkpointing), so an SD-size UNet calibrates within a laptop's RAM."""


def _taylor_calibration(ctx: StageContext, pipe) -> Callable[[UNet2DConditionModel], None]:
    """Gradients of the denoising loss on a few fine-tuning batches (Diff-Pruning's importance). The
    batches are encoded now, so the text encoder and VAE can be freed before the gradients are taken."""
    recipe = ctx.recipe
    task = DenoisingTask(pipe)
    batch = min(16, recipe.finetune.batch_size)
    batches = data.Batches(recipe, batch_size=batch, resolution=data.training_resolution(recipe, pipe),
                           seed=recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    inputs = [task.inputs(*batches(step), generator) for step in range(recipe.prune.calibration_batches)]
    pieces = [{k: v[i:i + CALIBRATION_MICROBATCH] for k, v in x.items()}
              for x in inputs for i in range(0, batch, CALIBRATION_MICROBATCH)]

    def loss(unet: UNet2DConditionModel, x: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(unet.parameters()).device
        return DenoisingTask.loss(unet, {k: v.to(device) for k, v in x.items()}) * len(x["sample"]) / batch

    def calibrate(unet: UNet2DConditionModel) -> None:
        """On a GPU where there is one (the gradients come back with the weights), else here."""
        unet.enable_gradient_checkpointing()
        try:
            unet.to("cuda" if torch.cuda.is_available() else "cpu")
            accumulate_taylor_gradients(unet, [lambda u, x=x: loss(u, x) for x in pieces],
                                        progress=lambda done, total: ctx.progress("prune: taylor calibration",
                                                                                  done, total))
        finally:
            unet.disable_gradient_checkpointing()
            unet.to("cpu")

    return calibrate


def _prune(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    source = resolve_source(recipe.model.source)
    pipe = load_pipeline(source)
    text_length = pipe.tokenizer.model_max_length
    round_to = recipe.prune.round_to or get_profile(recipe.device).channel_multiple
    calibrate = _taylor_calibration(ctx, pipe) if recipe.prune.importance == "taylor" else None
    unet = pipe.unet
    del pipe  # the text encoder and VAE are not needed past here
    result = prune_to_budget(
        unet, recipe.budget, budget_measure(recipe, text_length=text_length), method=recipe.prune.method,
        blocks=recipe.prune.blocks, importance=recipe.prune.importance, round_to=round_to, seed=recipe.seed,
        calibrate=calibrate, progress=lambda done, total: ctx.progress("prune: budget search", done, total),
    )
    del unet
    save_student(result.unet, source, ctx.folder, kept_channels=result.kept_channels)
    figures = unet_figures(result.unet, recipe, text_length=text_length)
    return {
        **figures,
        "channel_ratio": round(result.ratio, 4),
        "budget_metric": recipe.budget.metric,
        "budget_target": result.target,
        "budget_value": result.value,
        "budget_relative_error": round(result.relative_error, 4),
        "teacher_budget_value": result.teacher_value,
        "trials": [{"ratio": round(r, 4), "value": v} for r, v in result.trials],
        "teacher": ctx.previous["teacher"]["figures"],
        "peak_rss_gib": peak_rss_gib(),
    }


PRUNE = Stage(
    name="prune",
    folder="1-prune",
    description="prune the UNet structurally to the device budget",
    reads=lambda r: ["model.source", "budget", "prune", "device"] + (  # Taylor calibrates on fine-tuning batches
        ["data", "concepts[].target", "finetune.batch_size"] if r.prune.importance == "taylor" else []),
    run=_prune,
    summary=lambda f: f"{_unet_line(f)} ({f['unet_params'] / f['teacher']['unet_params']:.0%} of the teacher's params)",
)

def _finetune(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    teacher = load_pipeline(recipe.model.source)
    pruned = ctx.run.root / PRUNE.folder / "unet"
    kept = read_structure(pruned)["kept_channels"]
    trainer = Trainer(teacher, load_unet(pruned), recipe, ctx.folder, kept_channels=kept)
    result = trainer.run(resume=ctx.resume, checkpoint_every=recipe.finetune.checkpoint_every,
                         progress=lambda done, total: ctx.progress(f"finetune ({recipe.finetune.solver})", done, total))
    save_student(result.student, ctx.run.root / PRUNE.folder, ctx.folder / "final", kept_channels=kept)
    save_curves(result.curves, ctx.folder)
    tail = result.curves[-10:]
    last = {k: sum(r[k] for r in tail if k in r) / max(1, sum(k in r for r in tail))
            for k in sorted({k for r in tail for k in r if k != "step"})}
    return {"solver": recipe.finetune.solver, "steps": result.steps, "resumed_from": result.resumed_from,
            "sec_per_step": round(result.seconds_per_step, 4), "final_losses": last,
            "device": str(trainer.device), "mixed_precision": recipe.finetune.mixed_precision,
            "memory_estimate_gib": trainer.memory_estimate.figures(), "peak_memory_gib": peak_gib(trainer.device)}


UNMET = 0.1
"""A constrained run's smoothed log-violation over its last steps above which its summary says the ratio was
not met (10% over the bound)."""


def _finetune_summary(f: dict[str, Any]) -> str:
    losses = f["final_losses"]
    line = f"{f['steps']} steps of {f['solver']} on {f['device']}; final losses: " + (", ".join(
        f"{k} {v:.4g}" for k, v in losses.items() if k in ("lower", "upper")) or "-")
    unmet = [k.removeprefix("violation.") for k, v in losses.items() if k.startswith("violation.") and v > UNMET]
    if unmet:
        line += (f"; erase_ratio not met for {', '.join(unmet)}: the student cannot erase that far through the"
                 " concept's params while it distils (raise finetune.erase_ratio, or widen concepts[].params)")
    return line


FINETUNE = Stage(
    name="finetune",
    folder="2-finetune",
    description="fine-tune the pruned UNet: distillation (lower level) + concept unlearning (upper level)",
    reads=finetune_reads,
    run=_finetune,
    summary=_finetune_summary,
)

def _export(ctx: StageContext) -> dict[str, Any]:
    from .export import export_stage

    return export_stage(load_pipeline(ctx.run.root / FINETUNE.folder / "final"), ctx.recipe, ctx.folder,
                        progress=ctx.progress)


EXPORT = Stage(
    name="export",
    folder="3-export",
    description="export the student to ONNX / Core ML, quantize, and check parity against PyTorch",
    reads=lambda r: ["export", "sampling", "data",  # parity prompts: a concept prompt and the data's captions
                     "concepts[].prompts", "concepts[].target"],
    run=_export,
    summary=lambda f: "; ".join(
        f"{target}/{variant} {g['bytes'] / 1e6:.1f} MB" + (f", {g['image_psnr_db']:.1f} dB vs PyTorch"
                                                             if "image_psnr_db" in g else "")
        for target, variants in f.items() for variant, g in variants.items()),
)

def _bench(ctx: StageContext) -> dict[str, Any]:
    from .bench.stage import bench_stage

    return bench_stage(ctx)


BENCH = Stage(
    name="bench",
    folder="4-bench",
    description="time every artefact against the teacher, score quality and concept rates, write the report",
    reads=lambda r: [""],  # the whole recipe: the report records it
    run=_bench,
    summary=lambda f: f"report {f['report']} and {f['html']}",
    keep=("report.json", "report.html", "images"),
)

STAGES: list[Stage] = [TEACHER, PRUNE, FINETUNE, EXPORT, BENCH]
