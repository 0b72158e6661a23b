"""INT8 variants of an exported ONNX folder, one registry entry per method.

Each quantizer copies the fp32 folder and rewrites component models in the copy:

- ``int8-ort-dynamic``: onnxruntime dynamic quantization of the UNet (INT8 weights, activations
  quantized at run time);
- ``int8-ort-static``: onnxruntime static QDQ quantization of the UNet's Conv / MatMul / Gemm,
  calibrated on the UNet inputs the pipeline really sees (a sampling run over the recipe's captions);
- ``int8-nncf``: NNCF post-training quantization of the UNet on the same calibration set;
- ``int8-hybrid``: the UNet as ``int8-ort-static``, every other component weight-only INT8
  (per-channel INT8 initializers + DequantizeLinear, computed in fp32).

Core ML variants (linear INT8, palettization) live in :mod:`edgesafe.export.coreml`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from diffusers import StableDiffusionPipeline
from onnx import helper, numpy_helper

from ..io import atomic_dir
from ..models.inputs import seeded_normal
from .onnx import latent_shape, onnx_files, save_onnx

Calibration = list[dict[str, np.ndarray]]
OPS = ["Conv", "MatMul", "Gemm"]


@torch.no_grad()
def unet_calibration(
    pipe: StableDiffusionPipeline, captions: list[str], *, steps: int = 10, guidance: float = 5.0, seed: int = 0,
) -> Calibration:
    """UNet inputs recorded while ``pipe`` samples ``captions`` (one feed per step, guidance batch of 2)."""
    feeds: Calibration = []

    def record(_module, args, kwargs):
        sample, timestep = args[0], args[1]
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        feeds.append({"sample": sample.numpy().copy(), "timestep": np.array(float(timestep), np.float32),
                      "encoder_hidden_states": hidden.numpy().copy()})

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for i, caption in enumerate(captions):
            latents = seeded_normal(latent_shape(pipe, 1), seed + i)
            pipe(caption, latents=latents, num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
    finally:
        handle.remove()
    return feeds


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds, with the windows its strided
    calibration asks for (``set_range``)."""

    def __init__(self, feeds: Calibration):
        self.feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _prepared(path: Path, tmp: Path) -> Path:
    """The model after onnxruntime's pre-processing (symbolic shape inference skipped: it fails on UNets)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "prepared.onnx"
    quant_pre_process(str(path), str(out), skip_symbolic_shape=True)
    return out


def _ort_static(path: Path, calibration: Calibration) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = _prepared(path, Path(tmp))
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(src), str(out), _Reader(calibration), quant_format=QuantFormat.QDQ, op_types_to_quantize=OPS,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # one feed at a time, its ranges folded into the running min/max: the same ranges as holding every
            # tensor of every feed at once, which for an SD-size UNet at 512 px is tens of gigabytes
            extra_options={"ActivationSymmetric": False, "CalibStridedMinMax": 1},
        )
        save_onnx(onnx.load(str(out)), path)


def _ort_dynamic(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = _prepared(path, Path(tmp))
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(src), str(out), op_types_to_quantize=OPS, per_channel=True, weight_type=QuantType.QInt8)
        save_onnx(onnx.load(str(out)), path)


def _nncf(path: Path, calibration: Calibration) -> None:
    import nncf

    model = onnx.load(str(path))
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration))
    save_onnx(quantized, path)


def weight_only_int8(model: onnx.ModelProto, *, min_elements: int = 256) -> onnx.ModelProto:
    """Store every Conv / MatMul / Gemm weight initializer as per-output-channel symmetric INT8 feeding a
    DequantizeLinear node, so the file shrinks ~4x and compute stays fp32."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    new_nodes = []
    for name, tensor in list(inits.items()):
        nodes = users.get(name, [])
        if (not nodes or any(n.op_type not in OPS or list(n.input).index(name) != 1 for n in nodes)
                or tensor.data_type != onnx.TensorProto.FLOAT):
            continue
        w = numpy_helper.to_array(tensor)
        if w.size < min_elements or w.ndim < 2:
            continue
        axis = 0 if nodes[0].op_type == "Conv" else w.ndim - 1  # output channels
        if nodes[0].op_type == "Gemm" and any(a.name == "transB" and a.i for a in nodes[0].attribute):
            axis = 0
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.maximum(np.abs(w).max(axis=reduce), 1e-12) / 127.0
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        graph.initializer.remove(tensor)
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{name}_int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero"),
        ])
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                                          [name], axis=axis, name=f"{name}_dequantize"))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    return model


def _weight_only(path: Path) -> None:
    save_onnx(weight_only_int8(onnx.load(str(path))), path)


def _hybrid(folder: Path, calibration: Calibration) -> None:
    _ort_static(folder / "unet" / "model.onnx", calibration)
    for name, path in onnx_files(folder).items():
        if name != "unet":
            _weight_only(path)


ONNX_QUANTIZERS: dict[str, Callable[[Path, Calibration], None]] = {
    "int8-ort-dynamic": lambda folder, calibration: _ort_dynamic(folder / "unet" / "model.onnx"),
    "int8-ort-static": lambda folder, calibration: _ort_static(folder / "unet" / "model.onnx", calibration),
    "int8-nncf": lambda folder, calibration: _nncf(folder / "unet" / "model.onnx", calibration),
    "int8-hybrid": _hybrid,
}


def quantize_folder(src: Path, dst: Path, method: str, calibration: Calibration) -> Path:
    """Copy the fp32 export ``src`` to ``dst`` and apply ``method`` there; ``dst`` appears only when done."""
    with atomic_dir(dst, copy_from=src) as partial:
        ONNX_QUANTIZERS[method](partial, calibration)
    return dst
