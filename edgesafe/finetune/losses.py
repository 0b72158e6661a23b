"""Lower-level objective L_ft: denoising loss + output distillation + feature distillation.

``DenoisingTask`` turns image-caption batches into noisy latents, timesteps, text states and the
regression target with the teacher's frozen VAE, text encoder and noise schedule, so that any UNet
(teacher, student, or the bilevel copy phi) is scored on the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from torch import nn

from ..models.architectures import block_output_layers
from ..models.inputs import token_ids
from ..models.structure import KeptChannels
from ..recipe import LowerLevel


class DenoisingTask:
    """Encodes image-caption batches with the teacher's frozen VAE and text encoder and draws noise."""

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = token_ids(self.pipe.tokenizer, captions)
        return self.pipe.text_encoder(ids.to(self.pipe.text_encoder.device))[0]

    @torch.no_grad()
    def inputs(self, images: torch.Tensor, captions: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Noisy latents, timesteps, text states and targets (fp32, on the VAE's device). The random draws
        come from ``generator`` on the CPU, so a batch is the same on every device."""
        vae = self.pipe.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(vae.device)
        latents = (dist.mean + dist.std * eps).float() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(vae.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        t = t.to(vae.device)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, t)
        return {"sample": self.scheduler.add_noise(latents, noise, t), "timestep": t,
                "encoder_hidden_states": self.encode_text(captions).float(), "target": target}

    def snr_weights(self, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al., 2023) per sample; ones when ``gamma`` is None."""
        if gamma is None:
            return torch.ones(len(t), device=t.device)
        snr = compute_snr(self.scheduler, t.cpu())
        clipped = torch.clamp(snr, max=gamma)
        weights = clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)
        return weights.to(t.device)

    @staticmethod
    def loss(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
        return nn.functional.mse_loss(pred, inputs["target"])


@contextmanager
def block_features(unet: UNet2DConditionModel) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the output of every down, mid and up block during the forward passes inside the block."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for point in block_output_layers(unet):
        module = unet.get_submodule(point)

        def hook(_module, _args, output, point=point):
            store[point] = output[0] if isinstance(output, tuple) else output

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class FeatureAligner(nn.Module):
    """Maps student block outputs onto the teacher's channels.

    ``kept``: the teacher's features are reduced to the channels pruning kept (``kept_channels``, from the
    student's structure spec; a block it does not name kept all of them); no parameters.
    ``projection``: a learned 1x1 convolution per block lifts the student to the teacher's width.
    """

    def __init__(self, student: UNet2DConditionModel, teacher: UNet2DConditionModel, mode: str,
                 kept_channels: KeptChannels | None = None):
        super().__init__()
        self.mode = mode
        s_layers, t_layers = block_output_layers(student), block_output_layers(teacher)
        self.points = [p for p in s_layers if p in t_layers]
        widths = {p: (student.get_submodule(s_layers[p]).out_channels, teacher.get_submodule(t_layers[p]).out_channels)
                  for p in self.points}
        if mode == "kept":
            kept = kept_channels or {}
            self.kept = {p: torch.tensor(kept.get(p, range(widths[p][1])), dtype=torch.long) for p in self.points}
            bad = [p for p in self.points if len(self.kept[p]) != widths[p][0]]
            if bad:
                raise ValueError(f"kept channels do not match the student's width at {bad[0]}; use 'projection'")
        elif mode == "projection":
            self.proj = nn.ModuleDict({p.replace(".", "_"): nn.Conv2d(s, t, 1) for p, (s, t) in widths.items()})
        else:
            raise ValueError(f"unknown feature alignment {mode!r}")

    def forward(self, student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = []
        for p in self.points:
            s, t = student_feats[p], teacher_feats[p]
            if self.mode == "kept":
                t = t.index_select(1, self.kept[p].to(t.device))
            else:
                s = self.proj[p.replace(".", "_")](s)
            losses.append(nn.functional.mse_loss(s, t))
        return torch.stack(losses).mean()


class LowerObjective:
    """L_ft(student) = w_denoise * denoise + w_out * ||student - teacher||^2 + w_feat * feature distillation."""

    def __init__(self, teacher: UNet2DConditionModel, task: DenoisingTask, weights: LowerLevel,
                 aligner: FeatureAligner | None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.task, self.weights, self.aligner = task, weights, aligner

    @torch.no_grad()
    def teacher_outputs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with block_features(self.teacher) as feats:
            out = self.teacher(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
        return out, dict(feats)

    def __call__(self, student: UNet2DConditionModel, inputs: dict[str, torch.Tensor],
                 teacher: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        t_out, t_feats = teacher
        with block_features(student) as s_feats:
            pred = student(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
        w = self.weights
        snr = self.task.snr_weights(inputs["timestep"], w.min_snr_gamma).to(pred.device)
        denoise = (snr * (pred - inputs["target"]).pow(2).mean(dim=(1, 2, 3))).mean()
        output_kd = nn.functional.mse_loss(pred, t_out)
        feature_kd = self.aligner(s_feats, t_feats) if self.aligner is not None and w.feature_kd else pred.new_zeros(())
        total = w.denoise * denoise + w.output_kd * output_kd + w.feature_kd * feature_kd
        return {"total": total, "denoise": denoise, "output_kd": output_kd, "feature_kd": feature_kd}
