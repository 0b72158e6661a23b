"""Parity of an exported folder (ONNX, OpenVINO) against the PyTorch pipeline it came from.

Per component: max-abs and relative error of its first output on fixed inputs (prompts the model is meant
for, seeded latents). End to end: PSNR of the images generated from the same prompts and initial latents.
An artefact past the recipe's tolerance for its precision raises :class:`ParityError` with the figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from ..data import Batches
from ..errors import EdgesafeError
from ..models.inputs import seeded_normal, token_ids
from ..recipe import Recipe, Tolerance
from .onnx import image_shape, latent_shape
from .runtime import ExportedPipeline, OnnxPipeline


class ParityError(EdgesafeError):
    """An exported artefact whose outputs are further from PyTorch than its tolerance allows."""


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two images in [0, 1] (capped at 200 dB for identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 200.0 if mse == 0 else min(200.0, 10 * math.log10(1.0 / mse))


def data_captions(recipe: Recipe, count: int) -> list[str]:
    """``count`` captions of the recipe's data (without the unwanted concepts when the data excludes them)."""
    return Batches(recipe, batch_size=count, resolution=32, seed=recipe.seed)(0)[1]


def parity_prompts(recipe: Recipe) -> list[str]:
    """The prompts an artefact is judged on: a caption of the recipe's data and, where the recipe has concepts,
    its first concept prompt (the erased path), else a second caption."""
    concept = [recipe.concepts[0].prompts[0]] if recipe.concepts else []
    return (concept + data_captions(recipe, 2))[:2]


@torch.no_grad()
def reference_inputs(pipe: StableDiffusionPipeline, prompts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Fixed inputs of each component: tokenized prompts, their embeddings, seeded latents and images."""
    ids = token_ids(pipe.tokenizer, prompts)
    hidden = pipe.text_encoder(ids)[0]
    latents = seeded_normal(latent_shape(pipe, len(ids)), 1)
    vae = pipe.vae.config
    return {
        "text_encoder": {"input_ids": ids},
        "unet": {"sample": latents, "timestep": torch.tensor(500.0), "encoder_hidden_states": hidden},
        "vae_decoder": {"latent_sample": latents[:, : vae.latent_channels] / vae.scaling_factor},
        "vae_encoder": {"sample": seeded_normal(image_shape(pipe, len(ids)), 2).clamp(-1, 1)},
    }


@torch.no_grad()
def _torch_output(pipe: StableDiffusionPipeline, name: str, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    if name == "text_encoder":
        return pipe.text_encoder(feeds["input_ids"])[0].numpy()
    if name == "unet":
        return pipe.unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]).sample.numpy()
    if name == "vae_decoder":
        return pipe.vae.decode(feeds["latent_sample"]).sample.numpy()
    return pipe.vae.encode(feeds["sample"]).latent_dist.parameters.numpy()


def component_parity(pipe: StableDiffusionPipeline, runner: ExportedPipeline,
                     prompts: list[str]) -> dict[str, dict[str, float]]:
    """``{component: {max_abs, rel}}``: rel is max-abs over the reference's largest magnitude."""
    inputs = reference_inputs(pipe, prompts)
    figures = {}
    for name in runner.sessions:
        ref = _torch_output(pipe, name, inputs[name])
        got = runner.run(name, **{k: v.numpy() for k, v in inputs[name].items()})[0]
        err = float(np.abs(got - ref).max())
        figures[name] = {"max_abs": err, "rel": err / max(float(np.abs(ref).max()), 1e-12)}
    return figures


def generate_pair(
    pipe: StableDiffusionPipeline, runner: ExportedPipeline, prompts: list[str], *, steps: int = 20,
    guidance: float = 5.0, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(PyTorch images, ONNX images) for ``prompts`` from the same seeded initial latents."""
    latents = seeded_normal(latent_shape(pipe, len(prompts)), seed)
    ref = pipe(prompts, latents=latents.clone(), num_inference_steps=steps, guidance_scale=guidance,
               output_type="np").images
    got = runner(prompts, latents=latents.numpy(), num_inference_steps=steps, guidance_scale=guidance)
    return ref, got


def pipeline_parity(pipe: StableDiffusionPipeline, runner: ExportedPipeline, prompts: list[str], *, steps: int = 20,
                    guidance: float = 5.0) -> dict:
    """Component errors and end-to-end image PSNR on ``prompts`` of an exported pipeline against ``pipe``."""
    ref, got = generate_pair(pipe, runner, prompts, steps=steps, guidance=guidance)
    return {"components": component_parity(pipe, runner, prompts), "image_psnr_db": psnr_db(ref, got),
            "files": sorted(runner.sessions)}


def onnx_parity(pipe: StableDiffusionPipeline, folder: Path, prompts: list[str], *, steps: int = 20,
                guidance: float = 5.0) -> dict:
    """:func:`pipeline_parity` of an exported ONNX folder."""
    return pipeline_parity(pipe, OnnxPipeline(folder), prompts, steps=steps, guidance=guidance)


def check_parity(label: str, figures: dict, tolerance: Tolerance, *, max_abs_of: tuple[str, ...] = ("unet",)) -> None:
    """Raise :class:`ParityError` naming ``label`` and the figures when they are past ``tolerance``."""
    problems = []
    if tolerance.psnr_db is not None and figures["image_psnr_db"] < tolerance.psnr_db:
        problems.append(f"image PSNR {figures['image_psnr_db']:.1f} dB < {tolerance.psnr_db:g} dB")
    if tolerance.max_abs is not None:
        for name in max_abs_of:
            err = figures["components"].get(name, {}).get("max_abs")
            if err is not None and err > tolerance.max_abs:
                problems.append(f"{name} max-abs error {err:.3g} > {tolerance.max_abs:g}")
    if problems:
        raise ParityError(f"{label}: parity failed: {'; '.join(problems)}")
