"""Train the tiny-shapes teacher pipeline and its evaluator from scratch, on the CPU, resumably.

Phases, each a loop that checkpoints into ``work/<phase>/`` (weights, EMA weights and optimizer state, in
:mod:`edgesafe.training`'s format) and resumes from there:

1. ``evaluator``: the object / colour / style classifier (:mod:`.build_evaluator` trains it alone);
2. ``vae``: an ``AutoencoderKL`` (32x32x3 <-> 16x16x4), whose latent scale is measured afterwards;
3. cycles of the denoising loss (min-SNR weighted) over a ``CLIPTextModel`` and a
   ``UNet2DConditionModel``, captions dropped 10% of the time for guidance; each cycle is a cosine
   schedule warm-restarted from the previous cycle's EMA weights, and may draw chosen concepts
   more often (see ``Schedule``).

Every batch is drawn from a generator seeded by (seed, phase, step), so a resumed build equals
an uninterrupted one, and the same seed rebuilds the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel, compute_snr
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ...io import write_json
from ...models.inputs import token_ids
from ...training import Checkpoints, run_steps
from . import world
from .evaluator import HEADS, ShapesEvaluator, training_batch
from .tokenizer import MAX_LENGTH, check_word_level, write_tokenizer

ProgressFn = Callable[[str, int, int, float], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Cycle:
    """One warm-restarted cosine cycle of the denoising objective over the text encoder and UNet.

    Batches draw combinations holding a value in ``oversample`` ``factor`` times as often."""

    name: str
    steps: int
    lr: float
    oversample: tuple[str, ...] = ()
    factor: float = 1.0

    def __post_init__(self) -> None:
        if unknown := set(self.oversample) - {v for values in world.HEADS.values() for v in values}:
            raise ValueError(f"cycle {self.name!r} oversamples unknown values {sorted(unknown)}")


@dataclass(frozen=True)
class Schedule:
    """How long each phase trains. ``full`` makes the committed weights: two cycles over the whole
    world (``diffusion``, then ``refine``, after which prompts and checkerboards were right every time
    but stars only 84%, their arms blunt or merged), then ``star``, which draws combinations holding
    a star six times as often; ``short`` proves the builder runs end to end."""

    evaluator_steps: int = 1500
    evaluator_batch: int = 128
    vae_steps: int = 2500
    vae_batch: int = 32
    diffusion_batch: int = 64
    cycles: tuple[Cycle, ...] = (
        Cycle("diffusion", 4000, 4e-4),
        Cycle("refine", 4000, 3e-4),
        Cycle("star", 4000, 2e-4, ("star",), 6.0),
    )
    checkpoint_every: int = 200


SCHEDULES = {
    "full": Schedule(),
    "short": Schedule(
        evaluator_steps=4, evaluator_batch=8, vae_steps=4, vae_batch=4, diffusion_batch=4,
        cycles=tuple(replace(c, steps=4 if i == 0 else 2) for i, c in enumerate(Schedule().cycles)),
        checkpoint_every=2,
    ),
}

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1,
)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
    )


def make_text_encoder(vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, projection_dim=64, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 4, up_block_types=("CrossAttnUpBlock2D",) * 4,
        block_out_channels=(32, 64, 96, 96), layers_per_block=1, cross_attention_dim=64, attention_head_dim=4,
        norm_num_groups=16,
    )


def architecture_id() -> str:
    """A short hash of the evaluator, VAE, text encoder and UNet configs, so that checkpoints written for
    another architecture are never resumed."""
    configs = [dict(ShapesEvaluator().config), dict(make_vae().config), dict(make_unet().config),
               make_text_encoder(1, 0, 0).config.to_dict()]
    kept = [{k: v for k, v in c.items() if not k.startswith("_") and not k.endswith("_version")} for c in configs]
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _lr(base: float, step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _rngs(seed: int, phase: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    rng = np.random.default_rng([seed, phase, step])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def _train(
    folder: Path,
    modules: dict[str, nn.Module],
    lr: float,
    steps: int,
    loss_fn: Callable[[int], torch.Tensor],
    *,
    every: int,
    ema_decay: float | None,
    progress: ProgressFn | None,
) -> None:
    """Run a resumable AdamW loop over ``modules`` (checkpoints in ``folder``); leave them holding their EMA
    weights (diffusers' ``EMAModel``) when ``ema_decay`` is set."""
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    emas = {k: EMAModel(m.parameters(), decay=ema_decay) for k, m in modules.items()} if ema_decay else {}
    checkpoints = Checkpoints(folder)
    start = 0
    if found := checkpoints.load():
        _, tensors, state, _ = found
        start = Checkpoints.restore(tensors, state, modules, {"adamw": opt})
        for k, ema in emas.items():
            shadow = [tensors[f"ema.{k}.{i}"] for i in range(len(ema.shadow_params))]
            ema.load_state_dict({**state["ema"][k], "shadow_params": shadow})

    def step(i: int) -> None:
        for group in opt.param_groups:
            group["lr"] = _lr(lr, i, steps)
        loss = loss_fn(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, ema in emas.items():
            ema.step(modules[k].parameters())
        if progress:
            progress(folder.name, i + 1, steps, loss.item())

    def save(i: int) -> None:
        shadows = {f"ema.{k}.{j}": t for k, ema in emas.items() for j, t in enumerate(ema.shadow_params)}
        state = {"ema": {k: {x: v for x, v in ema.state_dict().items() if x != "shadow_params"}
                         for k, ema in emas.items()}}
        checkpoints.save(i, modules, {"adamw": opt}, tensors=shadows, state=state)

    for m in modules.values():
        m.train()
    run_steps(start, steps, step, save, every=every)
    for k, ema in emas.items():
        ema.copy_to(modules[k].parameters())
    for m in modules.values():
        m.eval()


def train_evaluator(work: Path, *, seed: int, schedule: Schedule, progress: ProgressFn | None) -> ShapesEvaluator:
    """Phase 1: the evaluator, on :func:`training_batch`'s images, checkpointed in ``work/evaluator``."""
    torch.manual_seed(seed)
    evaluator = ShapesEvaluator()

    def loss(step: int) -> torch.Tensor:
        rng, gen = _rngs(seed, 1, step)
        images, labels = training_batch(schedule.evaluator_batch, rng, gen)
        logits, _ = evaluator(images)
        return sum(nn.functional.cross_entropy(logits[h], labels[:, i]) for i, h in enumerate(HEADS))

    _train(work / "evaluator", {"evaluator": evaluator}, 2e-3, schedule.evaluator_steps, loss,
           every=schedule.checkpoint_every, ema_decay=None, progress=progress)
    return evaluator


def save_evaluator(evaluator: ShapesEvaluator, out: Path, *, seed: int, schedule: Schedule, seconds: float) -> None:
    """Write ``out/tiny-shapes-evaluator`` with a ``build.json`` saying how it was trained."""
    evaluator.save_pretrained(out / "tiny-shapes-evaluator", safe_serialization=True)
    write_json(out / "tiny-shapes-evaluator" / "build.json", {
        "seed": seed, "evaluator_steps": schedule.evaluator_steps, "evaluator_batch": schedule.evaluator_batch,
        "seconds": seconds, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"})


def build(
    out: Path,
    *,
    work: Path,
    seed: int = 0,
    schedule: Schedule = SCHEDULES["full"],
    progress: ProgressFn | None = None,
) -> dict:
    """Train everything and write ``out/tiny-shapes`` (pipeline) and ``out/tiny-shapes-evaluator``."""
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    s = schedule
    if (work / "build.json").exists():
        seconds = json.loads((work / "build.json").read_text())["seconds"]

    def timed(name: str, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        result = fn()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        write_json(work / "build.json", {"seconds": seconds})
        return result

    # 1. evaluator
    evaluator = timed("evaluator", lambda: train_evaluator(work, seed=seed, schedule=s, progress=progress))

    # 2. VAE
    torch.manual_seed(seed + 1)
    vae = make_vae()

    def vae_loss(step: int) -> torch.Tensor:
        rng, gen = _rngs(seed, 2, step)
        images = torch.from_numpy(world.sample_batch(s.vae_batch, rng)[0])
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        return (recon - images).abs().mean() + 1e-6 * posterior.kl().mean()

    timed("vae", lambda: _train(work / "vae", {"vae": vae}, 1e-3, s.vae_steps, vae_loss,
                                every=s.checkpoint_every, ema_decay=0.999, progress=progress))
    with torch.no_grad():
        rng, gen = _rngs(seed, 3, 0)
        latents = vae.encode(torch.from_numpy(world.sample_batch(256, rng)[0])).latent_dist.sample(generator=gen)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))

    # 3. text encoder + UNet
    tokenizer = write_tokenizer(world.vocabulary(), work / "tokenizer")
    bad = check_word_level(tokenizer, world.vocabulary())
    if bad:
        raise RuntimeError(f"tokenizer splits world words: {bad}")
    torch.manual_seed(seed + 2)
    text_encoder = make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = make_unet()
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)

    def diffusion_loss(phase: int, step: int, oversample: tuple[str, ...] = (), factor: float = 1.0) -> torch.Tensor:
        rng, gen = _rngs(seed, phase, step)
        images, captions, _ = world.sample_batch(s.diffusion_batch, rng, oversample=oversample, factor=factor)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(torch.from_numpy(images)).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        ids = token_ids(tokenizer, captions, max_length=MAX_LENGTH)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 (Hang et al., 2023)
        return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    vae.requires_grad_(False)
    modules = {"text_encoder": text_encoder, "unet": unet}
    for i, cycle in enumerate(s.cycles):  # phases 4, 5, ...: each cycle draws its own batch stream
        loss_fn = partial(diffusion_loss, 4 + i, oversample=cycle.oversample, factor=cycle.factor)
        timed(cycle.name, partial(_train, work / cycle.name, modules, cycle.lr, cycle.steps, loss_fn,
                                  every=s.checkpoint_every, ema_decay=0.999, progress=progress))

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "tiny-shapes", safe_serialization=True)
    save_evaluator(evaluator, out, seed=seed, schedule=schedule, seconds=seconds["evaluator"])
    info = {
        "seed": seed,
        "schedule": asdict(schedule),
        "seconds": seconds,
        "build_seconds": sum(seconds.values()),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    write_json(out / "tiny-shapes" / "build.json", info)
    return info
