"""ONNX export of a Stable Diffusion pipeline in the folder layout optimum's ONNX Runtime pipelines load.

``out/`` holds ``model_index.json``, ``tokenizer/``, ``scheduler/`` and one folder per component
(``text_encoder``, ``unet``, ``vae_encoder``, ``vae_decoder``) with ``model.onnx`` and the component's
``config.json``. Input and output names are optimum's, every batch axis is dynamic (and the UNet's and
VAE's spatial axes), and a component over 2 GB keeps its weights in ``model.onnx_data`` beside it.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from ..errors import EdgesafeError, first_line
from ..io import atomic_dir
from ..models.inputs import seeded_normal, token_ids

PROTO_LIMIT = 2**31 - 1  # protobuf's hard limit on one serialized message
EXTERNAL_DATA = "model.onnx_data"


class _TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _Unet(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeEncoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor):
        return self.vae.encode(sample).latent_dist.parameters


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor):
        return self.vae.decode(latent_sample).sample


@dataclass(frozen=True)
class Component:
    """One exported sub-model: how to wrap it, name its tensors and make example inputs."""

    wrap: Callable[[StableDiffusionPipeline], nn.Module]
    inputs: dict[str, dict[int, str]]  # name -> dynamic axes
    outputs: dict[str, dict[int, str]]
    example: Callable[[StableDiffusionPipeline, int], tuple[torch.Tensor, ...]]
    config: Callable[[StableDiffusionPipeline, Path], None]


def latent_shape(pipe: StableDiffusionPipeline, batch: int) -> tuple[int, int, int, int]:
    """Shape of the UNet's latents at the pipeline's default image size."""
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return batch, pipe.unet.config.in_channels, size, size


def image_shape(pipe: StableDiffusionPipeline, batch: int) -> tuple[int, int, int, int]:
    *_, h, w = latent_shape(pipe, batch)
    return batch, 3, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


def example_ids(pipe: StableDiffusionPipeline, batch: int) -> torch.Tensor:
    return token_ids(pipe.tokenizer, [""] * batch)


def _seeded(shape: tuple[int, ...]) -> torch.Tensor:
    return seeded_normal(shape, 0)


BATCH = {0: "batch_size"}
SPATIAL = {0: "batch_size", 2: "height", 3: "width"}

COMPONENTS: dict[str, Component] = {
    "text_encoder": Component(
        wrap=lambda p: _TextEncoder(p.text_encoder),
        inputs={"input_ids": {0: "batch_size", 1: "sequence_length"}},
        outputs={"last_hidden_state": {0: "batch_size", 1: "sequence_length"}, "pooler_output": BATCH},
        example=lambda p, b: (example_ids(p, b),),
        config=lambda p, d: p.text_encoder.config.to_json_file(str(d / "config.json")),
    ),
    "unet": Component(
        wrap=lambda p: _Unet(p.unet),
        inputs={"sample": SPATIAL, "timestep": {}, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"}},
        outputs={"out_sample": SPATIAL},
        example=lambda p, b: (
            _seeded(latent_shape(p, b)), torch.tensor(500.0),
            _seeded((b, p.tokenizer.model_max_length, p.unet.config.cross_attention_dim)),
        ),
        config=lambda p, d: p.unet.save_config(d),
    ),
    "vae_encoder": Component(
        wrap=lambda p: _VaeEncoder(p.vae),
        inputs={"sample": SPATIAL},
        outputs={"latent_parameters": SPATIAL},
        example=lambda p, b: (_seeded(image_shape(p, b)).clamp(-1, 1),),
        config=lambda p, d: p.vae.save_config(d),
    ),
    "vae_decoder": Component(
        wrap=lambda p: _VaeDecoder(p.vae),
        inputs={"latent_sample": SPATIAL},
        outputs={"sample": SPATIAL},
        example=lambda p, b: (_seeded((b, p.vae.config.latent_channels, *latent_shape(p, b)[2:])),),
        config=lambda p, d: p.vae.save_config(d),
    ),
}


def _tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: Path, *, external_over: int = PROTO_LIMIT) -> None:
    """Write ``model`` to ``path``; weights go to ``model.onnx_data`` when they exceed ``external_over`` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / EXTERNAL_DATA).unlink(missing_ok=True)
    if _tensor_bytes(model) > external_over:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def export_module(
    module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, inputs: dict[str, dict[int, str]],
    outputs: dict[str, dict[int, str]], *, dynamic: bool = True, opset: int = 17, external_over: int = PROTO_LIMIT,
) -> Path:
    """Export ``module`` (TorchScript exporter, fp32) to ``path`` with the given tensor names; with ``dynamic``
    the axes ``inputs`` and ``outputs`` name are dynamic, else every shape is ``example``'s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"  # the exporter writes external pieces here for models over 2 GB
        torch.onnx.export(
            module.eval(), example, str(raw), input_names=list(inputs), output_names=list(outputs),
            dynamic_axes={k: v for k, v in {**inputs, **outputs}.items() if v} if dynamic else None,
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
        save_onnx(onnx.load(str(raw)), path, external_over=external_over)  # load pulls external pieces back in
    return path


def unet_module(unet: nn.Module) -> nn.Module:
    """A UNet as the ONNX export sees it: (sample, timestep, encoder_hidden_states) -> the noise prediction."""
    return _Unet(unet)


def export_component(
    pipe: StableDiffusionPipeline, name: str, folder: Path, *, opset: int = 17, external_over: int = PROTO_LIMIT,
) -> Path:
    """Export one component into ``folder/model.onnx`` (+ ``config.json``) and return the model's path."""
    comp = COMPONENTS[name]
    path = export_module(comp.wrap(pipe), comp.example(pipe, 2), folder / "model.onnx", comp.inputs, comp.outputs,
                         opset=opset, external_over=external_over)
    comp.config(pipe, folder)
    return path


def export_onnx(
    pipe: StableDiffusionPipeline, out: Path, *, opset: int = 17, external_over: int = PROTO_LIMIT,
) -> Path:
    """Export every component of ``pipe`` to ``out`` (replaced whole, only once the export succeeded)."""
    try:
        with atomic_dir(Path(out)) as partial:
            for name in COMPONENTS:
                export_component(pipe, name, partial / name, opset=opset, external_over=external_over)
            pipe.tokenizer.save_pretrained(partial / "tokenizer")
            pipe.scheduler.save_pretrained(partial / "scheduler")
            pipe.save_config(partial)  # model_index.json, as optimum's exporter writes it
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        raise EdgesafeError(f"ONNX export failed: {first_line(exc)}") from None
    return Path(out)


def onnx_files(folder: Path) -> dict[str, Path]:
    """The component models of an exported folder, by component name."""
    return {name: folder / name / "model.onnx" for name in COMPONENTS if (folder / name / "model.onnx").is_file()}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
