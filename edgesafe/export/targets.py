"""The export targets, one registry entry each: how a pipeline becomes the target's base artefact, which
quantizers derive variants from it, and how every artefact is checked against PyTorch.

A new target (OpenVINO, say) is one :class:`Target` here; the recipe's ``export.targets`` and
``export.quantize`` take their allowed names from :data:`TARGETS` and :data:`QUANTIZERS`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline

from ..recipe import Recipe
from .coreml import COREML_QUANTIZERS, export_coreml, quantize_coreml, validate_coreml
from .onnx import export_onnx, folder_bytes
from .parity import data_captions, onnx_parity, parity_prompts
from .quantize import ONNX_QUANTIZERS, quantize_folder, unet_calibration


@dataclass(frozen=True)
class Target:
    """One export target: what a plug-in author provides to add one (OpenVINO, say)."""

    base: str
    """The variant name of the unquantized artefact (its folder under the target's)."""
    export: Callable[[StableDiffusionPipeline, Path, Recipe], Path]
    quantizers: dict[str, Callable]
    """Variant name -> what :attr:`quantize` applies."""
    quantize: Callable[[Path, Path, str, Any], Path]
    """(base artefact, destination, quantizer name, :attr:`prepare`'s result) -> the variant."""
    check: Callable[[StableDiffusionPipeline, Path, Recipe], dict[str, Any]]
    """The artefact's figures against PyTorch (raising on a malformed artefact)."""
    summary: Callable[[dict[str, Any]], dict[str, Any]]
    """The figures a stage manifest keeps of :attr:`check`'s result."""
    parity: dict[str, str] | None = None
    """Which ``export.parity`` tolerance judges the base and the quantized variants; None: not judged here."""
    prepare: Callable[[StableDiffusionPipeline, Recipe], Any] = lambda pipe, recipe: None
    """Run once before the first quantizer (calibration data)."""
    requires: dict[str, str] = field(default_factory=dict)
    """Optional packages by what needs them (the target's name or a quantizer's) -> the edgesafe extra that
    installs them."""


def _onnx_check(pipe: StableDiffusionPipeline, folder: Path, recipe: Recipe) -> dict[str, Any]:
    return {**onnx_parity(pipe, folder, parity_prompts(recipe), steps=recipe.sampling.steps,
                          guidance=recipe.sampling.guidance_scale), "bytes": folder_bytes(folder)}


TARGETS: dict[str, Target] = {
    "onnx": Target(
        base="fp32",
        export=lambda pipe, out, recipe: export_onnx(pipe, out, opset=recipe.export.opset),
        quantizers=ONNX_QUANTIZERS,
        quantize=quantize_folder,
        check=_onnx_check,
        summary=lambda f: {"bytes": f["bytes"], "image_psnr_db": round(f["image_psnr_db"], 2),
                           "unet_max_abs": f["components"]["unet"]["max_abs"]},
        parity={"base": "fp32", "quantized": "int8"},
        requires={"int8-nncf": "nncf"},
        prepare=lambda pipe, recipe: unet_calibration(pipe, data_captions(recipe, 8), steps=recipe.sampling.steps,
                                                      guidance=recipe.sampling.guidance_scale),
    ),
    "coreml": Target(
        base="fp16",
        export=lambda pipe, out, recipe: export_coreml(pipe, out),
        quantizers=COREML_QUANTIZERS,
        quantize=lambda src, dst, method, _: quantize_coreml(src, dst, method),
        check=lambda pipe, folder, recipe: validate_coreml(pipe, folder),
        summary=lambda f: {"bytes": sum(p["bytes"] for p in f["packages"].values()), "predicted": f["predicted"]},
        requires={"coreml": "coreml"},
    ),
}
QUANTIZERS: dict[str, str] = {q: name for name, target in TARGETS.items() for q in target.quantizers}
"""Every quantizer name -> the target whose base artefact it rewrites."""
EXTRA_PACKAGES = {"coreml": "coremltools", "nncf": "nncf"}
"""edgesafe's extras for export -> the package each brings."""


def missing_extras(recipe: Recipe) -> list[str]:
    """Lines naming each export the recipe asks for whose optional package is not installed, and its extra."""
    asked = {*recipe.export.targets, *recipe.export.quantize}
    lines = []
    for name in recipe.export.targets:
        for what, extra in TARGETS[name].requires.items():
            if what in asked and importlib.util.find_spec(EXTRA_PACKAGES[extra]) is None:
                lines.append(f"{what} needs {EXTRA_PACKAGES[extra]}: pip install 'edgesafe[{extra}]'")
    return lines


PRECISIONS = sorted({p for target in TARGETS.values() for p in (target.parity or {}).values()})
"""The precisions an artefact's parity is judged at (the keys of ``export.parity``)."""
