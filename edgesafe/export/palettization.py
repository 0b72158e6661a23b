"""``coreml-mixed``: a palettization width per weight (4, 6 or 8 bits, or fp16 kept), chosen by measured
sensitivity for the smallest UNet and text encoder whose images stay within ``export.mixed_psnr_db`` of fp16.

Apple's mixed-bit palettization analysis (apple/ml-stable-diffusion) is the model. Core ML predicts only on
macOS, so images are made in PyTorch with the packages' decompressed weights, the values the device computes
with (as the bench's ``coreml-weights`` subject does), from the parity prompts and fixed latents; the reference
is the fp16 export's weights.

1. Each package is palettized whole at 4 bits by coremltools' k-means (one look-up table per weight; the pass
   runs on the program in memory, the package is not written) and its images compared with the reference; if
   they meet the target, that is the variant.
2. Otherwise the packages are palettized whole at 6 and 8 bits too, and each weight's effect alone is measured
   at each width (the reference with only that weight palettized). A target that even the least sensitive
   weight alone at 8 bits misses is refused there.
3. Errors of separate weights add roughly as mean squared errors, so widenings are ordered greedily by the
   error they remove per byte they add, from every weight at 4 bits to every weight in fp16, and the search
   bisects on how far along that order to go: the shortest prefix whose measured images meet the target.
4. coremltools writes the chosen widths (one palettizer config per weight) and the written packages are
   measured once more.

The analysis goes to ``mixed_palettization.json`` beside the packages (the Swift pipeline ignores it); made
again over a folder that holds one measured on the same fp16 export, prompts and sampling (a new target, say),
the per-weight figures are reused and only the search runs. Memory: the text encoder, UNet and VAE are copied
and each palettized weight is held at every width in fp16 (about 4x the UNet's fp16 size).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from ..errors import EdgesafeError
from ..io import read_json, write_json
from ..models.inputs import seeded_normal
from .coreml import (
    COMPRESSED,
    PACKAGE_MODULES,
    PALETTIZED,
    load_coreml_weights,
    package_parameters,
    palettized_constants,
    rewrite_packages,
    with_coreml_weights,
)
from .onnx import latent_shape
from .parity import psnr_db

ANALYSIS = "mixed_palettization.json"
LEVELS = (4, 6, 8)
"""The palettization widths a weight can get; it can also stay fp16 (:data:`FP16`)."""
FP16 = 16


@dataclass(frozen=True)
class MixedBitInputs:
    """What ``coreml-mixed`` measures with: the PyTorch pipeline the export came from and how to sample."""

    pipe: StableDiffusionPipeline
    prompts: list[str]
    steps: int
    guidance: float
    psnr_db: float
    """The image PSNR against the fp16 export that the mix keeps."""


@dataclass(frozen=True)
class _Weight:
    package: str
    param: str
    """The parameter's name in its module (``PACKAGE_MODULES``)."""
    const: str
    """The weight's constant in the fp16 package: what a palettizer config names."""
    numel: int

    @property
    def key(self) -> str:
        return f"{self.package}:{self.param}"

    def bytes_at(self, bits: int) -> int:
        """Storage at ``bits``: the indices and an fp16 look-up table, or the fp16 values."""
        return 2 * self.numel if bits == FP16 else math.ceil(self.numel * bits / 8) + 2 * 2**bits


