"""What the bench measures: the teacher, the pruned and the fine-tuned students, and every exported
artefact, each a :class:`Subject` of a kind from :data:`SUBJECT_KINDS`:

- ``pytorch``: a diffusers pipeline folder, run by diffusers;
- ``onnx``: an exported ONNX folder, run by onnxruntime (CPU);
- ``openvino``: an exported OpenVINO folder, run by the OpenVINO runtime (CPU);
- ``coreml-weights``: a Core ML export's weights, decompressed into the fine-tuned PyTorch student, so
  its quality and safety are measured on any OS; its latency is the device runner's to measure
  (Core ML predicts only on macOS).

A kind's runner loads a subject, times its components, and generates images from given latents.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import EdgesafeError
from ..models.inputs import token_ids


@dataclass(frozen=True)
class Subject:
    name: str
    """Unique in a report: ``teacher``, ``pruned``, ``finetuned``, ``<export target>/<variant>``."""
    kind: str
    path: str
    stage: str
    """The stage that made it (erasure is tracked per stage)."""
    label: str
    base: str | None = None
    """``coreml-weights``: the PyTorch pipeline folder whose weights are replaced."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


class TorchRunner:
    """A diffusers pipeline (fp32, CPU)."""

    timed = True

    def __init__(self, subject: Subject):
        from ..models.loading import load_pipeline

        t0 = time.perf_counter()
        self.pipe = load_pipeline(subject.path)
        self.load_seconds = time.perf_counter() - t0

    @torch.inference_mode()
    def time_components(self, prompt: str, latents: np.ndarray, *, steps: int, guidance: float,
                        repeats: int) -> dict[str, list[float]]:
        pipe = self.pipe
        ids = token_ids(pipe.tokenizer, [prompt, ""])
        hidden = pipe.text_encoder(ids)[0]
        x = torch.from_numpy(latents)
        x2, t = torch.cat([x, x]), torch.tensor(500.0)
        z = x / pipe.vae.config.scaling_factor
        return {
            "text_encoder": _timed(lambda: pipe.text_encoder(ids), repeats),
            "unet_step": _timed(lambda: pipe.unet(x2, t, hidden), repeats),
            "vae_decode": _timed(lambda: pipe.vae.decode(z), repeats),
            "end_to_end": _timed(lambda: self.generate([prompt], latents, steps=steps, guidance=guidance), repeats),
        }

    @torch.inference_mode()
    def generate(self, prompts: list[str], latents: np.ndarray, *, steps: int, guidance: float) -> torch.Tensor:
        out = self.pipe(prompts, latents=torch.from_numpy(latents), num_inference_steps=steps,
                        guidance_scale=guidance, output_type="pt").images
        return out.float().clamp(0, 1)


class ExportedRunner:
    """An exported folder in its runtime's sessions (:class:`edgesafe.export.runtime.ExportedPipeline`)."""

    timed = True

    def __init__(self, subject: Subject, pipeline: Callable[[Path], Any]):
        t0 = time.perf_counter()
        self.runner = pipeline(Path(subject.path))
        self.load_seconds = time.perf_counter() - t0

    def time_components(self, prompt: str, latents: np.ndarray, *, steps: int, guidance: float,
                        repeats: int) -> dict[str, list[float]]:
        r = self.runner
        ids = token_ids(r.tokenizer, [prompt, ""]).numpy()
        hidden = r.run("text_encoder", input_ids=ids)[0]
        x2 = np.concatenate([latents, latents])
        return {
            "text_encoder": _timed(lambda: r.run("text_encoder", input_ids=ids), repeats),
            "unet_step": _timed(lambda: r.run("unet", sample=x2, timestep=np.array(500.0, np.float32),
                                              encoder_hidden_states=hidden), repeats),
            "vae_decode": _timed(lambda: r.run("vae_decoder", latent_sample=latents / r.scaling_factor), repeats),
            "end_to_end": _timed(lambda: self.generate([prompt], latents, steps=steps, guidance=guidance), repeats),
        }

    def generate(self, prompts: list[str], latents: np.ndarray, *, steps: int, guidance: float) -> torch.Tensor:
        images = self.runner(prompts, latents=latents, num_inference_steps=steps, guidance_scale=guidance)
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()


