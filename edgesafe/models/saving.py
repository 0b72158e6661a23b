"""Writing a student pipeline: the teacher's other components as they are, and the new UNet.

Only the UNet changes in compression, so the text encoder, VAE, tokenizer and scheduler folders are
linked (or copied) from the source folder rather than loaded and saved again: a stage that rewrites
the UNet needs none of them in memory. ``model_index.json`` names the UNet's class: diffusers'
``UNet2DConditionModel`` when its config describes it (unpruned, or BK-SDM block removal), else
edgesafe's ``PrunedUNet2DConditionModel``, which plain diffusers imports and loads where edgesafe is
installed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from diffusers import UNet2DConditionModel

from ..io import write_json
from .structure import KeptChannels, PrunedUNet2DConditionModel, is_reshaped, save_unet


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_student(unet: UNet2DConditionModel, source: Path, folder: Path, *,
                 kept_channels: KeptChannels | None = None) -> dict[str, Any]:
    """Write ``folder`` as ``source``'s pipeline with ``unet`` as its UNet (and the teacher channels it kept, for
    its structure spec); returns the UNet's structure spec."""
    source, folder = Path(source), Path(folder)
    index = json.loads((source / "model_index.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in index.items():
        if name.startswith("_") or name == "unet" or not isinstance(entry, list) or entry[0] is None:
            continue
        shutil.rmtree(folder / name, ignore_errors=True)
        shutil.copytree(source / name, folder / name, copy_function=_link_or_copy)
    shutil.rmtree(folder / "unet", ignore_errors=True)
    spec = save_unet(unet, folder / "unet", kept_channels=kept_channels)
    index["unet"] = (["diffusers", "UNet2DConditionModel"] if not is_reshaped(spec)
                     else [PrunedUNet2DConditionModel.__module__, PrunedUNet2DConditionModel.__name__])
    write_json(folder / "model_index.json", index)
    return spec
