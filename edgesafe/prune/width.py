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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from ..errors import BudgetError
from ..models.architectures import block_output_layers
from ..models.structure import KeptChannels

IMPORTANCE: dict[str, Callable[[], tp.importance.Importance]] = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}

LossFn = Callable[[UNet2DConditionModel], torch.Tensor]

@dataclass(frozen=True)
class Pruned:
    """A width-pruned UNet and the teacher channels each of its block outputs kept (what feature distillation
    with ``feature_align: kept`` compares; saved in the structure spec)."""

    unet: UNet2DConditionModel
    kept_channels: KeptChannels


def _rounded_ratio(n: int, ratio: float, multiple: int) -> float:
    """The ratio closest to ``ratio`` that leaves a multiple of ``multiple`` out of ``n`` (at least one)."""
    kept = max(multiple, int(round(n * (1 - ratio) / multiple)) * multiple)
    return max(0.0, 1 - min(kept, n) / n)


def accumulate_taylor_gradients(unet: UNet2DConditionModel, batches: Sequence[LossFn],
                                progress: Callable[[int, int], None] | None = None) -> None:
    """Backpropagate the denoising loss of each calibration batch into ``unet``'s ``.grad`` (in place:
    one gradient buffer per parameter, summed over batches)."""
    unet.zero_grad(set_to_none=True)
    for i, loss_fn in enumerate(batches):
        loss_fn(unet).backward()
        if progress:
            progress(i + 1, len(batches))


GroupKey = tuple[tuple[str, str], ...]
Scores = dict[GroupKey, torch.Tensor]
"""Per-channel importance of every prunable group, keyed by its layers' names and pruning functions."""


def _group_key(group: tp.dependency.Group, names: dict[nn.Module, str]) -> GroupKey:
    """The group's layers (graph-only nodes such as additions have no name) and how each is pruned."""
    return tuple((names[dep.target.module], getattr(dep.handler, "__name__", type(dep.handler).__name__))
                 for dep, _ in group if dep.target.module in names)


class _Recorded(tp.importance.Importance):
    """Scores groups with ``inner`` and keeps each score; or, without ``inner``, replays kept scores."""

    def __init__(self, model: nn.Module, scores: Scores, inner: tp.importance.Importance | None = None):
        self.names = {m: n for n, m in model.named_modules()}
        self.scores, self.inner = scores, inner

    def __call__(self, group: tp.dependency.Group) -> torch.Tensor:
        key = _group_key(group, self.names)
        if self.inner is not None:
            self.scores[key] = self.inner(group).detach().cpu()
        if key not in self.scores:
            raise BudgetError(f"no importance score for the group of {key[0][0]}: the UNet changed since scoring")
        return self.scores[key]


def _pruner(unet: UNet2DConditionModel, ratio: float, example_inputs: tuple[torch.Tensor, ...],
            importance: tp.importance.Importance, round_to: int) -> tp.pruner.MetaPruner:
    num_heads, ratios, groups = {}, {}, {}
    for m in unet.modules():
        if isinstance(m, Attention):
            for linear in (m.to_q, m.to_k, m.to_v):
                num_heads[linear] = m.heads
        if isinstance(m, GEGLU):
            groups[m.proj] = 2
            ratios[m.proj] = _rounded_ratio(m.proj.out_features // 2, ratio, round_to)
    return tp.pruner.MetaPruner(
        unet, example_inputs, importance, pruning_ratio=ratio, pruning_ratio_dict=ratios,
        ignored_layers=[unet.conv_out], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, out_channel_groups=groups, forward_fn=lambda m, x: m(*x).sample,
    )


def score_channels(unet: UNet2DConditionModel, example_inputs: tuple[torch.Tensor, ...], *,
                   importance: str = "magnitude", seed: int = 0) -> Scores:
    """Importance of every channel and head of ``unet``, computed once (nothing is pruned).

    ``taylor`` reads the gradients already in ``unet`` (see :func:`accumulate_taylor_gradients`),
    which may be freed afterwards; ``random`` is seeded. The scores drive :func:`prune_width` at any
    ratio, on ``unet`` or on a copy of it (the ``meta`` device included), so a budget search scores once.
    """
    if importance not in IMPORTANCE:
        raise BudgetError(f"unknown importance {importance!r}; known: {', '.join(IMPORTANCE)}")
    if importance == "taylor" and not any(p.grad is not None for p in unet.parameters()):
        raise BudgetError("taylor importance needs gradients: run accumulate_taylor_gradients first")
    torch.manual_seed(seed)
    scores: Scores = {}
    pruner = _pruner(unet, 0.5, example_inputs, _Recorded(unet, scores, IMPORTANCE[importance]()), 1)
    next(pruner.step(interactive=True), None)  # scores every group before yielding the first; nothing is pruned
    return scores


def prune_width(
    unet: UNet2DConditionModel,
    ratio: float,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    scores: Scores | None = None,
    importance: str = "magnitude",
    seed: int = 0,
    round_to: int = 1,
    inplace: bool = False,
    kept_channels: KeptChannels | None = None,
) -> Pruned:
    """Remove ``ratio`` of the channels and heads of every prunable group of ``unet``.

    Args:
        unet: the UNet to prune; a copy is pruned unless ``inplace``.
        ratio: fraction of each group's channels (and attention heads) to remove, in [0, 1).
        example_inputs: inputs that trace the graph; they may be small (see ``budget.trace_inputs``).
        scores: channel importance from :func:`score_channels`; by default scored here with ``importance``
            (a name of :data:`IMPORTANCE`) and ``seed``. With scores given, ``unet`` may be on the ``meta``
            device, where a budget search measures sizes without allocating weights.
        round_to: keep a multiple of this many channels per group (the device's preferred width).
        inplace: prune ``unet`` itself.
        kept_channels: the teacher channels ``unet`` already kept, when it is itself pruned.

    Returns:
        The pruned UNet and the teacher channels each block output kept.

    Raises:
        BudgetError: a ratio outside [0, 1), an unknown importance, or scores of another UNet.
    """
    if not 0 <= ratio < 1:
        raise BudgetError(f"channel pruning ratio must be in [0, 1), got {ratio}")
    if scores is None and ratio > 0:
        scores = score_channels(unet, example_inputs, importance=importance, seed=seed)
    student = (unet if inplace else copy.deepcopy(unet)).eval()
    student.zero_grad(set_to_none=True)
    watch = {student.get_submodule(layer): point for point, layer in block_output_layers(student).items()}
    kept = {point: list((kept_channels or {}).get(point, range(m.out_channels))) for m, point in watch.items()}
    if ratio == 0:
        return Pruned(student, kept)
    pruner = _pruner(student, ratio, example_inputs, _Recorded(student, scores), round_to)
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            point = watch.get(dep.target.module)
            if point is not None and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                drop = {int(i) for i in idxs}
                kept[point] = [c for j, c in enumerate(kept[point]) if j not in drop]
        group.prune()
    for m in student.modules():
        if isinstance(m, Attention):
            m.heads = pruner.num_heads[m.to_q]
        if isinstance(m, Downsample2D | Upsample2D):
            conv = m.conv
            m.channels, m.out_channels = conv.in_channels, conv.out_channels
    return Pruned(student, kept)