def _onnx(subject: Subject) -> ExportedRunner:
    from ..export.runtime import OnnxPipeline

    return ExportedRunner(subject, OnnxPipeline)


def _check_onnx(subject: Subject) -> None:
    from ..export.runtime import OnnxPipeline

    OnnxPipeline.check(Path(subject.path))


def _openvino(subject: Subject) -> ExportedRunner:
    from ..export.openvino import OpenVinoPipeline

    return ExportedRunner(subject, OpenVinoPipeline)


def _check_openvino(subject: Subject) -> None:
    from ..export.openvino import OpenVinoPipeline

    OpenVinoPipeline.check(Path(subject.path))


def _check_coreml(subject: Subject) -> None:
    from ..export.coreml import PACKAGE_MODULES, describe_package

    for package in PACKAGE_MODULES:
        describe_package(Path(subject.path) / f"{package}.mlpackage")


class CoremlWeightsRunner(TorchRunner):
    """The fine-tuned student with a Core ML export's weights, decompressed; images only."""

    timed = False

    def __init__(self, subject: Subject):
        from ..export.coreml import load_coreml_weights

        super().__init__(Subject(subject.name, "pytorch", subject.base or "", subject.stage, subject.label))
        t0 = time.perf_counter()
        self.coverage = load_coreml_weights(self.pipe, Path(subject.path))
        self.load_seconds += time.perf_counter() - t0


@dataclass(frozen=True)
class SubjectKind:
    """A registered kind of bench subject: ``runner(subject)`` loads it and times and generates with it."""

    runner: Callable[[Subject], Any]
    latency_note: str | None = None
    """Why host latency is not measured for this kind (None: it is)."""
    check: Callable[[Subject], None] = lambda subject: None
    """Parse the subject's files without loading them into a runtime, raising one clear error for a corrupt
    one: the bench checks every subject this way before it runs any."""


SUBJECT_KINDS: dict[str, SubjectKind] = {
    "pytorch": SubjectKind(TorchRunner),
    "onnx": SubjectKind(_onnx, check=_check_onnx),
    "openvino": SubjectKind(_openvino, check=_check_openvino),
    "coreml-weights": SubjectKind(
        CoremlWeightsRunner,
        "Core ML predicts only on macOS: weights measured in PyTorch for quality and safety; latency is the "
        "device runner's", check=_check_coreml),
}


def discover(run_root: Path, teacher_source: str, manifests: dict[str, dict]) -> list[Subject]:
    """The subjects of a run folder whose export stage is complete, in report order."""
    export = manifests.get("export")
    if not export or export.get("status") != "complete":
        raise EdgesafeError(f"{run_root}: no finished export stage; run `edgesafe compress` (or `edgesafe export`) "
                            "on it first")
    finetuned = run_root / "2-finetune" / "final"
    subjects = [
        Subject("teacher", "pytorch", teacher_source, "teacher", "teacher (PyTorch)"),
        Subject("pruned", "pytorch", str(run_root / "1-prune"), "prune", "pruned student before fine-tuning (PyTorch)"),
        Subject("finetuned", "pytorch", str(finetuned), "finetune", "fine-tuned student (PyTorch)"),
    ]
    from ..export.targets import TARGETS

    for target, variants in export.get("figures", {}).items():
        kind, label = TARGETS[target].subject_kind, TARGETS[target].subject_label
        for variant in variants:
            path = run_root / "3-export" / target / variant
            subjects.append(Subject(f"{target}/{variant}", kind, str(path), "export", label.format(variant=variant),
                                    base=str(finetuned) if kind == "coreml-weights" else None))
    for s in subjects[1:]:
        if not Path(s.path).exists():
            raise EdgesafeError(f"{s.path}: the {s.label} is missing from the run folder")
    return subjects
