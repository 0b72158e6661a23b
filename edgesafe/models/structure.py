"""Pickle-free persistence of a structurally pruned UNet.

A pruned UNet keeps its diffusers class and config, but its layers no longer match the config's
widths, so ``from_pretrained`` cannot rebuild it. We save the weights as safetensors (the usual
``save_pretrained`` folder) plus ``edgesafe_structure.json``: the layers whose shape differs from
what the config builds (channel counts, GroupNorm groups, attention heads), removed blocks, and
which teacher channels each block output kept (for feature distillation; :func:`read_structure` gives
them to whoever needs them). Loading builds the config's UNet on the meta device, resizes those layers,
then loads the weights strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# A model_index.json naming ["edgesafe.models.structure", "PrunedUNet2DConditionModel"] (diffusers' own way of
# naming a class from another library) makes diffusers import this module and look up here the base classes
# whose loading methods it knows.
from diffusers import (
    ModelMixin,  # noqa: F401, I001
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelLoadError, first_line
from ..io import write_json

SPEC_NAME = "edgesafe_structure.json"
FORMAT = 1

KeptChannels = dict[str, list[int]]
"""For each block output (a point of ``models.architectures.block_output_layers``), the teacher's channels a
pruned UNet kept."""


def _describe(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in": module.in_channels, "out": module.out_channels}
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in": module.in_features, "out": module.out_features}
    if isinstance(module, nn.GroupNorm):
        return {"type": "GroupNorm", "groups": module.num_groups, "channels": module.num_channels}
    if isinstance(module, nn.LayerNorm):
        return {"type": "LayerNorm", "shape": list(module.normalized_shape)}
    if isinstance(module, Attention):
        return {"type": "Attention", "heads": module.heads}
    if isinstance(module, Downsample2D | Upsample2D):
        return {"type": type(module).__name__, "channels": module.channels, "out": module.out_channels}
    return None


def _layers(unet: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: d for name, m in unet.named_modules() if (d := _describe(m)) is not None}


def structure_spec(unet: UNet2DConditionModel, kept_channels: KeptChannels | None = None) -> dict[str, Any]:
    """The layers of ``unet`` that differ from a fresh build of its config, the ones removed, and the teacher
    channels its block outputs kept."""
    with torch.device("meta"):
        fresh = UNet2DConditionModel.from_config(unet.config)
    now, base = _layers(unet), _layers(fresh)
    return {
        "format": FORMAT,
        "layers": {name: d for name, d in now.items() if base.get(name) != d},
        "removed": sorted(_removed_blocks(fresh, unet)),
        "kept_channels": kept_channels or {},
    }


def _removed_blocks(fresh: nn.Module, unet: nn.Module) -> list[str]:
    """Dotted names of sub-modules of ``fresh`` that ``unet`` no longer has (BK-SDM block removal)."""
    have = {name for name, _ in unet.named_modules()}
    gone = [name for name, _ in fresh.named_modules() if name and name not in have]
    return [n for n in gone if n.rpartition(".")[0] in have]


def _resize(module: nn.Module, d: dict[str, Any]) -> nn.Module:
    kind = d["type"]
    if kind == "Conv2d":
        m: nn.Conv2d = module
        return nn.Conv2d(d["in"], d["out"], m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                         m.bias is not None, m.padding_mode)
    if kind == "Linear":
        return nn.Linear(d["in"], d["out"], bias=module.bias is not None)
    if kind == "GroupNorm":
        return nn.GroupNorm(d["groups"], d["channels"], module.eps, module.affine)
    if kind == "LayerNorm":
        return nn.LayerNorm(d["shape"], module.eps, module.elementwise_affine, bias=module.bias is not None)
    if kind == "Attention":
        module.heads = d["heads"]
        return module
    if kind in ("Downsample2D", "Upsample2D"):
        module.channels, module.out_channels = d["channels"], d["out"]
        return module
    raise ModelLoadError(f"unknown layer type {kind!r} in {SPEC_NAME}")


def _set(root: nn.Module, dotted: str, new: nn.Module | None) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if new is None:
        if isinstance(parent, nn.ModuleList):
            del parent[int(leaf)]
        else:
            setattr(parent, leaf, None)
    elif isinstance(parent, nn.ModuleList):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def _natural(name: str) -> list[Any]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


class PrunedUNet2DConditionModel(UNet2DConditionModel):
    """A structurally pruned ``UNet2DConditionModel``: the same class, with ``from_pretrained`` and
    ``save_pretrained`` reading and writing the structure spec beside the config and weights.

    A pipeline folder whose ``model_index.json`` names ``["edgesafe.models.structure",
    "PrunedUNet2DConditionModel"]`` loads with plain ``StableDiffusionPipeline.from_pretrained`` wherever
    edgesafe is installed: diffusers imports the module a component names and calls this class's
    ``from_pretrained``; its ``save_pretrained`` writes that same entry, with the kept channels of the spec
    it was loaded with.
    """

    kept_channels: KeptChannels | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **_ignored: Any) -> PrunedUNet2DConditionModel:
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        return load_unet(folder, torch_dtype=torch_dtype or torch.float32)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        save_unet(self, Path(save_directory), kept_channels=self.kept_channels, **kwargs)


def is_reshaped(spec: dict[str, Any]) -> bool:
    """Whether a structure spec changes the config's layers (so plain diffusers cannot rebuild the UNet)."""
    return bool(spec["layers"] or spec["removed"])


