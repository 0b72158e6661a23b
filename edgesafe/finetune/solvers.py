"""Solvers: how one training step combines the lower level L_ft (distillation + denoising) and the upper
level, one unlearning loss L_un,c per concept c, each reaching only the parameter subset its concept
names (``concepts[].params``). Every upper step erases every concept.

Registry ``SOLVERS``, keyed by the recipe's ``finetune.solver``; each class says which ``finetune``
settings it reads (``reads``), whether it needs concepts, and which extra state it keeps:

- ``kd``: L_ft only (distillation + denoising), the baseline that carries concepts over;
- ``two-stage``: ``steps`` lower steps, then ``erase_steps`` upper steps alone (erase after distilling),
  against the teacher or, as the paper's authors ran it, against a frozen copy of the distilled student;
- ``bilevel-alternating`` (the authors' released code): one model, a lower step every iteration and an
  upper step every ``upper_every`` iterations, each level with its own optimizer;
- ``bilevel-penalty``: a first-order value-function penalty method for
  min_x L_un(x, y*(x)) s.t. y*(x) = argmin_y L_ft(x, y), the upper variables x being the concepts'
  parameter subsets and the lower variables y the rest (F2SA / BOME style). It descends
  L_un(x, y) + lambda * (L_ft(x, y) - L_ft(x, z)) where phi's lower block z tracks argmin_z L_ft(x, z)
  (``inner_steps`` warm-started steps each iteration); lambda grows linearly from ``penalty_lambda`` to
  ``penalty_lambda * penalty_growth``, pulling y onto the lower level's solution. x moves by
  grad_x L_un + lambda * (grad_x L_ft(x, y) - grad_x L_ft(x, z)), the second term being the value
  function's gradient; y by grad_y L_un + lambda * grad_y L_ft(x, y);
- ``constrained``: min L_ft subject to L_un,c <= ``erase_ratio`` * R_c for every concept, R_c being the
  student's own distance from the teacher's prediction for the concept prompts on the same batch (detached),
  by gradient descent on the Lagrangian and dual ascent on its multipliers (step ``dual_lr``): the user sets
  how much to erase, as how much nearer the objective's target than the teacher the student must predict,
  not a weight. A ratio can be out of reach (benchmarks/paper_claim.py measured it: on the pruned tiny-shapes
  student, erasing through ``xattn`` while distilling, nothing under its starting ratio, about 1); the
  multipliers then grow without end, distillation suffers, and the stage's summary says so.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import EdgesafeError

Loss = Callable[[nn.Module], torch.Tensor]
GradSync = Callable[[torch.optim.Optimizer], None]
BuildOptimizer = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]

SHARED_SETTINGS = ("solver", "steps", "batch_size", "lr", "lr_schedule", "lr_warmup_steps", "lower",
                   "checkpoint_every", "mixed_precision", "gradient_checkpointing", "optimizer", "upper_latents")
"""``finetune`` settings every solver reads (``upper_latents`` only where there are concepts)."""


LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),  # half a cosine, to zero at the end
}
"""``finetune.lr_schedule``: the learning rates' multiplier as a function of the progress after warmup, 0 to 1."""


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """The learning rates' multiplier at ``step`` of ``total``: linear warmup over ``warmup`` steps, then
    ``schedule`` from :data:`LR_SCHEDULES`."""
    if step < warmup:
        return (step + 1) / warmup
    return LR_SCHEDULES[schedule]((step - warmup) / max(1, total - warmup))


def no_sync(_opt: torch.optim.Optimizer) -> None:
    """Single process: gradients are already complete."""


