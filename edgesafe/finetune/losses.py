"""The denoising loss of a UNet on image-caption batches, against a frozen VAE and text encoder."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel


class DenoisingTask:
    """Encodes image-caption batches with the teacher's frozen VAE and text encoder and draws noise,
    so that any UNet (teacher or student) can be scored on the same noisy inputs."""

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type

    @torch.no_grad()
    def inputs(self, images: torch.Tensor, captions: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        latents = pipe.vae.encode(images).latent_dist.sample(generator=generator) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, t)
        return {"sample": self.scheduler.add_noise(latents, noise, t), "timestep": t,
                "encoder_hidden_states": pipe.text_encoder(ids)[0], "target": target}

    @staticmethod
    def loss(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
        return torch.nn.functional.mse_loss(pred, inputs["target"])
