"""Random-weight stand-ins of published Stable Diffusion folders, for running every stage at real size
without a model hub.

``write_standin("sd-1.5", folder)`` writes a diffusers pipeline folder with the published
architecture of each component (UNet, VAE, CLIP text encoder, PNDM scheduler) and random weights,
and a ``CLIPTokenizer`` with a small word-level vocabulary (any text still tokenizes, byte by
byte). ``write_captioned_images`` writes an image folder with ``.txt`` captions (data kind
``folder``), drawn from the tiny-shapes world and upscaled. Both load with plain diffusers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from ..io import atomic_dir
from .architectures import (
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIGS,
    TEXT_LENGTH,
    UNET_CONFIGS,
    VAE_CONFIGS,
    check_architecture,
)


def write_standin(arch: str, folder: Path, *, seed: int = 0) -> Path:
    """Write a random-weight pipeline of architecture ``arch`` (``sd-1.5``, ``sd-2.1-base``) into ``folder``."""
    from ..zoo.tiny_shapes import world
    from ..zoo.tiny_shapes.tokenizer import write_tokenizer

    check_architecture(arch)
    folder = Path(folder)
    torch.manual_seed(seed)
    with atomic_dir(folder) as tmp:
        tokenizer = write_tokenizer(world.vocabulary(), tmp / "tokenizer", max_length=TEXT_LENGTH[arch])
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**VAE_CONFIGS[arch]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIGS[arch])),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**UNET_CONFIGS[arch]),
            scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
    return folder


def write_captioned_images(folder: Path, *, count: int = 24, size: int = 256, seed: int = 0) -> Path:
    """``count`` tiny-shapes images upscaled to ``size`` px, each with a same-named ``.txt`` caption."""
    from ..zoo.tiny_shapes import world

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        images, captions, _ = world.sample_batch(count, np.random.default_rng(seed))
        for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
            pixels = ((image.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(tmp / f"{i:04d}.png")
            (tmp / f"{i:04d}.txt").write_text(caption + "\n")
    return folder
