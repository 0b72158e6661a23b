"""Core ML export: ML program ``.mlpackage`` files laid out for apple/ml-stable-diffusion's Swift pipeline.

``out/`` holds ``TextEncoder.mlpackage``, ``Unet.mlpackage``, ``VAEDecoder.mlpackage``,
``VAEEncoder.mlpackage``, ``vocab.json`` and ``merges.txt``, with the tensor names and layouts the
Swift pipeline feeds: float ``input_ids``; a UNet taking the guidance batch of 2 with
``encoder_hidden_states`` as (2, C, 1, S) and returning ``noise_pred``; a decoder taking ``z`` (the
Swift code divides latents by SD's 0.18215 before decoding, so the package rescales to this VAE's own
factor) and returning ``image``; an encoder with the image-to-image inputs. On a Mac, compile each
package with ``xcrun coremlcompiler compile X.mlpackage Resources/`` and point the Swift CLI's
``--resource-path`` at ``Resources/`` (with ``vocab.json`` and ``merges.txt`` copied in).

Prediction needs macOS. On other systems :func:`describe_package` validates what can be: the
package loads as a spec, its inputs, outputs and shapes are the expected ones, and its operations
(including the compressed-weight ops a quantizer adds) are listed.
"""

from __future__ import annotations

import copy
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from ..errors import EdgesafeError, first_line
from ..io import atomic_dir
from ..models.inputs import seeded_normal
from .onnx import folder_bytes, image_shape, latent_shape

SWIFT_LATENT_SCALE = 0.18215  # hard-coded in the Swift decoder
IOS17_SPEC_VERSION = 8


class _TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids.to(torch.int32), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _Unet(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)  # (B, C, 1, S) -> (B, S, C)
        return self.unet(sample, timestep, hidden, return_dict=False)[0]


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.rescale = SWIFT_LATENT_SCALE / vae.config.scaling_factor

    def forward(self, z: torch.Tensor):
        return self.vae.decode(z * self.rescale).sample


class _VaeEncoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = vae.config.scaling_factor

    def forward(self, sample, diagonal_noise, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
        mean, logvar = self.vae.encode(sample).latent_dist.parameters.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latent = (mean + std * diagonal_noise) * self.scale
        return sqrt_alphas_cumprod * latent + sqrt_one_minus_alphas_cumprod * noise


def _specs(pipe: StableDiffusionPipeline) -> dict[str, tuple[Callable[[], nn.Module], dict, list[str]]]:
    """Package name -> (module factory, input name -> shape, output names)."""
    length = pipe.tokenizer.model_max_length
    latent2 = latent_shape(pipe, 2)
    latent1 = (1, pipe.vae.config.latent_channels, *latent2[2:])
    return {
        "TextEncoder": (lambda: _TextEncoder(pipe.text_encoder), {"input_ids": (1, length)},
                        ["last_hidden_state", "pooled_outputs"]),
        "Unet": (lambda: _Unet(pipe.unet),
                 {"sample": latent2, "timestep": (2,),
                  "encoder_hidden_states": (2, pipe.unet.config.cross_attention_dim, 1, length)}, ["noise_pred"]),
        "VAEDecoder": (lambda: _VaeDecoder(pipe.vae), {"z": latent1}, ["image"]),
        "VAEEncoder": (lambda: _VaeEncoder(pipe.vae),
                       {"sample": image_shape(pipe, 1), "diagonal_noise": latent1, "noise": latent1,
                        "sqrt_alphas_cumprod": (1, 1), "sqrt_one_minus_alphas_cumprod": (1, 1)}, ["latent"]),
    }


def _example(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name == "input_ids":
        return torch.zeros(shape)
    if name == "timestep":
        return torch.full(shape, 500.0)
    return seeded_normal(shape, 0).clamp(-1, 1)


def _convert(module: nn.Module, inputs: dict[str, tuple[int, ...]], outputs: list[str]):
    import coremltools as ct

    examples = tuple(_example(n, s) for n, s in inputs.items())
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), examples, strict=False)
    return ct.convert(
        traced, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT16,
        inputs=[ct.TensorType(name=n, shape=s, dtype=np.float32) for n, s in inputs.items()],
        outputs=[ct.TensorType(name=n) for n in outputs],
    )


