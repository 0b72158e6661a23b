"""Export a pipeline to ONNX (optimum's layout), OpenVINO (optimum-intel's layout) and Core ML
(apple/ml-stable-diffusion's layout), derive its variants, and check every artefact's parity against PyTorch.

:func:`export_stage` is the ``export`` stage of ``compress``: it writes ``<target>/<base>`` (``onnx/fp32``,
``openvino/fp32``, ``coreml/fp16``) and ``<target>/<variant>`` under the stage folder and returns per-artefact
figures (sizes, component errors, image PSNR, Core ML specs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline

from ..errors import EdgesafeError
from ..io import write_json
from ..recipe import Recipe
from .coreml import COREML_QUANTIZERS, export_coreml, quantize_coreml, validate_coreml
from .onnx import export_onnx, folder_bytes
from .parity import ParityError, check_parity, onnx_parity, parity_prompts
from .quantize import ONNX_QUANTIZERS, quantize_folder, unet_calibration
from .runtime import OnnxPipeline
from .targets import QUANTIZERS, TARGETS, missing_extras

__all__ = [
    "COREML_QUANTIZERS", "ONNX_QUANTIZERS", "QUANTIZERS", "TARGETS", "OnnxPipeline", "ParityError", "export_coreml",
    "export_onnx", "export_stage", "folder_bytes", "onnx_parity", "parity_prompts", "quantize_coreml",
    "quantize_folder", "unet_calibration", "validate_coreml",
]


def export_stage(
    pipe: StableDiffusionPipeline, recipe: Recipe, folder: Path,
    *, progress: Callable[[str, int, int], None] = lambda *_: None,
) -> dict[str, Any]:
    """Export, quantize and check every artefact the recipe asks for.

    Args:
        pipe: the pipeline to export (the fine-tuned student).
        recipe: ``export.targets`` and ``export.quantize`` say what to write, ``export.parity`` how close to
            ``pipe`` each artefact must be, ``sampling`` how images are sampled.
        folder: the stage folder; each artefact goes to ``folder/<target>/<variant>``.
        progress: called with ("export", artefacts done, artefacts in all).

    Returns:
        ``{target: {variant: figures}}`` (sizes and parity); the full figures are in ``folder/parity.json``.

    Raises:
        ParityError: on the first artefact past its tolerance (the figures measured so far are written).
    """
    spec = recipe.export
    if missing := missing_extras(recipe):
        raise EdgesafeError(f"export: {'; '.join(missing)}")
    plan = {name: [q for q in spec.quantize if q in TARGETS[name].quantizers] for name in spec.targets}
    total = sum(1 + len(variants) for variants in plan.values())
    figures: dict[str, Any] = {name: {} for name in plan}
    done = 0

    def record(name: str, variant: str, result: dict[str, Any], precision: str | None) -> None:
        nonlocal done
        figures[name][variant] = result
        write_json(folder / "parity.json", figures)
        done += 1
        progress("export", done, total)
        if precision:
            check_parity(f"{name}/{variant}", result, spec.parity[precision])

    for name, variants in plan.items():
        target = TARGETS[name]
        base = target.export(pipe, folder / name / target.base, recipe)
        record(name, target.base, target.check(pipe, base, recipe), target.precisions.get(target.base))
        prepared = target.prepare(pipe, recipe) if variants else None
        for method in variants:
            out = target.quantize(base, folder / name / method, method, prepared)
            record(name, method, target.check(pipe, out, recipe), target.precisions.get(method))
    return {name: {v: TARGETS[name].summary(f) for v, f in per.items()} for name, per in figures.items()}
