"""Structured pruning of the UNet: width (torch-pruning), block removal (BK-SDM), budget search,
and pickle-free persistence of the result."""

from .blocks import remove_blocks
from .budget import BudgetResult, prune_to_budget
from .structure import load_unet, save_unet
from .width import IMPORTANCE, accumulate_taylor_gradients, prune_width

__all__ = [
    "IMPORTANCE", "BudgetResult", "accumulate_taylor_gradients", "load_unet", "prune_to_budget", "prune_width",
    "remove_blocks", "save_unet",
]