class _Images:
    """A PyTorch copy of the pipeline whose palettizable weights can be set to any width, and its images."""

    def __init__(self, folder: Path, inputs: MixedBitInputs):
        self.folder, self.inputs = folder, inputs
        self.pipe = with_coreml_weights(inputs.pipe, folder)  # the reference: fp16, as the device rounds it
        self.latents = seeded_normal(latent_shape(self.pipe, len(inputs.prompts)), 0)
        self.reference = self._images()
        self.evaluations = 0
        self.weights: dict[str, _Weight] = {}
        self.values: dict[str, dict[int, torch.Tensor]] = {}  # weight -> width -> value (fp16 is exact)
        self.palettize(LEVELS[0])  # the weights are those palettized at the lowest width

    def palettize(self, bits: int) -> None:
        """Keep each weight's value with the packages palettized whole at ``bits``."""
        first = not self.weights
        params = self._params()
        for package in COMPRESSED:
            component, prefix = PACKAGE_MODULES[package]
            path = self.folder / f"{package}.mlpackage"
            found = package_parameters(getattr(self.pipe, component), palettized_constants(path, bits), prefix,
                                       where=path)
            for param, (const, value) in found.items():
                key = f"{package}:{param}"
                if not const.endswith(PALETTIZED) or not (first or key in self.weights):
                    continue
                if first:
                    self.weights[key] = _Weight(package, param, const.removesuffix(PALETTIZED), int(value.size))
                    self.values[key] = {FP16: params[key].detach().half().clone()}
                self.values[key][bits] = torch.from_numpy(np.asarray(value, np.float16)).reshape(params[key].shape)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {f"{package}:{name}": p for package in COMPRESSED
                for name, p in getattr(self.pipe, PACKAGE_MODULES[package][0]).named_parameters()}

    @torch.no_grad()
    def _images(self) -> np.ndarray:
        return self.pipe(self.inputs.prompts, latents=self.latents.clone(), num_inference_steps=self.inputs.steps,
                         guidance_scale=self.inputs.guidance, output_type="np").images

    @torch.no_grad()
    def psnr(self, bits: dict[str, int]) -> float:
        """Image PSNR against the reference with each weight at ``bits`` (a weight left out stays fp16)."""
        self.evaluations += 1
        params = self._params()
        for key, values in self.values.items():
            params[key].copy_(values[bits.get(key, FP16)])
        return psnr_db(self.reference, self._images())

    def write(self, bits: dict[str, int]) -> float:
        """Palettize the packages in :attr:`folder` to each weight's ``bits``; return the image PSNR of the
        written packages."""
        import coremltools.optimize.coreml as cto

        for package in COMPRESSED:
            names = {w.const: None if bits[k] == FP16 else cto.OpPalettizerConfig(mode="kmeans", nbits=bits[k])
                     for k, w in self.weights.items() if w.package == package}
            if any(names.values()):  # else the package stays as exported
                config = cto.OptimizationConfig(op_name_configs=names)
                rewrite_packages(self.folder, lambda model, c=config: cto.palettize_weights(model, c), (package,))
        self.evaluations += 1
        load_coreml_weights(self.pipe, self.folder)
        return psnr_db(self.reference, self._images())