def apply_structure(config: dict[str, Any], spec: dict[str, Any]) -> PrunedUNet2DConditionModel:
    """An empty (meta-device) UNet of ``config`` reshaped by ``spec``."""
    if spec.get("format") != FORMAT:
        raise ModelLoadError(f"{SPEC_NAME}: unsupported format {spec.get('format')!r} (expected {FORMAT})")
    with torch.device("meta"):
        unet = PrunedUNet2DConditionModel.from_config(config)
        # deeper names first, so deleting list items does not shift the ones still to delete
        for name in sorted(spec.get("removed", []), key=_natural, reverse=True):
            _set(unet, name, None)
        for name, d in spec["layers"].items():
            try:
                module = unet.get_submodule(name)
            except AttributeError:
                raise ModelLoadError(f"{SPEC_NAME}: layer {name!r} does not exist in this UNet") from None
            replacement = _resize(module, d)
            if replacement is not module:
                _set(unet, name, replacement)
    return unet


def save_unet(unet: UNet2DConditionModel, folder: Path, *, kept_channels: KeptChannels | None = None,
              **kwargs: Any) -> dict[str, Any]:
    """``save_pretrained`` (safetensors) plus the structure spec, which it returns; loadable with
    :func:`load_unet` or :class:`PrunedUNet2DConditionModel`.

    Args:
        unet: the UNet to save, pruned or not.
        folder: the UNet folder to write (``config.json``, weights, ``edgesafe_structure.json``).
        kept_channels: the teacher channels its block outputs kept (from pruning), stored in the spec.
    """
    kwargs["safe_serialization"] = True
    UNet2DConditionModel.save_pretrained(unet, folder, **kwargs)
    spec = structure_spec(unet, kept_channels)
    write_json(Path(folder) / SPEC_NAME, spec)
    return spec


def read_structure(folder: Path) -> dict[str, Any]:
    """The structure spec of a UNet folder (for a plain diffusers UNet: nothing reshaped, nothing kept).

    Raises:
        ModelLoadError: an unreadable spec.
    """
    path = Path(folder) / SPEC_NAME
    if not path.is_file():
        return {"format": FORMAT, "layers": {}, "removed": [], "kept_channels": {}}
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable structure spec ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: unsupported structure spec (expected format {FORMAT})")
    return {"layers": {}, "removed": [], "kept_channels": {}, **spec}


def load_unet(folder: Path, *, torch_dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Load a UNet folder, pruned (with a structure spec) or not.

    Raises:
        ModelLoadError: a folder that is not a loadable UNet, or weights that do not match its spec.
    """
    folder = Path(folder)
    spec_path = folder / SPEC_NAME
    if not spec_path.is_file():
        try:
            return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{folder}: cannot load UNet ({first_line(exc)})") from None
    spec = read_structure(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder}: unreadable config ({exc})") from None
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unet = apply_structure(config, spec).to_empty(device="cpu")
    weights = folder / "diffusion_pytorch_model.safetensors"
    try:
        state = load_file(str(weights))
        unet.load_state_dict(state, strict=True)
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{weights}: does not match {SPEC_NAME} ({first_line(exc)})") from None
    unet.kept_channels = spec["kept_channels"]  # written again by save_pretrained
    return (unet if torch_dtype == torch.float32 else unet.to(torch_dtype)).eval()
