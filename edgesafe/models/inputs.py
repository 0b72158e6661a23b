"""Deterministic model inputs: seeded noise, padded token ids, and a UNet's example inputs."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


def seeded_normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise of ``shape`` from its own generator seeded with ``seed`` (the same on every machine
    and whatever else drew random numbers)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def token_ids(tokenizer, texts: list[str], *, max_length: int | None = None) -> torch.Tensor:
    """Token ids of ``texts`` padded (and truncated) to ``max_length``, by default the tokenizer's own length, as
    Stable Diffusion's text encoder reads them."""
    return tokenizer(texts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.long()


def unet_example_inputs(
    unet: UNet2DConditionModel, *, batch: int = 1, text_length: int | None = None, sample_size: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, timestep, encoder_hidden_states), seeded, of the UNet's configured size unless ``sample_size``."""
    cfg = unet.config
    size = sample_size or (cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0])
    length = text_length or 77
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=gen).to(device)
    hidden = torch.randn(batch, length, cfg.cross_attention_dim, generator=gen).to(device)
    return sample, torch.full((batch,), 500, dtype=torch.long, device=device), hidden
