"""Search the channel pruning ratio that puts a UNet on its budget (params, MACs or ms per step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from ..errors import BudgetError
from ..models.inputs import unet_example_inputs
from ..models.stats import meta_copy
from ..models.structure import KeptChannels
from ..recipe import Budget
from .blocks import remove_blocks
from .width import prune_width, score_channels

MAX_RATIO = 0.9
MAX_TRIALS = 14


def max_ratio(unet: UNet2DConditionModel) -> float:
    """The largest channel ratio that leaves every GroupNorm group and every attention one channel/head."""
    limits = [MAX_RATIO]
    for m in unet.modules():
        if isinstance(m, torch.nn.GroupNorm):
            limits.append(1 - m.num_groups / m.num_channels)
        if isinstance(m, Attention) and m.heads > 1:
            limits.append(1 - 1 / m.heads)
    return min(limits)

Measure = Callable[[UNet2DConditionModel], float]


@dataclass(frozen=True)
class BudgetResult:
    unet: UNet2DConditionModel
    ratio: float
    """Channel pruning ratio applied after block removal."""
    value: float
    target: float
    teacher_value: float
    trials: list[tuple[float, float]]
    """(ratio, value) of every pruning tried, in order."""
    kept_channels: KeptChannels = field(default_factory=dict)
    """The teacher channels each block output of ``unet`` kept (empty: all of them)."""

    @property
    def relative_error(self) -> float:
        return self.value / self.target - 1


def target_value(budget: Budget, teacher_value: float) -> float:
    if budget.metric == "latency" and budget.ms_per_step is not None:
        return budget.ms_per_step
    return float(budget.ratio) * teacher_value


def prune_to_budget(
    unet: UNet2DConditionModel,
    budget: Budget,
    measure: Measure,
    *,
    method: str = "width",
    blocks: str | None = None,
    importance: str = "magnitude",
    round_to: int = 1,
    seed: int = 0,
    calibrate: Callable[[UNet2DConditionModel], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BudgetResult:
    """Prune ``unet`` until ``measure`` is within ``budget.tolerance`` of the target, by bisection on
    the channel ratio (after BK-SDM block removal when the method asks for it).

    Memory stays near one UNet: channels are scored once, the trials prune weightless copies on the
    ``meta`` device (``measure`` gets those; it materialises one if it must run it), and the chosen
    ratio is applied to ``unet`` itself, which is consumed.

    Args:
        unet: the teacher's UNet (consumed: pruned in place).
        budget: the recipe's budget (metric, ratio or ms per step, tolerance).
        measure: the budget's figure of a UNet (``pipeline.budget_measure``); called on meta-device copies.
        method: ``width``, ``blocks`` or ``width+blocks``.
        blocks: the BK-SDM variant (``prune.blocks.VARIANTS``) for the block methods.
        importance: a name of ``prune.width.IMPORTANCE``.
        round_to: keep a multiple of this many channels per group.
        seed: seeds ``random`` importance.
        calibrate: fills the gradients Taylor importance reads (see :func:`accumulate_taylor_gradients`).
        progress: called with (trials so far, most trials).

    Returns:
        The pruned UNet with the ratio chosen, its figure against the target, every trial, and the teacher
        channels each block output kept.

    Raises:
        BudgetError: the target is unreachable (naming the smallest reachable figure) or no ratio lands within
            the tolerance.
    """
    teacher_value = measure(unet)
    target = target_value(budget, teacher_value)
    base = remove_blocks(unet, blocks) if "blocks" in method and blocks else unet
    del unet
    trials: list[tuple[float, float]] = []
    if "width" not in method:
        value = measure(base)
        trials.append((0.0, value))
        if value > target * (1 + budget.tolerance):
            raise BudgetError(_unreachable(budget, value, teacher_value, "block removal alone"))
        return BudgetResult(base, 0.0, value, target, teacher_value, trials)
    if importance == "taylor":
        if calibrate is None:
            raise BudgetError("taylor importance needs calibration batches")
        calibrate(base)
    scores = score_channels(base, trace_inputs(base), importance=importance, seed=seed)
    base.zero_grad(set_to_none=True)
    shape = meta_copy(base)
    meta_inputs = trace_inputs(shape)

    def attempt(ratio: float) -> float:
        value = measure(prune_width(shape, ratio, meta_inputs, scores=scores, round_to=round_to).unet)
        trials.append((ratio, value))
        if progress:
            progress(len(trials), MAX_TRIALS)
        return value

    def result(ratio: float, value: float) -> BudgetResult:
        pruned = prune_width(base, ratio, trace_inputs(base), scores=scores, round_to=round_to, inplace=True)
        return BudgetResult(pruned.unet, ratio, value, target, teacher_value, trials, pruned.kept_channels)

    value = attempt(0.0)
    if value <= target * (1 + budget.tolerance):
        return result(0.0, value)
    lo, hi = 0.0, max_ratio(base)
    smallest_value = attempt(hi)
    if smallest_value > target * (1 + budget.tolerance):
        raise BudgetError(_unreachable(budget, smallest_value, teacher_value, f"{hi:.0%} channel pruning"))
    best = (hi, smallest_value)
    while len(trials) < MAX_TRIALS:
        mid = (lo + hi) / 2
        value = attempt(mid)
        if abs(value / target - 1) < abs(best[1] / target - 1):
            best = (mid, value)
        if abs(value / target - 1) <= budget.tolerance / 2:
            break
        lo, hi = (mid, hi) if value > target else (lo, mid)
    ratio, value = best
    if abs(value / target - 1) > budget.tolerance:
        raise BudgetError(
            f"budget {budget.metric}: no ratio within {budget.tolerance:.0%} of the target {target:.4g} "
            f"(closest {value:.4g} at ratio {ratio:.3f}); the metric is too coarse or noisy at this size"
        )
    return result(ratio, value)


def trace_inputs(unet: UNet2DConditionModel) -> tuple[torch.Tensor, ...]:
    """Small inputs (one sample, the smallest latent the UNet takes, two tokens) on ``unet``'s device:
    enough for torch-pruning to trace the graph, whatever the model's resolution."""
    side = 2 ** (len(unet.config.down_block_types) - 1)
    return unet_example_inputs(unet, batch=1, text_length=2, sample_size=side,
                               device=next(unet.parameters()).device)


def _unreachable(budget: Budget, smallest: float, teacher: float, how: str) -> str:
    wanted = f"{budget.ms_per_step:g} ms" if budget.ms_per_step else f"{budget.ratio:g} x the teacher"
    return (f"budget {budget.metric} {wanted} is unreachable: the smallest reachable is {smallest:.4g} "
            f"({smallest / teacher:.1%} of the teacher's {teacher:.4g}) with {how}")
