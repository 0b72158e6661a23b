"""The stages of ``edgesafe compress`` and their registry.

Each stage is a :class:`~edgesafe.runs.Stage`: the settings it depends on, the hashes of what it
reads, and a function that does the work and returns figures for its manifest. ``STAGES`` lists
them in order; stages that a later version adds (bench) are in ``PLANNED`` until they exist, so a
plan shows them and a run says they are not available yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from . import data
from .bench.latency import measure_unet_ms
from .devices import get_profile
from .finetune.curves import save_curves
from .finetune.losses import DenoisingTask
from .finetune.trainer import Trainer
from .models.loading import load_pipeline, resolve_source
from .models.stats import count_macs, count_params, param_bytes, unet_example_inputs
from .prune import accumulate_taylor_gradients, prune_to_budget, save_unet
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


TEACHER = Stage(
    name="teacher",
    folder="0-teacher",
    description="load the teacher and measure its size, cost and step latency on the device",
    settings=lambda r: {"model": r.model.source, "device": r.device},
    inputs=lambda r: {"model": fingerprint(resolve_source(r.model.source))},
    run=_teacher,
)

def budget_measure(recipe: Recipe, *, text_length: int) -> Callable[[UNet2DConditionModel], float]:
    """The figure a recipe's budget is expressed in, as a function of a UNet."""
    metric = recipe.budget.metric
    if metric == "params":
        return count_params
    if metric == "macs":
        return lambda unet: float(count_macs(unet, batch=2, text_length=text_length))
    profile = get_profile(recipe.device)
    if profile.measured:
        return lambda unet: measure_unet_ms(unet, batch=2, text_length=text_length)
    return lambda unet: profile.estimate_ms_per_step(count_macs(unet, batch=2, text_length=text_length),
                                                     param_bytes(unet))


def _taylor_calibration(ctx: StageContext, pipe) -> Callable[[UNet2DConditionModel], None]:
    """Gradients of the denoising loss on a few fine-tuning batches (Diff-Pruning's importance)."""
    recipe = ctx.recipe
    task = DenoisingTask(pipe)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batches = data.Batches(recipe, batch_size=min(16, recipe.finetune.batch_size), resolution=size, seed=recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    inputs = [task.inputs(*batches(step), generator) for step in range(recipe.prune.calibration_batches)]
    return lambda unet: accumulate_taylor_gradients(unet, [lambda u, x=x: task.loss(u, x) for x in inputs])


def _prune(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    pipe = load_pipeline(recipe.model.source)
    text_length = pipe.tokenizer.model_max_length
    round_to = recipe.prune.round_to or get_profile(recipe.device).channel_multiple
    result = prune_to_budget(
        pipe.unet, recipe.budget, budget_measure(recipe, text_length=text_length),
        unet_example_inputs(pipe.unet, batch=1, text_length=text_length), method=recipe.prune.method,
        blocks=recipe.prune.blocks, importance=recipe.prune.importance, round_to=round_to, seed=recipe.seed,
        calibrate=_taylor_calibration(ctx, pipe) if recipe.prune.importance == "taylor" else None,
        progress=lambda done, total: ctx.progress("prune: budget search", done, total),
    )
    pipe.unet = result.unet
    pipe.save_pretrained(ctx.folder, safe_serialization=True)
    save_unet(result.unet, ctx.folder / "unet")
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
    }


PRUNE = Stage(
    name="prune",
    folder="1-prune",
    description="prune the UNet structurally to the device budget",
    settings=lambda r: {"budget": r.budget.model_dump(), "prune": r.prune.model_dump(), "device": r.device,
                        "data": r.data.model_dump() if r.prune.importance == "taylor" else None},
    run=_prune,
)

def _finetune(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    teacher = load_pipeline(recipe.model.source)
    student = load_pipeline(ctx.run.root / PRUNE.folder)
    trainer = Trainer(teacher, student.unet, recipe, ctx.folder)
    result = trainer.run(resume=ctx.resume, checkpoint_every=recipe.finetune.checkpoint_every,
                         progress=lambda done, total: ctx.progress(f"finetune ({recipe.finetune.solver})", done, total))
    student.unet = result.student
    student.save_pretrained(ctx.folder / "final", safe_serialization=True)
    save_unet(result.student, ctx.folder / "final" / "unet")
    save_curves(result.curves, ctx.folder)
    tail = result.curves[-10:]
    last = {k: sum(r[k] for r in tail if k in r) / max(1, sum(k in r for r in tail))
            for k in sorted({k for r in tail for k in r if k != "step"})}
    return {"solver": recipe.finetune.solver, "steps": result.steps, "resumed_from": result.resumed_from,
            "sec_per_step": round(result.seconds_per_step, 4), "final_losses": last}


FINETUNE = Stage(
    name="finetune",
    folder="2-finetune",
    description="fine-tune the pruned UNet: distillation (lower level) + concept unlearning (upper level)",
    settings=lambda r: {"finetune": r.finetune.model_dump(), "concepts": [c.model_dump() for c in r.concepts],
                        "data": r.data.model_dump()},
    run=_finetune,
)

def _export(ctx: StageContext) -> dict[str, Any]:
    from .export import export_stage

    return export_stage(load_pipeline(ctx.run.root / FINETUNE.folder / "final"), ctx.recipe, ctx.folder,
                        progress=ctx.progress)


EXPORT = Stage(
    name="export",
    folder="3-export",
    description="export the student to ONNX / Core ML, quantize, and check parity against PyTorch",
    settings=lambda r: {"export": r.export.model_dump(), "data": r.data.model_dump(),
                        "bench": r.bench.model_dump()},
    run=_export,
)

STAGES: list[Stage] = [TEACHER, PRUNE, FINETUNE, EXPORT]

PLANNED: dict[str, str] = {
    "bench": "latency, quality and safety report against the teacher",
}
