"""Published UNet architectures, as diffusers config values, for building random-weight stand-ins.

No weights can be downloaded here; these configs (copied from the public model cards'
``unet/config.json``) let edgesafe count MACs, calibrate device estimators and test pruning on the
real shapes.
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd-1.5": dict(
        sample_size=64, in_channels=4, out_channels=4, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "sd-2.1-base": dict(
        sample_size=64, in_channels=4, out_channels=4, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    ),
}

TEXT_LENGTH = {"sd-1.5": 77, "sd-2.1-base": 77}


def build_unet(name: str, *, device: str = "cpu") -> UNet2DConditionModel:
    """A randomly initialised UNet of a published architecture (``device='meta'`` allocates nothing)."""
    if name not in UNET_CONFIGS:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(UNET_CONFIGS)}")
    if device == "meta":
        import torch

        with torch.device("meta"):
            return UNet2DConditionModel(**UNET_CONFIGS[name])
    return UNet2DConditionModel(**UNET_CONFIGS[name])
