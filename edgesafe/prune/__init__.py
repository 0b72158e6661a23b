"""Structured pruning of the UNet: width (torch-pruning), block removal (BK-SDM) and budget search. A pruned
UNet is saved and loaded by ``models.structure``."""

from .blocks import remove_blocks
from .budget import BudgetResult, prune_to_budget
from .width import IMPORTANCE, Pruned, accumulate_taylor_gradients, prune_width

__all__ = [
    "IMPORTANCE", "BudgetResult", "Pruned", "accumulate_taylor_gradients", "prune_to_budget", "prune_width",
    "remove_blocks",
]
