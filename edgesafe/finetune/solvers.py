"""Solvers: how one training step combines the lower level (L_ft) and the upper level (unlearning).

Registry ``SOLVERS`` keyed by the recipe's ``finetune.solver``:

- ``kd``: the lower level only (distillation + denoising), the baseline that carries concepts over;
- ``two-stage``: ``kd`` for every lower step, then erase steps with the upper objective alone;
- ``bilevel-penalty`` (Shirkavand et al., CVPR 2025): min_theta max_phi L_un(theta) +
  lambda * (L_ft(theta) - L_ft(phi)); phi, a copy of the student, takes K steps on L_ft (it tracks
  min L_ft, so the penalty is theta's distillation gap), then theta descends the penalised
  objective, the unlearning gradient reaching only the concept's parameter subset. L_ft(phi) does
  not depend on theta, so phi never changes theta's update: it only measures the gap, and
  ``gap_every`` runs phi's K steps (and the gap) every N outer steps to save their cost;
- ``bilevel-alternating`` (the authors' released variant): one model, a lower step every
  iteration and an upper step every N iterations, each with its own optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

Loss = Callable[[nn.Module], torch.Tensor]
GradSync = Callable[[torch.optim.Optimizer], None]


def no_sync(_opt: torch.optim.Optimizer) -> None:
    """Single process: gradients are already complete."""


@dataclass
class StepLosses:
    """What a step needs: L_ft of a model on this step's batch, and the unlearning loss of a model."""

    lower: Loss
    upper: Loss | None


@dataclass
class Solver:
    """State and update rule of one solver; ``step`` returns the figures logged for the curves."""

    steps_upper_opt: ClassVar[bool] = False
    """Whether the solver steps ``upper_opt`` (whose optimizer states then take memory)."""

    student: nn.Module
    upper_params: list[nn.Parameter]
    lower_opt: torch.optim.Optimizer
    upper_opt: torch.optim.Optimizer | None = None
    phi: nn.Module | None = None
    phi_opt: torch.optim.Optimizer | None = None
    penalty_lambda: float = 1.0
    inner_steps: int = 1
    upper_every: int = 1
    gap_every: int = 1
    lower_steps: int = 0
    sync: GradSync = no_sync
    """Averages an optimizer's gradients over ranks before it steps (set by the trainer)."""
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    """Loss scaling for fp16 mixed precision (disabled otherwise: then it scales by one and just steps)."""

    def step(self, i: int, losses: StepLosses) -> dict[str, float]:
        raise NotImplementedError

    def total_steps(self) -> int:
        return self.lower_steps

    def _descend(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._step(opt)

    def _step(self, opt: torch.optim.Optimizer) -> None:
        """Average the (scaled) gradients over ranks, then step, unscaling and skipping a step with inf/NaN."""
        self.sync(opt)
        self.scaler.step(opt)
        self.scaler.update()


class KD(Solver):
    def step(self, i: int, losses: StepLosses) -> dict[str, float]:
        loss = losses.lower(self.student)
        self._descend(self.lower_opt, loss)
        return {"lower": loss.item()}


class TwoStage(Solver):
    """Lower steps first; then as many erase steps as bilevel takes upper steps."""

    steps_upper_opt = True

    def total_steps(self) -> int:
        return self.lower_steps + self.lower_steps // self.upper_every

    def step(self, i: int, losses: StepLosses) -> dict[str, float]:
        if i < self.lower_steps:
            loss = losses.lower(self.student)
            self._descend(self.lower_opt, loss)
            return {"lower": loss.item()}
        assert losses.upper is not None and self.upper_opt is not None
        loss = losses.upper(self.student)
        self._descend(self.upper_opt, loss)
        return {"upper": loss.item()}


class BilevelPenalty(Solver):
    def step(self, i: int, losses: StepLosses) -> dict[str, float]:
        assert self.phi is not None and self.phi_opt is not None and losses.upper is not None
        phi_value = None
        if i % self.gap_every == 0:
            for _ in range(self.inner_steps):  # phi approaches argmin L_ft, warm-started
                self._descend(self.phi_opt, losses.lower(self.phi))
            with torch.no_grad():
                phi_value = losses.lower(self.phi).item()
        # theta's gradient, grad L_un (on the upper subset only) + lambda * grad L_ft, built one graph at a
        # time in the gradient buffers themselves: the upper gradient first, then backward adds the lower one
        self.lower_opt.zero_grad(set_to_none=True)
        upper = losses.upper(self.student)
        grads = torch.autograd.grad(self.scaler.scale(upper), self.upper_params, allow_unused=True)
        for p, g in zip(self.upper_params, grads, strict=True):
            p.grad = g
        del grads
        lower = losses.lower(self.student)
        self.scaler.scale(self.penalty_lambda * lower).backward()
        self._step(self.lower_opt)
        figures = {"lower": lower.item(), "upper": upper.item()}
        if phi_value is not None:
            gap = lower.item() - phi_value
            figures.update(phi_lower=phi_value, gap=gap, objective=upper.item() + self.penalty_lambda * gap)
        return figures


class BilevelAlternating(Solver):
    steps_upper_opt = True

    def step(self, i: int, losses: StepLosses) -> dict[str, float]:
        lower = losses.lower(self.student)
        self._descend(self.lower_opt, lower)
        figures = {"lower": lower.item()}
        if (i + 1) % self.upper_every == 0:
            assert losses.upper is not None and self.upper_opt is not None
            upper = losses.upper(self.student)
            self._descend(self.upper_opt, upper)
            figures["upper"] = upper.item()
        return figures


SOLVERS: dict[str, type[Solver]] = {
    "kd": KD,
    "two-stage": TwoStage,
    "bilevel-penalty": BilevelPenalty,
    "bilevel-alternating": BilevelAlternating,
}

NEEDS_UPPER = {"two-stage", "bilevel-penalty", "bilevel-alternating"}
