"""Published Stable Diffusion architectures, as config values, for building random-weight stand-ins.

No weights can be downloaded here; these configs (the values of the public model cards'
``unet/``, ``vae/``, ``text_encoder/`` and ``scheduler/`` configs) let edgesafe count MACs,
calibrate device estimators, and run every stage on the real shapes (see :mod:`.standin`).
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel

from ..errors import ModelLoadError

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

_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

VAE_CONFIGS: dict[str, dict[str, Any]] = {"sd-1.5": _SD_VAE, "sd-2.1-base": _SD_VAE}

TEXT_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd-1.5": dict(  # CLIP ViT-L/14's text tower
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ),
    "sd-2.1-base": dict(  # OpenCLIP ViT-H/14's text tower, penultimate layer (23 of 24)
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
    ),
}

SCHEDULER_CONFIG: dict[str, Any] = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
"""PNDM, as both SD 1.5 and SD 2.1-base ship it (epsilon prediction)."""

TEXT_LENGTH = {"sd-1.5": 77, "sd-2.1-base": 77}


def check_architecture(name: str) -> None:
    """One clear error for a name that is not a published architecture edgesafe knows."""
    if name not in UNET_CONFIGS:
        raise ModelLoadError(f"unknown architecture {name!r}; known: {', '.join(UNET_CONFIGS)}")


def build_unet(name: str, *, device: str = "cpu") -> UNet2DConditionModel:
    """A randomly initialised UNet of a published architecture (``device='meta'`` allocates nothing)."""
    check_architecture(name)
    if device == "meta":
        import torch

        with torch.device("meta"):
            return UNet2DConditionModel(**UNET_CONFIGS[name])
    return UNet2DConditionModel(**UNET_CONFIGS[name])


def block_output_layers(unet: UNet2DConditionModel) -> dict[str, str]:
    """For each block (``down_blocks.i``, ``mid_block``, ``up_blocks.i``), the convolution whose output
    channels are the block's output channels (its resampler, else its last ResNet's ``conv2``)."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    layers = {}
    for name, block in blocks:
        if getattr(block, "downsamplers", None):
            layers[name] = f"{name}.downsamplers.0.conv"
        elif getattr(block, "upsamplers", None):
            layers[name] = f"{name}.upsamplers.0.conv"
        else:
            layers[name] = f"{name}.resnets.{len(block.resnets) - 1}.conv2"
    return layers