def _every_finite_weight(model, op_config):
    """A config compressing every weight with ``op_config`` but the constants that hold infinities (CLIP's
    causal attention mask at 77 tokens is large enough to count as a weight), which neither k-means nor a
    linear scale can represent."""
    import coremltools.optimize.coreml as cto

    skip = {name: None for name, meta in cto.get_weights_metadata(model, weight_threshold=2048).items()
            if not np.isfinite(meta.val).all()}
    return cto.OptimizationConfig(global_config=op_config, op_name_configs=skip)


def linear8(model):
    """``model`` with linear symmetric INT8 weights."""
    import coremltools.optimize.coreml as cto

    op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
    return cto.linear_quantize_weights(model, _every_finite_weight(model, op_config))


def palettize(nbits: int) -> Callable:
    """A function palettizing every weight of a model to ``nbits`` by k-means (one look-up table per weight)."""

    def apply(model):
        import coremltools.optimize.coreml as cto

        op_config = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits)
        return cto.palettize_weights(model, _every_finite_weight(model, op_config))

    return apply


COMPRESSED = ("Unet", "TextEncoder")  # the packages a weight quantizer rewrites; the VAE stays fp16


def rewrite_packages(folder: Path, compress: Callable, names: tuple[str, ...] = COMPRESSED) -> None:
    """Replace each package ``names`` of ``folder`` by ``compress(package)``."""
    import coremltools as ct

    for name in names:
        path = folder / f"{name}.mlpackage"
        model = compress(ct.models.MLModel(str(path), skip_model_load=True))
        shutil.rmtree(path)
        model.save(str(path))


def _every_package(compress: Callable) -> Callable[[Path, Any], None]:
    return lambda folder, _: rewrite_packages(folder, compress)


def _mixed(folder: Path, inputs: Any) -> None:
    from .palettization import mixed_palettize

    mixed_palettize(folder, inputs)


COREML_QUANTIZERS: dict[str, Callable[[Path, Any], None]] = {
    "coreml-linear8": _every_package(linear8),
    "coreml-palettize4": _every_package(palettize(4)),
    "coreml-palettize6": _every_package(palettize(6)),
    "coreml-palettize8": _every_package(palettize(8)),
    "coreml-mixed": _mixed,
}
"""Variant -> what rewrites the packages of a copy of the fp16 export in place, given the target's prepared
inputs (``coreml-mixed``'s :class:`~.palettization.MixedBitInputs`)."""


def export_coreml(pipe: StableDiffusionPipeline, out: Path) -> Path:
    """Convert every component of ``pipe`` to ``out/<Name>.mlpackage`` (fp16 compute; ``out`` replaced
    whole once all succeed)."""
    with atomic_dir(Path(out)) as partial:
        for name, (factory, inputs, outputs) in _specs(pipe).items():
            _convert(factory(), inputs, outputs).save(str(partial / f"{name}.mlpackage"))
        pipe.tokenizer.save_vocabulary(str(partial))
    return Path(out)


def quantize_coreml(src: Path, dst: Path, method: str, inputs: Any = None) -> Path:
    """Copy the Core ML export ``src`` to ``dst`` with ``method`` applied to the UNet and text encoder (a
    ``coreml-mixed`` analysis already in ``dst`` is carried over for the search to reuse)."""
    from .palettization import ANALYSIS

    with atomic_dir(dst, copy_from=src) as partial:
        if (dst / ANALYSIS).is_file():
            shutil.copy2(dst / ANALYSIS, partial / ANALYSIS)
        COREML_QUANTIZERS[method](partial, inputs)
    return dst


def describe_package(path: Path) -> dict:
    """Inputs, outputs, deployment spec version, operation counts and size of an ``.mlpackage``."""
    import coremltools as ct

    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as exc:  # coremltools raises plain Exceptions for unreadable packages
        raise EdgesafeError(f"{path}: not a readable Core ML package ({first_line(exc)})") from None
    spec = model.get_spec()

    def shapes(features) -> dict[str, list[int]]:
        return {f.name: list(f.type.multiArrayType.shape) for f in features}

    ops: Counter[str] = Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            ops.update(op.type for op in block.operations)
    return {
        "inputs": shapes(spec.description.input),
        "outputs": shapes(spec.description.output),
        "spec_version": spec.specificationVersion,
        "ml_program": spec.WhichOneof("Type") == "mlProgram",
        "ops": dict(sorted(ops.items())),
        "bytes": folder_bytes(path),
    }


