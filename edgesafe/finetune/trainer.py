"""The fine-tuning loop: one loop for every solver, on HF Accelerate (one CPU, one GPU or many ranks;
each rank draws its own batches and gradients are averaged before every optimizer step).

Every batch is drawn from generators seeded by (seed, step), so a run resumed from a checkpoint
sees the data an uninterrupted run would. Checkpoints (:mod:`edgesafe.training`) hold the student, phi,
feature projections, optimizer states and RNG state, with the solver, model fingerprint and loss curves
in the header. SIGINT and SIGTERM end the run after the current step with a checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ..data import Batches, training_resolution
from ..errors import CheckpointError, EdgesafeError
from ..models.structure import KeptChannels
from ..recipe import Concept, Recipe
from ..runs import digest
from ..training import Checkpoints, run_steps
from .losses import DenoisingTask, FeatureAligner, LowerObjective
from .memory import check_fits
from .memory import estimate as estimate_memory
from .optimizers import OPTIMIZERS
from .solvers import SHARED_SETTINGS, SOLVERS, Setup, Solver, StepLosses, UpperTerm
from .unlearn import OBJECTIVES, concept_prediction, parameter_subset, unlearning_loss, unlearning_target
from .upper import UPPER_LATENTS

CONCEPT_BATCH = 8
HELD_OUT_SEED = 2**31 - 1
"""The data seed of :meth:`Trainer.held_out_losses` (training draws ``seed * 1000 + rank``)."""


CONCEPT_FIELDS = ("name", "target", "objective", "prompts", "anchor", "eta", "params")
"""What fine-tuning reads of a concept (its paraphrases and detector are the bench's)."""


def stage_reads(recipe: Recipe) -> list[str]:
    """The recipe fields a fine-tune reads (the stage's key, so that a setting its solver ignores does not redo it):
    the shared ``finetune`` settings, its solver's own, the concepts, the data, and the sampler where the upper
    latents are generated."""
    ft = recipe.finetune
    paths = [f"finetune.{k}" for k in (*SHARED_SETTINGS, *SOLVERS[ft.solver].reads)]
    paths += ["model.source", "data", *(f"concepts[].{f}" for f in CONCEPT_FIELDS)]
    if recipe.concepts and ft.upper_latents != "lower-batch":
        paths.append("sampling")
    return paths


def model_fingerprint(unet: torch.nn.Module) -> str:
    return digest([(n, list(t.shape)) for n, t in unet.state_dict().items()])


@dataclass
class TrainResult:
    student: UNet2DConditionModel
    curves: list[dict[str, float]]
    steps: int
    resumed_from: int
    seconds_per_step: float


class Trainer:
    """Builds the objectives, optimizers and solver of a recipe and runs them, resumably.

    Args:
        teacher: the teacher pipeline (frozen; its text encoder and VAE serve the student too).
        student: the pruned UNet to fine-tune (trained in place).
        recipe: ``finetune`` (solver and settings), ``concepts``, ``data`` and ``seed``.
        folder: where checkpoints (``checkpoints/``) and cached concept latents go.
        kept_channels: the teacher channels each student block output kept (``read_structure`` of the pruned
            UNet's folder), for ``feature_align: kept``.
        accelerator: an HF Accelerate ``Accelerator`` (default: one process, on the GPU if there is one).

    Raises:
        EdgesafeError: the run cannot fit the device's memory (with the estimate), or fp16 without a GPU.
    """

    def __init__(self, teacher: StableDiffusionPipeline, student: UNet2DConditionModel, recipe: Recipe,
                 folder: Path, *, kept_channels: KeptChannels | None = None, accelerator: Accelerator | None = None):
        ft = recipe.finetune
        kind = SOLVERS[ft.solver]
        self.recipe, self.folder = recipe, Path(folder)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.checkpoints = Checkpoints(self.folder / "checkpoints", writer=self.accelerator.is_main_process)
        device = self.device = self.accelerator.device
        if ft.mixed_precision == "fp16" and device.type != "cuda":
            raise EdgesafeError(f"finetune.mixed_precision fp16 needs a CUDA GPU (this run is on {device.type}); "
                                "use bf16 or no")
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[ft.mixed_precision]
        resolution = training_resolution(recipe, teacher)
        subsets = {c.name: parameter_subset(student, c.params) for c in recipe.concepts}
        trained, frozen = kind.copies(ft)
        self.memory_estimate = estimate_memory(
            teacher, student, resolution=resolution, samples=self._graph_samples(),
            half_precision=self.amp_dtype is not None, checkpointing=ft.gradient_checkpointing,
            trained_copies=trained, frozen_copies=frozen,
            upper_fraction=self._upper_fraction(student, subsets) if kind.separate_upper_opt else 0.0,
            optimizer_state_bytes=OPTIMIZERS[ft.optimizer].state_bytes,
        )
        check_fits(self.memory_estimate, device)

        torch.manual_seed(recipe.seed)
        for frozen_module in (teacher.unet, teacher.text_encoder, teacher.vae):
            frozen_module.requires_grad_(False).eval().to(device, dtype=self.amp_dtype or torch.float32)
        self.task = DenoisingTask(teacher)
        self.teacher = teacher.unet
        self.student = student.to(device).train().requires_grad_(True)  # a frozen UNet handed in trains too
        if ft.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        aligner = (FeatureAligner(student, self.teacher, ft.lower.feature_align, kept_channels).to(device)
                   if ft.lower.feature_kd else None)
        self.aligner = aligner
        self.objective = LowerObjective(self.teacher, self.task, ft.lower, aligner)
        self.solver: Solver = kind(Setup(
            student=student, settings=ft, subsets=subsets, build=OPTIMIZERS[ft.optimizer].build,
            extra=list(aligner.parameters()) if aligner is not None else [],
            scaler=torch.amp.GradScaler(device.type, enabled=ft.mixed_precision == "fp16"),
        ))
        if self.accelerator.num_processes > 1:
            self.solver.sync = self._all_reduce_grads
        rank = self.accelerator.process_index
        self.batches = Batches(recipe, batch_size=ft.batch_size, resolution=resolution, seed=recipe.seed * 1000 + rank)
        self.fingerprint = model_fingerprint(student)
        self.upper = None
        if recipe.concepts:
            with self.autocast():
                self.upper = UPPER_LATENTS[ft.upper_latents](recipe, self.task, student, self.folder,
                                                             resolution // teacher.vae_scale_factor)

    def _graph_samples(self) -> int:
        """Samples whose activations one autograd graph holds (every solver builds one graph at a time)."""
        ft = self.recipe.finetune
        return max(ft.batch_size, min(CONCEPT_BATCH, ft.batch_size) if self.recipe.concepts else 0)

    @staticmethod
    def _upper_fraction(student: UNet2DConditionModel, subsets: dict[str, list[str]]) -> float:
        """The share of the student's parameters in the union of the concepts' subsets."""
        names = {n for subset in subsets.values() for n in subset}
        sizes = {n: p.numel() for n, p in student.named_parameters()}
        return sum(sizes[n] for n in names) / sum(sizes.values())

    def autocast(self) -> torch.autocast:
        """The forward passes' precision (a no-op context without mixed precision)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _all_reduce_grads(self, opt: torch.optim.Optimizer) -> None:
        """Average gradients over ranks (each rank draws its own batches), so every rank takes the same
        step. Explicit rather than DDP's hooks, because the penalty solver builds its gradients with
        ``torch.autograd.grad``, which those hooks never see."""
        import torch.distributed as dist

        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.accelerator.num_processes

    # --- checkpoints -------------------------------------------------------------------------
    def _modules(self) -> dict[str, torch.nn.Module]:
        mods = {"student": self.student, **self.solver.modules()}
        if self.aligner is not None:
            mods["aligner"] = self.aligner
        return mods

    def save_checkpoint(self, step: int, curves: list[dict[str, float]]) -> Path:
        state = {"solver": self.recipe.finetune.solver, "fingerprint": self.fingerprint,
                 "solver_state": self.solver.state()}
        if self.solver.scaler.is_enabled():
            state["grad_scaler"] = self.solver.scaler.state_dict()
        path = self.checkpoints.save(step, self._modules(), self.solver.optimizers(),
                                     tensors={"rng.torch": torch.get_rng_state()}, state=state,
                                     header={"curves": json.dumps(curves)})
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self) -> tuple[int, list[dict[str, float]]]:
        """Restore the latest checkpoint; (0, []) when there is none."""
        found = self.checkpoints.load()
        if found is None:
            return 0, []
        path, tensors, state, header = found
        if "curves" not in header or "fingerprint" not in state:
            raise CheckpointError(f"{path}: not an edgesafe fine-tuning checkpoint")
        if state["fingerprint"] != self.fingerprint:
            raise CheckpointError(f"{path}: checkpoint is from another model (its layers do not match the student)")
        if state.get("solver") != self.recipe.finetune.solver:
            raise CheckpointError(f"{path}: checkpoint is from solver {state.get('solver')!r}, "
                                  f"not {self.recipe.finetune.solver!r}")
        step = Checkpoints.restore(tensors, state, self._modules(), self.solver.optimizers())
        self.solver.load_state(state.get("solver_state", {}))
        if "grad_scaler" in state:
            self.solver.scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        return step, json.loads(header["curves"])

    # --- the loop ------------------------------------------------------------------------------
    def _losses(self, step: int, record: dict[str, float]) -> StepLosses:
        """The step's losses, each computed when a solver first asks for it (an erase step of ``two-stage`` never
        encodes the lower batch's teacher outputs unless its upper latents come from that batch)."""
        images, captions = self.batches(step)
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.recipe.seed, 11, step]).integers(2**62)))
        cache: dict[Any, Any] = {}

        def lower_inputs() -> dict[str, torch.Tensor]:
            if "inputs" not in cache:
                with self.autocast():
                    cache["inputs"] = self.task.inputs(images, captions, gen)
            return cache["inputs"]

        def lower(model: torch.nn.Module) -> torch.Tensor:
            inputs = lower_inputs()
            with self.autocast():
                if "teacher" not in cache:
                    cache["teacher"] = self.objective.teacher_outputs(inputs)
                terms = self.objective(model, inputs, cache["teacher"])
            if model is self.student:
                record.update({k: v.item() for k, v in terms.items() if k != "total"})
            return terms["total"]

        reference = self.solver.reference_model(step) or self.teacher
        n = min(CONCEPT_BATCH, len(images))

        def term(index: int, concept: Concept) -> UpperTerm:
            def batch() -> tuple[Any, torch.Tensor]:
                if index not in cache:
                    with self.autocast():
                        b = self.upper(concept, index, step, n, lower_inputs)
                        target = unlearning_target(reference, b.sample, b.timestep, concept, b.prompts,
                                                   self.task.encode_text)
                    cache[index] = (b, target)
                return cache[index]

            def predict(model: torch.nn.Module) -> torch.Tensor:
                b, _ = batch()
                with self.autocast():
                    return concept_prediction(model, b.sample, b.timestep, b.prompts, self.task.encode_text)

            def held() -> torch.Tensor:
                if ("reference", index) not in cache:
                    with torch.no_grad():
                        cache["reference", index] = predict(reference)
                return cache["reference", index]

            return UpperTerm(concept.name, predict, lambda: batch()[1], held)

        return StepLosses(lower=lower, upper=[term(i, c) for i, c in enumerate(self.recipe.concepts)])

    @torch.no_grad()
    def held_out_losses(self, batches: int = 8) -> dict[str, float]:
        """The student's L_ft and L_unlearn on batches training never draws, comparable across solvers,
        settings and seeds (one fixed data seed, no solver's weights): ``denoise`` and ``output_kd``, unweighted
        MSE on held-out data; per concept, on the same noisy latents under the concept's prompts,
        ``concept_kd.<concept>`` (MSE to the teacher's prediction) and ``unlearn.<concept>.<objective>`` for every
        objective of ``OBJECTIVES`` (MSE to its target). Their ratio reads erasure apart from distillation: above 1
        while the student predicts the concept as the teacher does, below 1 once it predicts the target instead.
        Means over ``batches`` batches of the recipe's batch size."""
        held = Batches(self.recipe, batch_size=self.recipe.finetune.batch_size, resolution=self.batches.resolution,
                       seed=HELD_OUT_SEED)
        sums: dict[str, float] = {}

        def add(key: str, value: torch.Tensor) -> None:
            sums[key] = sums.get(key, 0.0) + value.item() / batches

        for k in range(batches):
            images, captions = held(k)
            with self.autocast():
                inputs = self.task.inputs(images, captions, torch.Generator().manual_seed(HELD_OUT_SEED + k))
                args = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
                pred = self.student(*args).sample.float()
                add("denoise", torch.nn.functional.mse_loss(pred, inputs["target"]))
                add("output_kd", torch.nn.functional.mse_loss(pred, self.teacher(*args).sample.float()))
                n = min(CONCEPT_BATCH, len(images))
                x, t = inputs["sample"][:n], inputs["timestep"][:n]
                for index, concept in enumerate(self.recipe.concepts):
                    picks = np.random.default_rng([HELD_OUT_SEED, k, index]).integers(0, len(concept.prompts), n)
                    prompts = [concept.prompts[i] for i in picks]
                    states = self.task.encode_text(prompts)
                    add(f"concept_kd.{concept.name}", torch.nn.functional.mse_loss(
                        self.student(x, t, states).sample.float(), self.teacher(x, t, states).sample.float()))
                    for objective, target in OBJECTIVES.items():
                        goal = target(self.teacher, x, t, concept, prompts, self.task.encode_text)
                        add(f"unlearn.{concept.name}.{objective}",
                            unlearning_loss(self.student, goal, x, t, prompts, self.task.encode_text))
        return sums

    def run(self, *, resume: bool, checkpoint_every: int,
            progress: Callable[[int, int], None] | None = None) -> TrainResult:
        """Run the solver's steps, from the last checkpoint when ``resume``.

        Args:
            resume: continue from ``folder/checkpoints`` (a fresh start when there is none).
            checkpoint_every: steps between checkpoints (one is always written at the end).
            progress: called with (steps done, steps in all).

        Returns:
            The student, the loss curves, the steps run, the step resumed from and seconds per step.

        Raises:
            CheckpointError: a checkpoint of another model, solver or recipe, or a corrupt one.
            Interrupted: SIGINT / SIGTERM, after a checkpoint of the current step.
        """
        start, curves = self.load_checkpoint() if resume else (0, [])
        total = self.solver.total_steps()

        def step(i: int) -> None:
            record: dict[str, float] = {}
            figures = self.solver.step(i, self._losses(i, record))
            curves.append({"step": i + 1, **figures, **record})

        t0 = time.perf_counter()
        done = run_steps(start, total, step, lambda i: self.save_checkpoint(i, curves), every=checkpoint_every,
                         progress=progress)
        seconds = (time.perf_counter() - t0) / max(1, done)
        return TrainResult(self.student.eval(), curves, total, start, seconds)
