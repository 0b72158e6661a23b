"""Width pruning of a ``UNet2DConditionModel`` with torch-pruning's dependency graph.

What the stock pruner gets wrong on diffusers' UNet, and what we do about it:

- ``conv_out`` must keep the latent channels: it is ignored (its input channels still shrink).
- attention is pruned by whole heads: ``to_q``/``to_k``/``to_v`` are declared with their head
  counts, head dims stay, ``to_out`` follows, and each ``Attention.heads`` is updated afterwards;
  the cross-attention ``to_k``/``to_v`` inputs read the text encoder and keep its width.
- the GEGLU projection holds two halves (value and gate): its output is declared as two channel
  groups, so both halves lose the same channels.
- ``Downsample2D``/``Upsample2D`` remember their channel counts in attributes that their forward
  asserts on; they are reset from their convolutions afterwards.
- the time embedding's input is the sinusoidal projection (not a layer), so it keeps its width;
  its hidden width and every ResNet's ``time_emb_proj`` shrink with the groups they feed.
- GroupNorm is pruned group-wise by the dependency graph, so every normalised width stays a
  multiple of its group count. Rounding to the device's channel multiple is done by choosing
  per-layer ratios, since torch-pruning's ``round_to`` skips channel-grouped layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch_pruning as tp
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D

from ..errors import BudgetError

IMPORTANCE: dict[str, Callable[[], tp.importance.Importance]] = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}

LossFn = Callable[[UNet2DConditionModel], torch.Tensor]

KEPT_ATTR = "edgesafe_kept_channels"
"""Attribute of a width-pruned UNet: for each block output, the teacher's channels it kept."""


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


def _rounded_ratio(n: int, ratio: float, multiple: int) -> float:
    """The ratio closest to ``ratio`` that leaves a multiple of ``multiple`` out of ``n`` (at least one)."""
    kept = max(multiple, int(round(n * (1 - ratio) / multiple)) * multiple)
    return max(0.0, 1 - min(kept, n) / n)


def accumulate_taylor_gradients(unet: UNet2DConditionModel, batches: Iterable[LossFn]) -> None:
    """Backpropagate the denoising loss of each calibration batch into ``unet``'s ``.grad``."""
    unet.zero_grad(set_to_none=True)
    for loss_fn in batches:
        loss_fn(unet).backward()


def prune_width(
    unet: UNet2DConditionModel,
    ratio: float,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    importance: str = "magnitude",
    round_to: int = 1,
    seed: int = 0,
) -> UNet2DConditionModel:
    """A copy of ``unet`` with ``ratio`` of its channels and heads removed from every prunable group.

    ``taylor`` importance reads the gradients already in ``unet`` (see
    :func:`accumulate_taylor_gradients`); ``random`` is seeded.
    """
    if importance not in IMPORTANCE:
        raise BudgetError(f"unknown importance {importance!r}; known: {', '.join(IMPORTANCE)}")
    if not 0 <= ratio < 1:
        raise BudgetError(f"channel pruning ratio must be in [0, 1), got {ratio}")
    if importance == "taylor" and not any(p.grad is not None for p in unet.parameters()):
        raise BudgetError("taylor importance needs gradients: run accumulate_taylor_gradients first")
    student = copy.deepcopy(unet).eval()
    for source, param in zip(unet.parameters(), student.parameters(), strict=True):
        if source.grad is not None:  # deepcopy drops gradients; Taylor importance reads them
            param.grad = source.grad.clone()
    if ratio == 0:
        return student
    num_heads, ratios, groups = {}, {}, {}
    for m in student.modules():
        if isinstance(m, Attention):
            for linear in (m.to_q, m.to_k, m.to_v):
                num_heads[linear] = m.heads
        if isinstance(m, GEGLU):
            groups[m.proj] = 2
            ratios[m.proj] = _rounded_ratio(m.proj.out_features // 2, ratio, round_to)
    torch.manual_seed(seed)
    pruner = tp.pruner.MetaPruner(
        student, example_inputs, IMPORTANCE[importance](), pruning_ratio=ratio, pruning_ratio_dict=ratios,
        ignored_layers=[student.conv_out], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, out_channel_groups=groups, forward_fn=lambda m, x: m(*x).sample,
    )
    watch = {student.get_submodule(layer): point for point, layer in block_output_layers(student).items()}
    kept = {point: list(getattr(unet, KEPT_ATTR, {}).get(point, range(m.out_channels))) for m, point in watch.items()}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            point = watch.get(dep.target.module)
            if point is not None and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                drop = {int(i) for i in idxs}
                kept[point] = [c for j, c in enumerate(kept[point]) if j not in drop]
        group.prune()
    setattr(student, KEPT_ATTR, kept)
    for m in student.modules():
        if isinstance(m, Attention):
            m.heads = pruner.num_heads[m.to_q]
        if isinstance(m, Downsample2D | Upsample2D):
            conv = m.conv
            m.channels, m.out_channels = conv.in_channels, conv.out_channels
    student.zero_grad(set_to_none=True)
    return student