def validate_coreml(pipe: StableDiffusionPipeline, folder: Path) -> dict:
    """Check every package's spec against what the Swift pipeline feeds; raise on the first mismatch.

    Returns the descriptions plus ``predicted``: whether prediction ran (only on macOS)."""
    report: dict = {"packages": {}, "predicted": False,
                    "prediction_note": "prediction needs macOS; specs validated on " + sys.platform}
    for name, (_, inputs, outputs) in _specs(pipe).items():
        desc = describe_package(folder / f"{name}.mlpackage")
        want = {k: list(v) for k, v in inputs.items()}
        if desc["inputs"] != want:
            raise EdgesafeError(f"{folder / name}.mlpackage: inputs {desc['inputs']} != expected {want}")
        if list(desc["outputs"]) != outputs:
            raise EdgesafeError(f"{folder / name}.mlpackage: outputs {list(desc['outputs'])} != expected {outputs}")
        if not desc["ml_program"] or desc["spec_version"] < IOS17_SPEC_VERSION:
            raise EdgesafeError(f"{folder / name}.mlpackage: not an iOS 17 ML program (spec {desc['spec_version']})")
        report["packages"][name] = desc
    for extra in ("vocab.json", "merges.txt"):
        if not (folder / extra).is_file():
            raise EdgesafeError(f"{folder}: missing {extra} for the Swift tokenizer")
    return report


PACKAGE_MODULES = {"TextEncoder": ("text_encoder", "text_encoder"), "Unet": ("unet", "unet"),
                   "VAEDecoder": ("vae", "vae")}
"""Package -> (pipeline component, the wrapper's attribute name that prefixes its weights' names)."""


def _program(path: Path):
    """The MIL program of the package at ``path`` and its model."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    if not path.is_dir():
        raise EdgesafeError(f"{path}: missing Core ML package")
    model = ct.models.MLModel(str(path), skip_model_load=True)
    return _convert_model_spec_to_pymil_prog(model, model.get_spec().specificationVersion, load_milproto), model


def _constants(prog) -> dict[str, np.ndarray]:
    """Every constant of a MIL program, compressed ones decompressed to dense float (the values the device
    computes with), by op name. Each compressed-weight op is decompressed where it stands (coremltools'
    ``decompress_weights`` converts the whole program again, about 10x slower); the look-up tables, indices
    and scales it reads are left out."""
    consts: dict[str, np.ndarray] = {}
    parts: set[str] = set()  # the inputs of compressed-weight ops

    def visit(block) -> None:
        for op in block.operations:
            for inner in op.blocks:
                visit(inner)
            if op.op_type.startswith("constexpr_"):
                consts[op.name] = op.materialized_val_inference()
                parts.update(var.op.name for var in op.inputs.values() if var.op is not None)
            elif op.op_type == "const" and isinstance(op.val.val, np.ndarray):
                consts[op.name] = op.val.val

    for function in prog.functions.values():
        visit(function)
    return {name: value for name, value in consts.items() if name not in parts}


def package_constants(path: Path) -> dict[str, np.ndarray]:
    """:func:`_constants` of the package at ``path``."""
    return _constants(_program(path)[0])


def palettized_constants(path: Path, nbits: int) -> dict[str, np.ndarray]:
    """The constants the package at ``path`` would hold palettized by :func:`palettize` ``(nbits)``, without
    writing it: coremltools' palettization pass on the program alone (writing converts the whole program again,
    most of the time palettizing takes)."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    prog, model = _program(path)
    config = _every_finite_weight(model, cto.OpPalettizerConfig(mode="kmeans", nbits=nbits))
    palettizer = PASS_REGISTRY["compression::palettize_weights"]
    palettizer.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    return _constants(_apply_graph_pass(model, palettizer, return_pymil_prog=True))


