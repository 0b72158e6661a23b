"""The fine-tuning optimizers, by the recipe's ``finetune.optimizer``: each builds an optimizer over
parameters and says how many bytes of state it keeps per parameter (for the memory estimate).

- ``adamw``: ``torch.optim.AdamW``, two fp32 moments (8 bytes per parameter);
- ``adamw-8bit``: bitsandbytes' ``AdamW8bit`` (CPU and GPU), two 8-bit block-quantised moments
  (2 bytes per parameter; tensors under 4096 elements keep fp32 moments), for large students.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import EdgesafeError


def _adamw_8bit(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError:
        raise EdgesafeError("finetune.optimizer adamw-8bit needs bitsandbytes >= 0.50: "
                            "pip install 'bitsandbytes>=0.50'") from None
    return AdamW8bit(params, lr=lr, weight_decay=0.0)


@dataclass(frozen=True)
class OptimizerKind:
    """A registered optimizer: how to build it over parameters at a learning rate, and its state's size."""

    build: Callable[[Iterable[torch.nn.Parameter], float], torch.optim.Optimizer]
    state_bytes: int
    """Bytes of optimizer state per parameter."""


OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind(lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0), 8),
    "adamw-8bit": OptimizerKind(_adamw_8bit, 2),
}
