"""The stages of ``edgesafe compress`` and their registry.

Each stage is a :class:`~edgesafe.runs.Stage`: the settings it depends on, the hashes of what it
reads, and a function that does the work and returns figures for its manifest. ``STAGES`` lists
them in order; stages that a later version adds (prune, finetune, export, bench) are in
``PLANNED`` until they exist, so a plan shows them and a run says they are not available yet.
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel

from .bench.latency import measure_unet_ms
from .devices import get_profile
from .models.loading import load_pipeline, resolve_source
from .models.stats import count_macs, count_params, param_bytes
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

STAGES: list[Stage] = [TEACHER]

PLANNED: dict[str, str] = {
    "prune": "structured pruning to the device budget",
    "finetune": "bilevel fine-tuning: distillation + concept unlearning",
    "export": "ONNX / Core ML export, quantization and parity checks",
    "bench": "latency, quality and safety report against the teacher",
}
