"""Size and cost of a UNet: parameters, parameter bytes and multiply-accumulates per call."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def unet_example_inputs(
    unet: UNet2DConditionModel, *, batch: int = 1, text_length: int | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, timestep, encoder_hidden_states) of the UNet's configured size, seeded."""
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    length = text_length or 77
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=gen).to(device)
    hidden = torch.randn(batch, length, cfg.cross_attention_dim, generator=gen).to(device)
    return sample, torch.full((batch,), 500, dtype=torch.long, device=device), hidden


def count_macs(unet: UNet2DConditionModel, *, batch: int = 1, text_length: int | None = None) -> int:
    """Multiply-accumulates of one UNet call (FLOPs / 2, as torch's counter reports them).

    Works on a ``meta``-device UNet too, so published architectures are counted without weights.
    """
    device = next(unet.parameters()).device
    inputs = unet_example_inputs(unet, batch=batch, text_length=text_length, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(*inputs)
    return counter.get_total_flops() // 2