PALETTIZED, QUANTIZED = "_palettized", "_quantized"
"""What coremltools appends to the name of a constant it palettized / linearly quantized."""


def package_parameters(module: nn.Module, consts: dict[str, np.ndarray], prefix: str, names: list[str] | None = None,
                       *, where: Path | str = "the package") -> dict[str, tuple[str, np.ndarray]]:
    """The constants of a package (``consts``, from ``where``) that hold ``module``'s parameters (``names``,
    default all): parameter -> (constant's name, its dense value).

    The converter names a weight's constant after its parameter (``unet.conv_in.weight`` ->
    ``unet_conv_in_weight_to_fp16[_palettized]``). A constant it computed from a parameter (CLIP's position
    embeddings gathered at fixed positions become ``position_embeddings_to_fp16``) is matched by value: the
    parameter of the same size it is closest to. A compressed constant matching no parameter is an error,
    since a measurement would silently miss it."""
    consts = {name: value for name, value in consts.items() if "_to_fp16" in name}
    params = dict(module.named_parameters())
    params = {n: params[n] for n in names} if names is not None else params
    by_stem = {name.partition("_to_fp16")[0]: name for name in consts}
    assigned: dict[str, str] = {}  # parameter -> constant
    for name, param in params.items():
        const = by_stem.get(f"{prefix}_{name.replace('.', '_')}")
        if const is not None and consts[const].size == param.numel():
            assigned[name] = const
    used = set(assigned.values())
    for const in (c for c in consts if c.endswith((PALETTIZED, QUANTIZED)) and c not in used):
        value = torch.from_numpy(np.asarray(consts[const], np.float32)).flatten()
        errors = {name: float((value - p.detach().flatten()).norm() / p.detach().norm().clamp(min=1e-12))
                  for name, p in params.items() if name not in assigned and p.numel() == value.numel()}
        best = min(errors, key=errors.get, default=None)
        if best is None or errors[best] > 0.25:
            raise EdgesafeError(f"{where}: compressed weight {const} matches no parameter of the {prefix}")
        assigned[best] = const
    return {name: (const, consts[const]) for name, const in assigned.items()}


@torch.no_grad()
def load_package_weights(module: nn.Module, path: Path, prefix: str, names: list[str] | None = None) -> float:
    """Overwrite ``module``'s parameters (``names``, default all) with the dense values of the package at
    ``path`` (:func:`package_parameters`); return the share of their elements taken from it."""
    params = dict(module.named_parameters())
    found = package_parameters(module, package_constants(path), prefix, names, where=path)
    for name, (_, value) in found.items():
        params[name].copy_(torch.from_numpy(np.asarray(value, np.float32)).reshape(params[name].shape))
    total = sum(params[n].numel() for n in (names if names is not None else params))
    return round(sum(params[n].numel() for n in found) / max(1, total), 4)


def with_coreml_weights(pipe: StableDiffusionPipeline, folder: Path) -> StableDiffusionPipeline:
    """A copy of ``pipe`` (its own text encoder, UNet and VAE) computing with the weights of the Core ML export
    in ``folder`` (:func:`load_coreml_weights`); ``pipe`` is left as it was."""
    device = copy.copy(pipe)
    for component in ("unet", "text_encoder", "vae"):
        setattr(device, component, copy.deepcopy(getattr(pipe, component)))
    load_coreml_weights(device, folder)
    return device


def load_coreml_weights(pipe: StableDiffusionPipeline, folder: Path) -> dict[str, float]:
    """Put the weights of the Core ML export in ``folder`` into ``pipe``'s text encoder, UNet and VAE decoder,
    decompressed (palettized or linear-quantized weights become the fp16 values the device computes with),
    so PyTorch measures the quality and safety of what the device runs. Returns, per package, the share of
    the component's parameter elements taken from it (see :func:`load_package_weights`)."""
    coverage = {}
    for package, (component, prefix) in PACKAGE_MODULES.items():
        module = getattr(pipe, component)
        names = None
        if component == "vae":  # the decoder package holds the decoder's half of the VAE
            names = [n for n, _ in module.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
        coverage[package] = load_package_weights(module, Path(folder) / f"{package}.mlpackage", prefix, names)
    return coverage
