"""Generate images from an exported folder with the bare runtime (no optimum needed):
:class:`OnnxPipeline` runs onnxruntime sessions; :class:`edgesafe.export.openvino.OpenVinoPipeline` the OpenVINO
runtime.

The loop is diffusers' ``StableDiffusionPipeline`` loop (classifier-free guidance with the empty
prompt, the folder's scheduler), so with the same latents it reproduces the PyTorch pipeline and
any gap is the export's error.
"""

from __future__ import annotations

import time
from pathlib import Path

import diffusers
import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import CLIPTokenizer

from ..errors import ModelLoadError, first_line
from ..io import read_json
from ..models.inputs import token_ids
from .onnx import COMPONENTS


def session(path: Path, *, threads: int = 0) -> ort.InferenceSession:
    """A CPU onnxruntime session for ``path``; an unreadable model is one clear error."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({first_line(exc)})") from None


class ExportedPipeline:
    """Text-to-image with the ``text_encoder``, ``unet`` and ``vae_decoder`` of an exported folder; a runtime
    subclass says which file holds a component (:attr:`model_file`) and how to load and run it."""

    model_file = ""
    runtime = ""

    def __init__(self, folder: Path, *, threads: int = 0):
        folder = Path(folder)
        files = self.files(folder)
        t0 = time.perf_counter()
        self.threads = threads
        self.sessions = {name: self.load(path) for name, path in files.items()}
        self.load_seconds = time.perf_counter() - t0
        index = read_json(folder / "model_index.json")
        self.folder = folder
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        self.scheduler_config = scheduler_cls.load_config(folder / "scheduler")
        self.scheduler_cls = scheduler_cls
        vae = read_json(folder / "vae_decoder" / "config.json")
        self.scaling_factor = vae["scaling_factor"]

    @classmethod
    def files(cls, folder: Path) -> dict[str, Path]:
        """Component -> model file of ``folder``; one clear error when one the pipeline needs is missing."""
        files = {n: folder / n / cls.model_file for n in COMPONENTS if (folder / n / cls.model_file).is_file()}
        missing = [n for n in ("text_encoder", "unet", "vae_decoder") if n not in files]
        if missing or not (folder / "model_index.json").is_file():
            what = ", ".join(missing) or "model_index.json"
            raise ModelLoadError(f"{folder}: not an exported {cls.runtime} pipeline (missing {what})")
        return files

    @classmethod
    def check(cls, folder: Path) -> None:
        """Parse every model file of ``folder`` without loading it into the runtime (a fraction of the load's
        time), so that a corrupt artefact is found before any work."""
        for path in cls.files(Path(folder)).values():
            cls.parse(path)

    @staticmethod
    def parse(path: Path) -> None:
        """Read one component file's graph; raise :class:`ModelLoadError` if it is not a model."""
        raise NotImplementedError

    def load(self, path: Path):
        """The runtime's loaded model of one component file."""
        raise NotImplementedError

    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        """Component ``name``'s outputs for ``feeds`` (cast to the types the model declares)."""
        raise NotImplementedError

    def encode_prompt(self, prompts: list[str]) -> np.ndarray:
        return self.run("text_encoder", input_ids=token_ids(self.tokenizer, prompts).numpy())[0]

    def __call__(
        self, prompts: list[str], *, latents: np.ndarray, num_inference_steps: int = 20, guidance_scale: float = 5.0,
    ) -> np.ndarray:
        """Images in [0, 1], NHWC, from the given initial ``latents`` (one per prompt)."""
        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps)
        text = self.encode_prompt(list(prompts))
        uncond = self.encode_prompt([""] * len(prompts))
        hidden = np.concatenate([uncond, text])
        x = torch.from_numpy(np.asarray(latents, dtype=np.float32)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            noise = torch.from_numpy(self.run("unet", sample=model_in.numpy(), timestep=np.array(t, dtype=np.float32),
                                              encoder_hidden_states=hidden)[0])
            uncond_noise, text_noise = noise.chunk(2)
            noise = uncond_noise + guidance_scale * (text_noise - uncond_noise)
            x = scheduler.step(noise, t, x).prev_sample
        image = self.run("vae_decoder", latent_sample=(x / self.scaling_factor).numpy())[0]
        return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


class OnnxPipeline(ExportedPipeline):
    """An exported ONNX folder (optimum's layout) in onnxruntime CPU sessions."""

    model_file = "model.onnx"
    runtime = "ONNX"

    @staticmethod
    def parse(path: Path) -> None:
        try:
            onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and onnx's own errors alike
            raise ModelLoadError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None

    def load(self, path: Path) -> ort.InferenceSession:
        return session(path, threads=self.threads)

    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        sess = self.sessions[name]
        types = {i.name: i.type for i in sess.get_inputs()}
        cast = {k: v.astype(np.int64 if "int64" in types[k] else np.int32 if "int32" in types[k] else np.float32)
                for k, v in feeds.items()}
        return sess.run(None, cast)
