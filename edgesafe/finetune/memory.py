"""What a fine-tune needs in memory, estimated before it starts, and the check that it fits.

The estimate adds the frozen teacher (UNet, text encoder, VAE at the teacher's precision), the
student with its gradients and optimizer states, the upper level's optimizer states, the solver's
copies of the student (the penalty solver's phi with its own gradients and states; two-stage's frozen
distilled copy), and the activations
kept for the backward pass. Those are counted by tracing one training forward of the student on
the ``meta`` device (nothing allocated) at the recipe's resolution, with gradient checkpointing when
the recipe asks for it, and scaled to the step's samples; under mixed precision they are taken at
half size. It is an estimate: allocator slack and transient buffers come on top.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ..errors import EdgesafeError
from ..models.inputs import unet_example_inputs
from ..models.stats import meta_copy, param_bytes, peak_rss_gib

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    teacher: int
    student: int
    copies: int
    upper_states: int
    activations: int

    @property
    def total(self) -> int:
        return self.teacher + self.student + self.copies + self.upper_states + self.activations

    def figures(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in {**asdict(self), "total": self.total}.items()}


def activation_bytes(unet: UNet2DConditionModel, *, latent_size: int, text_length: int, samples: int,
                     checkpointing: bool) -> int:
    """Bytes the autograd graph of one training forward keeps for the backward, for ``samples`` samples."""
    shape = meta_copy(unet).train()
    if checkpointing:
        shape.enable_gradient_checkpointing()
    params = {p.untyped_storage()._cdata for p in shape.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            kept[storage._cdata] = storage.nbytes()
        return t

    inputs = unet_example_inputs(shape, batch=samples, text_length=text_length, sample_size=latent_size,
                                 device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        shape(*inputs)
    return sum(kept.values())


def estimate(teacher: StableDiffusionPipeline, student: UNet2DConditionModel, *, resolution: int,
             samples: int, half_precision: bool, checkpointing: bool, upper_fraction: float,
             trained_copies: int = 0, frozen_copies: int = 0, optimizer_state_bytes: int = 8) -> MemoryEstimate:
    """The memory of a fine-tune; ``samples`` is how many samples one step's graph holds at once,
    ``upper_fraction`` the share of the student's parameters with upper-level optimizer states,
    ``trained_copies`` / ``frozen_copies`` the solver's copies of the student (phi; a frozen distilled
    copy), and ``optimizer_state_bytes`` what the optimizer keeps per parameter."""
    scale = 0.5 if half_precision else 1.0
    frozen = sum(param_bytes(m) for m in (teacher.unet, teacher.text_encoder, teacher.vae))
    n = sum(p.numel() for p in student.parameters())
    trained = n * (4 + 4 + optimizer_state_bytes)  # fp32 weights, gradients, optimizer states
    acts = activation_bytes(student, latent_size=resolution // teacher.vae_scale_factor,
                            text_length=teacher.tokenizer.model_max_length, samples=samples,
                            checkpointing=checkpointing)
    return MemoryEstimate(
        teacher=int(frozen * scale), student=trained, copies=trained * trained_copies + n * 4 * frozen_copies,
        upper_states=int(n * upper_fraction * optimizer_state_bytes), activations=int(acts * scale),
    )


def available_bytes(device: torch.device) -> int:
    """Memory a run on ``device`` may use: the GPU's free memory plus what this process holds there, or
    the host's available memory plus this process's resident memory (Linux; elsewhere unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        with open(f"/proc/{os.getpid()}/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, KeyError, ValueError):  # not Linux: unknown, so not checked
        return sys.maxsize
    return info["MemAvailable"] + resident


def check_fits(est: MemoryEstimate, device: torch.device) -> None:
    """Stop, before any work, when the estimate exceeds what ``device`` has."""
    have = available_bytes(device)
    if est.total > have:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in est.figures().items() if k != "total" and v)
        raise EdgesafeError(
            f"finetune needs about {est.total / GIB:.1f} GiB on {device} ({parts} GiB) but {have / GIB:.1f} GiB is "
            "available: lower finetune.batch_size or data.resolution, or set finetune.gradient_checkpointing / "
            "finetune.mixed_precision"
        )


def peak_gib(device: torch.device) -> float:
    """The peak memory this process has used on ``device`` so far: allocated GPU memory, or resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / GIB, 3)
    return peak_rss_gib()