@dataclass
class UpperTerm:
    """One concept's unlearning loss on this step's upper batch: L_un = MSE(a model's prediction for the
    concept prompts, the objective's target)."""

    concept: str
    predict: Callable[[nn.Module], torch.Tensor]
    """A model's (the student's, or phi's) prediction for the concept prompts on the batch's noisy latents."""
    target: Callable[[], torch.Tensor]
    """What the prediction is regressed onto, built by the objective from the frozen reference model."""
    reference: Callable[[], torch.Tensor]
    """The frozen reference model's own prediction on the same batch: the concept as it is held."""

    def loss(self, model: nn.Module) -> torch.Tensor:
        return self.of(self.predict(model))

    def of(self, prediction: torch.Tensor) -> torch.Tensor:
        """L_un of a prediction."""
        return nn.functional.mse_loss(prediction.float(), self.target().float())

    def retained(self, prediction: torch.Tensor) -> torch.Tensor:
        """How far a prediction still is from the reference's (no gradient): the concept it retains."""
        return nn.functional.mse_loss(prediction.detach().float(), self.reference().float())


@dataclass
class StepLosses:
    """What a step needs: L_ft of a model on this step's batch, and each concept's unlearning loss."""

    lower: Loss
    upper: list[UpperTerm] = field(default_factory=list)


@dataclass
class Setup:
    """What a solver is built from."""

    student: nn.Module
    settings: Any
    """The recipe's ``finetune`` section."""
    subsets: dict[str, list[str]]
    """Concept name -> names of the student's parameters its unlearning loss may move."""
    build: BuildOptimizer
    extra: list[nn.Parameter] = field(default_factory=list)
    """Lower-level parameters beyond the student's (the feature projections)."""
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    """Loss scaling for fp16 mixed precision (disabled otherwise: then it scales by one and just steps)."""


