"""Export a pipeline to ONNX (optimum's layout) and Core ML (apple/ml-stable-diffusion's layout),
quantize it, and check every artefact's parity against PyTorch.

:func:`export_stage` is the ``export`` stage of ``compress``: it writes ``onnx/fp32``,
``onnx/<quantizer>``, ``coreml/fp16`` and ``coreml/<quantizer>`` under the stage folder and
returns per-artefact figures (sizes, component errors, image PSNR, Core ML specs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline

from ..data import Batches
from ..io import write_json
from ..recipe import Recipe
from .coreml import COREML_QUANTIZERS, export_coreml, quantize_coreml, validate_coreml
from .onnx import export_onnx, folder_bytes
from .parity import ParityError, check_parity, onnx_parity
from .quantize import ONNX_QUANTIZERS, quantize_folder, unet_calibration
from .runtime import OnnxPipeline

__all__ = [
    "COREML_QUANTIZERS", "ONNX_QUANTIZERS", "OnnxPipeline", "ParityError", "export_coreml", "export_onnx",
    "export_stage", "onnx_parity", "quantize_coreml", "quantize_folder", "validate_coreml",
]


def calibration_captions(recipe: Recipe, count: int = 8) -> list[str]:
    """Captions from the recipe's data (without the unwanted concepts when the data excludes them)."""
    return Batches(recipe, batch_size=count, resolution=32, seed=recipe.seed)(0)[1]


def export_stage(
    pipe: StableDiffusionPipeline, recipe: Recipe, folder: Path,
    *, progress: Callable[[str, int, int], None] = lambda *_: None,
) -> dict[str, Any]:
    """Export, quantize and check every artefact the recipe asks for; raise :class:`ParityError` on the
    first artefact past its tolerance (the figures measured so far are in ``folder/parity.json``)."""
    spec, bench = recipe.export, recipe.bench
    figures: dict[str, Any] = {"onnx": {}, "coreml": {}}
    int8 = [q for q in spec.quantize if q in ONNX_QUANTIZERS]
    coreml = [q for q in spec.quantize if q in COREML_QUANTIZERS]
    total = ("onnx" in spec.targets) * (1 + len(int8)) + ("coreml" in spec.targets) * (1 + len(coreml))
    done = 0

    def record(target: str, variant: str, result: dict[str, Any], precision: str | None) -> None:
        nonlocal done
        figures[target][variant] = result
        write_json(folder / "parity.json", figures)
        done += 1
        progress("export", done, total)
        if precision:
            check_parity(f"{target}/{variant}", result, spec.parity[precision])

    if "onnx" in spec.targets:
        fp32 = export_onnx(pipe, folder / "onnx" / "fp32", opset=spec.opset)
        record("onnx", "fp32", {**onnx_parity(pipe, fp32, steps=bench.steps, guidance=bench.guidance_scale),
                                "bytes": folder_bytes(fp32)}, "fp32")
        calibration = unet_calibration(pipe, calibration_captions(recipe), steps=bench.steps,
                                       guidance=bench.guidance_scale) if int8 else []
        for method in int8:
            out = quantize_folder(fp32, folder / "onnx" / method, method, calibration)
            record("onnx", method, {**onnx_parity(pipe, out, steps=bench.steps, guidance=bench.guidance_scale),
                                    "bytes": folder_bytes(out)}, "int8")
    if "coreml" in spec.targets:
        fp16 = export_coreml(pipe, folder / "coreml" / "fp16")
        record("coreml", "fp16", validate_coreml(pipe, fp16), None)
        for method in coreml:
            out = quantize_coreml(fp16, folder / "coreml" / method, method)
            record("coreml", method, validate_coreml(pipe, out), None)
    return {
        "onnx": {v: {"bytes": f["bytes"], "image_psnr_db": round(f["image_psnr_db"], 2),
                     "unet_max_abs": f["components"]["unet"]["max_abs"]} for v, f in figures["onnx"].items()},
        "coreml": {v: {"bytes": sum(p["bytes"] for p in f["packages"].values()), "predicted": f["predicted"]}
                   for v, f in figures["coreml"].items()},
    }
