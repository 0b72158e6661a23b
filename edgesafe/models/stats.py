"""Size and cost of a UNet: parameters, parameter bytes and multiply-accumulates per call."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from .inputs import unet_example_inputs

M = TypeVar("M", bound=torch.nn.Module)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def meta_copy(module: M) -> M:
    """A copy of ``module`` whose parameters and buffers live on the ``meta`` device (nothing is allocated
    for them, gradients are not copied); its structure and attributes are the original's."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def count_macs(unet: UNet2DConditionModel, *, batch: int = 1, text_length: int | None = None) -> int:
    """Multiply-accumulates of one UNet call (FLOPs / 2, as torch's counter reports them).

    Counted on a ``meta``-device copy: nothing is allocated, and attention is counted as the matrix
    products it is (on the CPU, fused attention kernels have no FLOP formula and would count as zero).
    """
    shape = unet if next(unet.parameters()).is_meta else meta_copy(unet)
    inputs = unet_example_inputs(shape, batch=batch, text_length=text_length, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        shape(*inputs)
    return counter.get_total_flops() // 2


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB. On Linux from ``VmHWM``, which starts afresh at
    ``exec`` (``ru_maxrss`` keeps the forking parent's peak); elsewhere from ``ru_maxrss``."""
    import resource
    import sys

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)