class Solver:
    """State and update rule of one solver; ``step`` returns the figures logged for the curves.

    A new solver is a subclass registered in :data:`SOLVERS`. It declares the ``finetune`` settings it reads
    (:attr:`reads`, which make the fine-tune stage's key), whether it needs concepts, and the copies of the
    student it keeps (:meth:`copies`, for the memory estimate); it overrides :meth:`update` (and
    :meth:`build` / :meth:`state` where it keeps more state) and receives the step's losses as
    :class:`StepLosses`, computed only when it asks for them.
    """

    reads: ClassVar[tuple[str, ...]] = ()
    """``finetune`` settings this solver reads beyond ``SHARED_SETTINGS``."""
    needs_concepts: ClassVar[bool] = True
    separate_upper_opt: ClassVar[bool] = False
    """Whether the concepts' subsets have an optimizer of their own (whose states then take memory)."""

    @classmethod
    def problem(cls, concepts: list[Any]) -> str | None:
        """Why this solver cannot run with the recipe's ``concepts`` (None when it can)."""
        return "needs at least one concept to suppress" if cls.needs_concepts and not concepts else None

    @classmethod
    def copies(cls, settings: Any) -> tuple[int, int]:
        """How many copies of the student it keeps beside it: (trained, with gradients and optimizer states;
        frozen, weights only)."""
        return 0, 0

    def __init__(self, setup: Setup):
        self.setup, self.ft, self.scaler = setup, setup.settings, setup.scaler
        self.student = setup.student
        self.named = dict(self.student.named_parameters())
        self.subsets = {c: [self.named[n] for n in names] for c, names in setup.subsets.items()}
        union = {n for names in setup.subsets.values() for n in names}
        self.upper_params = [p for n, p in self.named.items() if n in union]
        self.sync: GradSync = no_sync
        """Averages an optimizer's gradients over ranks before it steps (set by the trainer)."""
        self.lower_opt = self.build(self.lower_parameters(), self.ft.lr)
        self.upper_opt: torch.optim.Optimizer | None = None

    def lower_parameters(self) -> list[nn.Parameter]:
        """What the lower-level optimizer steps: the student's parameters and the feature projections."""
        return list(self.student.parameters()) + self.setup.extra

    def build(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """An optimizer from the recipe's kind; each group remembers its base learning rate for the schedule."""
        opt = self.setup.build(params, lr)
        for group in opt.param_groups:
            group["base_lr"] = lr
        return opt

    # --- what the trainer saves and restores -----------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"lower_opt": self.lower_opt}
        if self.upper_opt is not None:
            opts["upper_opt"] = self.upper_opt
        return opts

    def state(self) -> dict[str, Any]:
        """JSON-able state beyond modules and optimizers."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def reference_model(self, step: int) -> nn.Module | None:
        """The frozen model the unlearning targets come from at ``step`` (None: the teacher)."""
        return None

    # --- the update --------------------------------------------------------------------------------
    def total_steps(self) -> int:
        return self.ft.steps

    def schedule(self, i: int) -> tuple[int, int] | None:
        """Where iteration ``i`` lies on the learning-rate schedule: (step, steps), or None for the base rate."""
        return i, self.total_steps()

    def step(self, i: int, losses: StepLosses) -> dict[str, float]:
        where = self.schedule(i)
        factor = 1.0 if where is None else lr_factor(*where, self.ft.lr_schedule, self.ft.lr_warmup_steps)
        for opt in self.optimizers().values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        figures = self.update(i, losses)
        self.scaler.update()  # once per iteration: every gradient of an iteration shares one scale
        return figures

    def update(self, i: int, losses: StepLosses) -> dict[str, float]:
        raise NotImplementedError

    def _descend(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._apply(opt)

    def _apply(self, opt: torch.optim.Optimizer) -> None:
        """Average the (scaled) gradients over ranks, then step (unscaling, and skipping a step with inf/NaN)."""
        self.sync(opt)
        self.scaler.step(opt)

    def _add_grads(self, loss: torch.Tensor, params: list[nn.Parameter], weight: float = 1.0) -> None:
        """Add d(weight * loss)/d(params), scaled, to the parameters' gradients."""
        grads = torch.autograd.grad(self.scaler.scale(weight * loss), params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def _erase(self, terms: list[UpperTerm], params_of: Callable[[str], list[nn.Parameter]],
               weight: Callable[[UpperTerm], float] = lambda _t: 1.0) -> dict[str, float]:
        """Add every concept's unlearning gradient to ``params_of(concept)`` only; the losses, per concept
        and their mean as ``upper``."""
        figures = {}
        for term in terms:
            loss = term.loss(self.student)
            self._add_grads(loss, params_of(term.concept), weight(term))
            figures[f"upper.{term.concept}"] = loss.item()
        figures["upper"] = sum(figures.values()) / len(figures)
        return figures


class KD(Solver):
    needs_concepts = False

    def update(self, i: int, losses: StepLosses) -> dict[str, float]:
        loss = losses.lower(self.student)
        self._descend(self.lower_opt, loss)
        return {"lower": loss.item()}


class TwoStage(Solver):
    """``steps`` lower steps, then ``erase_steps`` upper steps on the concepts' subsets."""

    reads = ("erase_steps", "upper_lr", "erase_against")
    separate_upper_opt = True

    @classmethod
    def copies(cls, settings: Any) -> tuple[int, int]:
        return 0, int(settings.erase_against == "distilled")

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.upper_opt = self.build(self.upper_params, self.ft.upper_lr)
        self.distilled = None
        if self.ft.erase_against == "distilled":  # ESD's own setting: targets from the model before erasing
            self.distilled = copy.deepcopy(self.student).requires_grad_(False).eval()

    def modules(self) -> dict[str, nn.Module]:
        return {"distilled": self.distilled} if self.distilled is not None else {}

    def total_steps(self) -> int:
        return self.ft.steps + self.ft.erase_steps

    def reference_model(self, step: int) -> nn.Module | None:
        return self.distilled if step >= self.ft.steps else None

    def schedule(self, i: int) -> tuple[int, int] | None:
        return (i, self.ft.steps) if i < self.ft.steps else None  # erase steps run at upper_lr

    def update(self, i: int, losses: StepLosses) -> dict[str, float]:
        if i < self.ft.steps:
            loss = losses.lower(self.student)
            self._descend(self.lower_opt, loss)
            if i + 1 == self.ft.steps and self.distilled is not None:
                self.distilled.load_state_dict(self.student.state_dict())
            return {"lower": loss.item()}
        self.upper_opt.zero_grad(set_to_none=True)
        figures = self._erase(losses.upper, self.subsets.__getitem__)
        self._apply(self.upper_opt)
        return figures


class BilevelAlternating(Solver):
    reads = ("upper_every", "upper_lr")
    separate_upper_opt = True

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.upper_opt = self.build(self.upper_params, self.ft.upper_lr)

    def update(self, i: int, losses: StepLosses) -> dict[str, float]:
        lower = losses.lower(self.student)
        self._descend(self.lower_opt, lower)
        figures = {"lower": lower.item()}
        if (i + 1) % self.ft.upper_every == 0:
            self.upper_opt.zero_grad(set_to_none=True)
            figures.update(self._erase(losses.upper, self.subsets.__getitem__))
            self._apply(self.upper_opt)
        return figures


class BilevelPenalty(Solver):
    """The value-function penalty method (see the module's docstring): x = the concepts' subsets, y = the rest,
    phi's lower block z tracking argmin_z L_ft(x, z)."""

    reads = ("upper_lr", "penalty_lambda", "penalty_growth", "inner_steps")
    # the upper optimizer steps x and the lower one only y: no parameter has states in both
    separate_upper_opt = False

    @classmethod
    def copies(cls, settings: Any) -> tuple[int, int]:
        return 1, 0

    @classmethod
    def problem(cls, concepts: list[Any]) -> str | None:
        subsets = {c.params for c in concepts}
        if "full" in subsets or {"xattn", "noxattn"} <= subsets:
            return ("splits the UNet into the concepts' parameters (upper level) and the rest (lower level), "
                    f"but the concepts' params ({', '.join(sorted(subsets))}) leave no rest; give every concept the "
                    "same xattn or noxattn subset, or choose another solver")
        return super().problem(concepts)

    def __init__(self, setup: Setup):
        super().__init__(setup)
        upper = {id(p) for p in self.upper_params}
        self.lower_block = self.lower_parameters()
        self.upper_opt = self.build(self.upper_params, self.ft.upper_lr)
        self.phi = copy.deepcopy(self.student)
        phi_named = dict(self.phi.named_parameters())
        names = {id(p): n for n, p in self.named.items()}
        self.phi_x = [phi_named[names[id(p)]] for p in self.upper_params]
        self.phi_z = [p for n, p in phi_named.items() if id(self.named[n]) not in upper]
        self.phi_opt = self.build(self.phi_z, self.ft.lr)

    def lower_parameters(self) -> list[nn.Parameter]:
        """y: the student's parameters outside the concepts' subsets, and the feature projections."""
        upper = {id(p) for p in self.upper_params}
        y = [p for p in self.student.parameters() if id(p) not in upper]
        if not y:
            raise EdgesafeError("finetune.solver bilevel-penalty needs parameters outside the concepts' subsets for "
                                "its lower level")
        return y + self.setup.extra

    def modules(self) -> dict[str, nn.Module]:
        return {"phi": self.phi}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {**super().optimizers(), "phi_opt": self.phi_opt}

    def penalty(self, i: int) -> float:
        """lambda at iteration ``i``: linear from ``penalty_lambda`` to ``penalty_lambda * penalty_growth``."""
        frac = i / max(1, self.total_steps() - 1)
        return self.ft.penalty_lambda * (1 + (self.ft.penalty_growth - 1) * frac)

    def update(self, i: int, losses: StepLosses) -> dict[str, float]:
        lam = self.penalty(i)
        # phi: x copied from the student, z takes warm-started steps on L_ft(x, z); the last evaluation's
        # gradient in x is the value function's gradient grad_x L_ft(x, z)
        with torch.no_grad():
            for q, p in zip(self.phi_x, self.upper_params, strict=True):
                q.copy_(p)
        for _ in range(self.ft.inner_steps):
            phi_value = losses.lower(self.phi)
            grads = torch.autograd.grad(self.scaler.scale(phi_value), self.phi_z + self.phi_x, allow_unused=True)
            for p, g in zip(self.phi_z, grads[:len(self.phi_z)], strict=True):
                p.grad = g
            value_grad = grads[len(self.phi_z):]
            self._apply(self.phi_opt)
        # the student: x gets grad L_un + lambda (grad_x L_ft(x, y) - grad_x L_ft(x, z)); y gets
        # grad_y L_un + lambda grad_y L_ft(x, y)
        self.lower_opt.zero_grad(set_to_none=True)
        self.upper_opt.zero_grad(set_to_none=True)
        lower = losses.lower(self.student)
        self._add_grads(lower, self.upper_params + self.lower_block, lam)
        for p, g in zip(self.upper_params, value_grad, strict=True):
            if g is not None:
                p.grad = p.grad - lam * g
        figures = self._erase(losses.upper, lambda c: self.subsets[c] + self.lower_block)
        self._apply(self.lower_opt)
        self._apply(self.upper_opt)
        gap = lower.item() - phi_value.item()
        return {"lower": lower.item(), **figures, "phi_lower": phi_value.item(), "gap": gap, "lambda": lam,
                "objective": figures["upper"] + lam * gap}


class Constrained(Solver):
    """min L_ft s.t. L_un,c <= bound_c = ratio * R_c for every concept, R_c the student's distance from the
    reference's prediction on the batch (detached: the bound follows the student, it is not optimised). The
    Lagrangian's gradient is grad L_ft + sum_c mu_c grad L_un,c / max(L_un,c, bound_c): scale-free above the
    bound (the gradient of log L_un), bounded below it. Each multiplier takes dual-ascent steps on
    log(L_un,c / bound_c), smoothed over steps (one batch is noisy). A bound in units of the teacher's own
    L_un could not be met where the student's floor lies above it (under ``ablation`` the teacher's L_un is
    tiny): the multipliers then grew without end and every target erased alike."""

    reads = ("erase_ratio", "dual_lr")
    EMA = 0.9

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.multipliers = {c: 0.0 for c in self.subsets}
        self.violations: dict[str, float] = {}

    def state(self) -> dict[str, Any]:
        return {"multipliers": self.multipliers, "violations": self.violations}

    def load_state(self, state: dict[str, Any]) -> None:
        self.multipliers, self.violations = dict(state["multipliers"]), dict(state["violations"])

    def update(self, i: int, losses: StepLosses) -> dict[str, float]:
        self.lower_opt.zero_grad(set_to_none=True)
        lower = losses.lower(self.student)
        self._add_grads(lower, list(self.student.parameters()) + self.setup.extra)
        figures: dict[str, float] = {"lower": lower.item()}
        uppers = []
        for term in losses.upper:
            prediction = term.predict(self.student)
            loss = term.of(prediction)
            bound = max(self.ft.erase_ratio * term.retained(prediction).item(), 1e-12)
            self._add_grads(loss, self.subsets[term.concept], self.multipliers[term.concept] / max(loss.item(), bound))
            violation = math.log(max(loss.item(), 1e-12) / bound)
            previous = self.violations.get(term.concept, violation)
            smooth = self.violations[term.concept] = self.EMA * previous + (1 - self.EMA) * violation
            self.multipliers[term.concept] = max(0.0, self.multipliers[term.concept] + self.ft.dual_lr * smooth)
            uppers.append(loss.item())
            figures.update({f"upper.{term.concept}": loss.item(), f"violation.{term.concept}": smooth,
                            f"multiplier.{term.concept}": self.multipliers[term.concept]})
        self._apply(self.lower_opt)
        return {**figures, "upper": sum(uppers) / len(uppers)}


SOLVERS: dict[str, type[Solver]] = {
    "kd": KD,
    "two-stage": TwoStage,
    "bilevel-alternating": BilevelAlternating,
    "bilevel-penalty": BilevelPenalty,
    "constrained": Constrained,
}
