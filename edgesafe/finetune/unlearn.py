"""Upper-level objectives: unlearning one concept, by name in ``OBJECTIVES`` (the recipe's ``objective``).

Each objective regresses the student's prediction for a concept prompt onto a target built from
the frozen teacher on the same noisy latents:

- ``esd`` (Gandikota et al., 2023): negative guidance away from the concept,
  target = eps_T(x, t, "") - eta * (eps_T(x, t, concept) - eps_T(x, t, ""));
- ``ablation`` (Kumari et al., 2023): the teacher's prediction for the anchor prompt (the concept's
  target words replaced by its anchor), target = eps_T(x, t, anchor).

``parameters`` selects what the upper level may change: ``xattn`` (cross-attention only, for
styles), ``noxattn`` (everything else, for objects and NSFW) or ``full``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..recipe import Concept

Encode = Callable[[list[str]], torch.Tensor]
Target = Callable[[UNet2DConditionModel, torch.Tensor, torch.Tensor, Concept, list[str], Encode], torch.Tensor]


def _predict(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return unet(x, t, states).sample


def concept_prediction(model: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, prompts: list[str],
                       encode: Encode) -> torch.Tensor:
    """``model``'s noise prediction for the concept ``prompts`` on the noisy latents ``x`` at ``t``."""
    return _predict(model, x, t, encode(prompts))


@torch.no_grad()
def esd_target(teacher, x, t, concept: Concept, prompts: list[str], encode: Encode) -> torch.Tensor:
    cond = _predict(teacher, x, t, encode(prompts))
    uncond = _predict(teacher, x, t, encode([""] * len(prompts)))
    return uncond - concept.eta * (cond - uncond)


def anchor_prompts(concept: Concept, prompts: list[str]) -> list[str]:
    pattern = re.compile(re.escape(concept.target), re.IGNORECASE)
    return [pattern.sub(concept.anchor or "", p) for p in prompts]


@torch.no_grad()
def ablation_target(teacher, x, t, concept: Concept, prompts: list[str], encode: Encode) -> torch.Tensor:
    return _predict(teacher, x, t, encode(anchor_prompts(concept, prompts)))


OBJECTIVES: dict[str, Target] = {"esd": esd_target, "ablation": ablation_target}


def unlearning_target(reference: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, concept: Concept,
                      prompts: list[str], encode: Encode) -> torch.Tensor:
    """What a model's prediction for the concept prompts is regressed onto, from the frozen ``reference``."""
    return OBJECTIVES[concept.objective](reference, x, t, concept, prompts, encode)


def unlearning_loss(model: UNet2DConditionModel, target: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                    prompts: list[str], encode: Encode) -> torch.Tensor:
    """MSE between ``model``'s prediction for the concept prompts and the objective's target."""
    return nn.functional.mse_loss(concept_prediction(model, x, t, prompts, encode), target)


PARAMETER_SUBSETS: dict[str, Callable[[str], bool]] = {
    "xattn": lambda name: ".attn2." in name,  # the cross-attention layers (ESD-x)
    "noxattn": lambda name: ".attn2." not in name,  # everything else (ESD-u)
    "full": lambda name: True,
}
"""A concept's ``params``: which of the UNet's parameters (by name) its unlearning may update."""


def parameter_subset(unet: UNet2DConditionModel, which: str) -> list[str]:
    """Names of the parameters in the subset ``which`` of :data:`PARAMETER_SUBSETS`."""
    return [n for n, _ in unet.named_parameters() if PARAMETER_SUBSETS[which](n)]