def mixed_palettize(folder: Path, inputs: MixedBitInputs) -> dict[str, Any]:
    """Palettize ``folder``'s UNet and text encoder (a copy of the fp16 export) in place with the smallest mix of
    widths that meets ``inputs.psnr_db``; write and return the analysis.

    Raises:
        EdgesafeError: when no mix that palettizes a weight reaches the target (one line, the best figure).
    """
    t0 = time.perf_counter()
    target = inputs.psnr_db
    key = _key(folder, inputs)
    previous = read_json(folder / ANALYSIS) if (folder / ANALYSIS).is_file() else {}
    images = _Images(folder, inputs)
    weights = images.weights
    if not weights:
        raise EdgesafeError(f"coreml-mixed: {folder} has no weight to palettize")
    lowest = dict.fromkeys(weights, LEVELS[0])
    tried = {0: images.psnr(lowest)}
    order: list[tuple[str, int]] = []
    alone: dict[str, dict[int, float]] = {}
    reused = previous.get("key") == key and "psnr_db_alone" in (previous.get("weights") or [{}])[0]
    if tried[0] < target:
        if reused:
            alone = {w["name"]: {int(b): v for b, v in w["psnr_db_alone"].items()} for w in previous["weights"]}
        else:
            for bits in LEVELS[1:]:
                images.palettize(bits)
            alone = {k: {bits: images.psnr({k: bits}) for bits in LEVELS} for k in weights}
        best = max(alone, key=lambda k: alone[k][LEVELS[-1]])  # the least error short of fp16 itself
        if alone[best][LEVELS[-1]] < target:
            raise EdgesafeError(_impossible(target, best, LEVELS[-1], alone[best][LEVELS[-1]]))
        for bits in (b for b in LEVELS[1:] if b not in images.values[best]):
            images.palettize(bits)
        order = _widenings(list(weights.values()), alone)
    low, high = 0, len(order)  # low misses the target; high (every weight in fp16) is the reference itself
    while high - low > 1:
        mid = (low + high) // 2
        tried[mid] = images.psnr(_mix(lowest, order[:mid]))
        low, high = (low, mid) if tried[mid] >= target else (mid, high)
    bits = _mix(lowest, order[:high])
    if all(b == FP16 for b in bits.values()):  # errors that do not add up: the bisection ran to the end
        (last, width), = ((k, b) for k, b in _mix(lowest, order[:-1]).items() if b != FP16)
        raise EdgesafeError(_impossible(target, last, width, tried[high - 1]))
    written = images.write(bits)
    numel = sum(w.numel for w in weights.values())
    analysis = {
        "key": key,
        "reused_ranking": reused and bool(alone),
        "target_psnr_db": target,
        "psnr_db": round(written, 3),
        "all_4bit_psnr_db": round(tried[0], 3),
        "widenings": high,
        "weights_at_bits": {str(b): sum(v == b for v in bits.values()) for b in (*LEVELS, FP16)},
        "mean_bits": round(sum(bits[k] * w.numel for k, w in weights.items()) / numel, 3),
        "bytes": sum(w.bytes_at(bits[k]) for k, w in weights.items()),
        "fp16_bytes": sum(w.bytes_at(FP16) for w in weights.values()),
        "weights": [{"name": k, "const": w.const, "numel": w.numel, "bits": bits[k],
                     **({"psnr_db_alone": {str(b): round(v, 3) for b, v in alone[k].items()}} if k in alone else {})}
                    for k, w in weights.items()],
        "searched": {str(k): round(v, 3) for k, v in sorted(tried.items())},
        "evaluations": images.evaluations,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(folder / ANALYSIS, analysis)
    return analysis


def _impossible(target: float, weight: str, bits: int, psnr: float) -> str:
    return (f"coreml-mixed: no palettized mix reaches {target:g} dB against fp16; with only {weight} at {bits} bits "
            f"the images are at {psnr:.1f} dB")


def _widenings(weights: list[_Weight], alone: dict[str, dict[int, float]]) -> list[tuple[str, int]]:
    """Every widening from all weights at the lowest width to all in fp16, ordered greedily by the image error
    (mean squared, from each weight's PSNR alone) removed per byte added; widenings that remove none come last."""
    error = {w.key: {**{b: 10 ** (-alone[w.key][b] / 10) for b in LEVELS}, FP16: 0.0} for w in weights}
    current = {w.key: LEVELS[0] for w in weights}
    order: list[tuple[str, int]] = []
    while True:
        best, best_gain = None, 0.0
        for w in weights:
            now = current[w.key]
            for bits in (b for b in (*LEVELS, FP16) if b > now):
                gain = (error[w.key][now] - error[w.key][bits]) / (w.bytes_at(bits) - w.bytes_at(now))
                if gain > best_gain:
                    best, best_gain = (w.key, bits), gain
        if best is None:
            break
        order.append(best)
        current[best[0]] = best[1]
    return order + [(k, FP16) for k, bits in current.items() if bits != FP16]


def _mix(lowest: dict[str, int], widenings: list[tuple[str, int]]) -> dict[str, int]:
    return {**lowest, **dict(widenings)}


def _key(folder: Path, inputs: MixedBitInputs) -> dict[str, Any]:
    """What the per-weight figures depend on: the fp16 packages, the prompts and sampling, the widths, the
    palettizer (coremltools' version)."""
    import coremltools

    digest = hashlib.sha256()
    for package in (*COMPRESSED, "VAEDecoder"):
        for path in sorted(p for p in (folder / f"{package}.mlpackage").rglob("*") if p.is_file()):
            digest.update(path.relative_to(folder).as_posix().encode())
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return {"packages_sha256": digest.hexdigest(), "prompts": inputs.prompts, "steps": inputs.steps,
            "guidance": inputs.guidance, "levels": list(LEVELS), "coremltools": coremltools.__version__}
