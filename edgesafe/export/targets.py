"""The export targets, one registry entry each: how a pipeline becomes the target's base artefact, which
quantizers derive variants from it, and how every artefact is checked against PyTorch.

A new target is one :class:`Target` here; the recipe's ``export.targets`` and
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
from .openvino import OPENVINO_QUANTIZERS, OpenVinoPipeline, export_openvino, quantize_openvino
from .palettization import MixedBitInputs
from .parity import data_captions, parity_prompts, pipeline_parity
from .quantize import ONNX_PRECISIONS, ONNX_QUANTIZERS, QuantizeInputs, quantize_folder, unet_calibration
from .runtime import ExportedPipeline, OnnxPipeline


@dataclass(frozen=True)
class Target:
    """One export target: what a plug-in author provides to add one."""

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
    subject_kind: str
    """The bench's subject kind that runs its artefacts (``bench.subjects.SUBJECT_KINDS``)."""
    subject_label: str
    """The bench's label of an artefact, ``{variant}`` filled in."""
    precisions: dict[str, str] = field(default_factory=dict)
    """Artefact (the base and each quantizer) -> the ``export.parity`` precision that judges it; an artefact left
    out is not judged here."""
    prepare: Callable[[StableDiffusionPipeline, Recipe], Any] = lambda pipe, recipe: None
    """Run once before the first quantizer: what the quantizers take (calibration feeds, the mixed search's
    prompts and target)."""
    requires: dict[str, str] = field(default_factory=dict)
    """Optional packages by what needs them (the target's name or a quantizer's) -> the edgesafe extra that
    installs them."""


def _checked_by(runner: Callable[[Path], ExportedPipeline]) -> Callable[..., dict[str, Any]]:
    """A target's check: the parity of its folder as ``runner`` runs it, and the folder's size."""

    def check(pipe: StableDiffusionPipeline, folder: Path, recipe: Recipe) -> dict[str, Any]:
        return {**pipeline_parity(pipe, runner(folder), parity_prompts(recipe), steps=recipe.sampling.steps,
                                  guidance=recipe.sampling.guidance_scale), "bytes": folder_bytes(folder)}

    return check


def _parity_summary(figures: dict[str, Any]) -> dict[str, Any]:
    return {"bytes": figures["bytes"], "image_psnr_db": round(figures["image_psnr_db"], 2),
            "unet_max_abs": figures["components"]["unet"]["max_abs"]}


def quantize_inputs(pipe: StableDiffusionPipeline, recipe: Recipe) -> QuantizeInputs:
    """Calibration feeds from sampling 8 of the recipe's captions, and the mixed search's prompts and target."""
    steps, guidance = recipe.sampling.steps, recipe.sampling.guidance_scale
    return QuantizeInputs(unet_calibration(pipe, data_captions(recipe, 8), steps=steps, guidance=guidance),
                          parity_prompts(recipe), steps, guidance, recipe.export.mixed_psnr_db)


def mixed_bit_inputs(pipe: StableDiffusionPipeline, recipe: Recipe) -> MixedBitInputs | None:
    """``coreml-mixed``'s pipeline, prompts, sampling and target (None where the recipe does not ask for it)."""
    if "coreml-mixed" not in recipe.export.quantize:
        return None
    return MixedBitInputs(pipe, parity_prompts(recipe), recipe.sampling.steps, recipe.sampling.guidance_scale,
                          recipe.export.mixed_psnr_db)


TARGETS: dict[str, Target] = {
    "onnx": Target(
        base="fp32",
        export=lambda pipe, out, recipe: export_onnx(pipe, out, opset=recipe.export.opset),
        quantizers=ONNX_QUANTIZERS,
        quantize=quantize_folder,
        check=_checked_by(OnnxPipeline),
        summary=_parity_summary,
        subject_kind="onnx",
        subject_label="ONNX {variant} (onnxruntime CPU)",
        precisions=ONNX_PRECISIONS,
        requires={"int8-nncf": "nncf"},
        prepare=lambda pipe, recipe: quantize_inputs(pipe, recipe),
    ),
    "coreml": Target(
        base="fp16",
        export=lambda pipe, out, recipe: export_coreml(pipe, out),
        quantizers=COREML_QUANTIZERS,
        quantize=quantize_coreml,
        check=lambda pipe, folder, recipe: validate_coreml(pipe, folder),
        summary=lambda f: {"bytes": sum(p["bytes"] for p in f["packages"].values()), "predicted": f["predicted"]},
        subject_kind="coreml-weights",
        subject_label="Core ML {variant} weights (in PyTorch)",
        requires={"coreml": "coreml"},
        prepare=mixed_bit_inputs,
    ),
    "openvino": Target(
        base="fp32",
        export=lambda pipe, out, recipe: export_openvino(pipe, out, opset=recipe.export.opset),
        quantizers=OPENVINO_QUANTIZERS,
        quantize=quantize_openvino,
        check=_checked_by(OpenVinoPipeline),
        summary=_parity_summary,
        subject_kind="openvino",
        subject_label="OpenVINO {variant} (OpenVINO CPU)",
        precisions={"fp32": "fp32", "openvino-int8": "int8"},
        requires={"openvino": "openvino", "openvino-int8": "nncf"},
        prepare=lambda pipe, recipe: quantize_inputs(pipe, recipe),
    ),
}
QUANTIZERS: dict[str, str] = {q: name for name, target in TARGETS.items() for q in target.quantizers}
"""Every quantizer name -> the target whose base artefact it rewrites."""
EXTRA_PACKAGES = {"coreml": "coremltools", "nncf": "nncf", "openvino": "openvino"}
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


PRECISIONS = sorted({p for target in TARGETS.values() for p in target.precisions.values()})
"""The precisions an artefact's parity is judged at (the keys of ``export.parity``)."""
