"""Block removal in the manner of BK-SDM (Kim et al., 2023), as a diffusers config edit plus weight copying.

- ``base``: one ResNet(+attention) fewer in every down stage and in every up stage (the teacher's
  second down layer and second up layer go), the mid-block kept;
- ``small``: ``base`` without the mid-block;
- ``tiny``: ``small`` without the innermost stage (its down block and the matching up block).

The result is a plain ``UNet2DConditionModel`` whose config says so (``layers_per_block``,
``mid_block_type``, the stage lists), so it loads with ``from_pretrained``; its weights are the
teacher's for every block it keeps.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..errors import BudgetError

VARIANTS = ("base", "small", "tiny")


def _per_stage(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def bk_sdm_config(config: dict[str, Any], variant: str) -> dict[str, Any]:
    """The teacher's config edited to the BK-SDM ``variant``."""
    if variant not in VARIANTS:
        raise BudgetError(f"unknown block-removal variant {variant!r}; known: {', '.join(VARIANTS)}")
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    n = len(cfg["down_block_types"])
    layers = _per_stage(cfg["layers_per_block"], n)
    if len(set(layers)) != 1:
        raise BudgetError("block removal needs the same layers_per_block in every stage")
    cfg["layers_per_block"] = max(1, layers[0] - 1)
    if variant in ("small", "tiny"):
        cfg["mid_block_type"] = None
    if variant == "tiny":
        if n < 3:
            raise BudgetError("the tiny variant needs at least three stages")
        cfg["down_block_types"] = list(cfg["down_block_types"])[:-1]
        cfg["up_block_types"] = list(cfg["up_block_types"])[1:]
        for key in ("block_out_channels", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
            if isinstance(cfg.get(key), list | tuple):
                cfg[key] = list(cfg[key])[:-1]
    return cfg


def _source_key(key: str, *, old_layers: int, new_layers: int, up_offset: int) -> str:
    """Which teacher weight a student weight is copied from."""
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(\..*)$", key)
    if m:
        block, kind, idx, rest = int(m[1]) + up_offset, m[2], int(m[3]), m[4]
        if kind != "upsamplers" and idx > 0:  # keep the first and the last new_layers of old_layers + 1
            idx += old_layers - new_layers
        return f"up_blocks.{block}.{kind}.{idx}{rest}"
    return key


def remove_blocks(unet: UNet2DConditionModel, variant: str) -> UNet2DConditionModel:
    """A new UNet of the BK-SDM ``variant`` carrying the teacher's weights for the blocks it keeps."""
    cfg = bk_sdm_config(unet.config, variant)
    old_layers = _per_stage(unet.config.layers_per_block, len(unet.config.down_block_types))[0]
    student = UNet2DConditionModel.from_config(cfg)
    teacher_state = unet.state_dict()
    up_offset = 1 if variant == "tiny" else 0
    state = {}
    for key, param in student.state_dict().items():
        source = _source_key(key, old_layers=old_layers, new_layers=cfg["layers_per_block"], up_offset=up_offset)
        if source not in teacher_state or teacher_state[source].shape != param.shape:
            raise BudgetError(f"block removal {variant!r}: no teacher weight fits {key} (looked for {source})")
        state[key] = teacher_state[source]
    student.load_state_dict(state, strict=True)
    dtype = next(unet.parameters()).dtype
    return (student if dtype == torch.float32 else student.to(dtype)).eval()


def bk_sdm_param_count(config: dict[str, Any], variant: str) -> int:
    """Parameters of the ``variant`` of ``config`` (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel.from_config(bk_sdm_config(config, variant)).parameters())
