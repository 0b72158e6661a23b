"""Variants of an exported ONNX folder, one registry entry per method.

Each variant copies the fp32 folder and rewrites component models in the copy:

- ``fp32-optimized``: onnxruntime's transformer-graph fusions, still fp32 (:mod:`edgesafe.export.optimize`);
- ``int8-ort-dynamic``: onnxruntime dynamic quantization of the UNet (INT8 weights, activations
  quantized at run time);
- ``int8-ort-static``: onnxruntime static quantization of the UNet in the format this CPU runs fastest
  (:func:`int8_scheme`), calibrated on the UNet inputs the pipeline really sees (a sampling run over the
  recipe's captions), with the layers INT8 hurts most kept in fp32 (:func:`always_fp32`);
- ``int8-mixed``: ``int8-ort-static`` with the fewest further layers kept in fp32 that bring the images to
  ``export.mixed_psnr_db`` against fp32 (:mod:`edgesafe.export.sensitivity`);
- ``int8-tensorrt``: the same calibration and fp32 layers in the form TensorRT's explicit quantization reads
  (:data:`TENSORRT`: QDQ pairs, int8 activations and weights, every zero point 0), for Jetson and other NVIDIA
  boxes (onnxruntime's CPU runs it too);
- ``int8-nncf``: NNCF post-training quantization (QDQ) of the UNet on the same calibration set, the same layers
  kept in fp32 (NNCF collects each quantized layer's activations as graph outputs of one run: at SD's 512 px
  that is past 24 GiB);
- ``int8-hybrid``: the UNet as ``int8-ort-static``, every other component weight-only INT8
  (per-channel INT8 initializers + DequantizeLinear, computed in fp32).

Core ML variants (linear INT8, palettization) live in :mod:`edgesafe.export.coreml`, OpenVINO's in
:mod:`edgesafe.export.openvino`.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from diffusers import StableDiffusionPipeline
from onnx import helper, numpy_helper

from ..errors import EdgesafeError, first_line
from ..io import atomic_dir
from ..measure.host import cpu_flags
from ..models.inputs import seeded_normal
from .onnx import latent_shape, onnx_files, save_onnx

Calibration = list[dict[str, np.ndarray]]
OPS = ["Conv", "MatMul", "Gemm"]


@dataclass(frozen=True)
class QuantizeInputs:
    """What the calibrated variants need, prepared once per export."""

    calibration: Calibration
    """UNet feeds recorded while sampling the recipe's captions (:func:`unet_calibration`)."""
    prompts: list[str]
    """The prompts ``int8-mixed`` compares images on (the parity prompts)."""
    steps: int
    guidance: float
    mixed_psnr_db: float
    """The image PSNR against fp32 that ``int8-mixed`` keeps."""


@dataclass(frozen=True)
class Int8Scheme:
    """The INT8 format and types for onnxruntime's CPU kernels on this machine."""

    quant_format: str
    """``QOperator`` (QLinearConv / QLinearMatMul kernels) or ``QDQ``."""
    reduce_range: bool
    """7-bit weights, for x86 CPUs without VNNI, whose u8 x s8 instruction saturates at full range."""
    reason: str
    symmetric: bool = False
    """int8 activations with zero point 0 and fp32 biases (TensorRT's form) rather than uint8 with a zero point."""

    def to_dict(self) -> dict[str, object]:
        return {"format": self.quant_format, "activations": "int8 symmetric" if self.symmetric else "uint8 asymmetric",
                "weights": "int8 per channel", "reduce_range": self.reduce_range, "reason": self.reason}


TENSORRT = Int8Scheme("QDQ", False, "TensorRT explicit quantization: QuantizeLinear / DequantizeLinear pairs, "
                      "int8 activations and weights, zero points 0, biases fp32", symmetric=True)
"""The scheme of ``int8-tensorrt``."""


VNNI_FLAGS = {"avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni", "amx_int8"}


def int8_scheme(machine: str | None = None, flags: set[str] | None = None) -> Int8Scheme:
    """The static INT8 scheme for a CPU (this one by default).

    QOperator everywhere: in the QDQ format onnxruntime fuses a Conv into an INT8 kernel only when its output is
    quantized too, which in a UNet (Conv -> residual Add / GroupNorm) it is not, so QDQ Convs ran in fp32
    behind a DequantizeLinear (the QDQ static variant: 1.04x fp32 in export.json at be12a4b; QOperator: 2.14x
    on the SD 1.5 UNet at c90472a). Activations uint8 and weights int8 per channel (onnxruntime's u8s8
    kernels); 7-bit weights only on x86 without VNNI.
    """
    machine = (machine or platform.machine()).lower()
    flags = cpu_flags() if flags is None else flags
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return Int8Scheme("QOperator", False, f"{machine}: no u8s8 saturation, full-range weights")
    if flags & VNNI_FLAGS:
        return Int8Scheme("QOperator", False, f"x86 with VNNI ({', '.join(sorted(flags & VNNI_FLAGS))})")
    return Int8Scheme("QOperator", True, "x86 without VNNI: 7-bit weights against u8s8 saturation")


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
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Calibration):
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _big(path: Path) -> bool:
    """True when ``path``'s weights live beside it (a component over protobuf's 2 GB)."""
    return (path.parent / "model.onnx_data").is_file()


def prepared(path: Path, tmp: Path) -> Path:
    """The model after onnxruntime's pre-processing (symbolic shape inference skipped: it fails on UNets)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "prepared.onnx"
    quant_pre_process(str(path), str(out), skip_symbolic_shape=True, save_as_external_data=_big(path),
                      all_tensors_to_one_file=True, external_data_location="prepared.onnx_data")
    return out


def always_fp32(model: onnx.ModelProto) -> list[str]:
    """The UNet layers every static variant keeps in fp32: the first and last convolutions (the latents in and
    the noise out), the time embedding (a few vectors, where INT8 saves nothing and every step's timestep
    goes through) and the last up block's shortcut convolutions. Those 1x1 convolutions read, un-normalized, the
    concatenation of the decoder's features with the first encoder block's skip, whose ranges one per-tensor
    activation scale cannot share: in the ``int8-mixed`` analyses of export.json (ae97ff4) they were the two most
    sensitive layers of both the pruned tiny-shapes and the medium UNet, and keeping them costs under 1% of SD
    1.5's MACs. Attention's score and value MatMuls (no constant operand) and Softmax are never quantized."""
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    ups = [int(n.name.split("/up_blocks.")[1].split("/")[0]) for n in model.graph.node if "/up_blocks." in n.name]
    last_shortcuts = f"/up_blocks.{max(ups)}/" if ups else None
    return [n.name for n in model.graph.node if n.op_type in OPS and (
        (n.op_type == "Conv" and (n.input[0] in inputs or n.output[0] in outputs)) or "time_emb" in n.name
        or (last_shortcuts is not None and last_shortcuts in n.name and "conv_shortcut" in n.name))]


def quantizable_layers(model: onnx.ModelProto) -> list[str]:
    """The UNet layers a static variant quantizes: Conv, Gemm and MatMul with a constant weight, less
    :func:`always_fp32`."""
    constants = {t.name for t in model.graph.initializer}
    kept = set(always_fp32(model))
    return [n.name for n in model.graph.node if n.op_type in OPS and n.name not in kept
            and (n.op_type != "MatMul" or n.input[1] in constants)]


def fp32_layers(model: onnx.ModelProto) -> list[str]:
    """The Conv / MatMul / Gemm layers a static variant leaves in fp32: every one not in :func:`quantizable_layers`
    (named, since onnxruntime's QDQ quantizer and NNCF would otherwise quantize attention's scores and values)."""
    quantized = set(quantizable_layers(model))
    return [n.name for n in model.graph.node if n.op_type in OPS and n.name not in quantized]


def calibrate(src: Path, calibration: Calibration, layers: list[str], cache: Path) -> Path:
    """onnxruntime's MinMax ranges of the inputs and outputs of ``layers`` alone, over every feed, written as its
    calibration cache ``cache``. onnxruntime calibrates every tensor of every Conv / MatMul / Gemm, the attention
    score MatMuls that stay fp32 included; at SD's 512 px that takes one calibration run past 24 GiB."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater, save_tensors_data

    wanted = set(layers)

    class LayerCalibrater(MinMaxCalibrater):
        def select_tensors_to_calibrate(self, model: onnx.ModelProto):
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            used = {t for n in model.graph.node if n.name in wanted for t in (*n.input, *n.output)}
            return tensors & used, value_infos

    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        calibrator = LayerCalibrater(src, OPS, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                     use_external_data_format=True)
        calibrator.augment_graph()
        calibrator.create_inference_session()
        calibrator.collect_data(_Reader(calibration))
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache)
    return cache


def quantize_static_unet(
    src: Path, out: Path, calibration: Calibration, *, exclude: list[str] = (), only: list[str] | None = None,
    ranges: Path | None = None, scheme: Int8Scheme | None = None,
) -> Path:
    """Quantize a pre-processed UNet (:func:`prepared`) with ``scheme`` (:func:`int8_scheme` by default) to ``out``.

    ``exclude`` keeps further layers in fp32, ``only`` quantizes just those; ``ranges`` caches the calibrated
    activation ranges (of every :func:`quantizable_layers` layer) between calls on the same model (the
    sensitivity search quantizes it many times).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    scheme = scheme or int8_scheme()
    model = onnx.load(str(src), load_external_data=False)
    ranges = ranges or out.with_name(out.stem + ".ranges.json")
    try:
        if not ranges.is_file():
            calibrate(src, calibration, quantizable_layers(model), ranges)
        quantize_static(
            str(src), str(out), None, quant_format=QuantFormat[scheme.quant_format], op_types_to_quantize=OPS,
            per_channel=True, reduce_range=scheme.reduce_range,
            activation_type=QuantType.QInt8 if scheme.symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=[*fp32_layers(model), *exclude], nodes_to_quantize=only,
            use_external_data_format=_big(src) or (src.parent / "prepared.onnx_data").is_file(),
            calibration_cache_path=ranges,
            extra_options={"ActivationSymmetric": scheme.symmetric, "WeightSymmetric": True, "MatMulConstBOnly": True,
                           "QuantizeBias": not scheme.symmetric},
        )
    except (ValueError, RuntimeError, KeyError, AttributeError, onnx.checker.ValidationError) as exc:
        raise EdgesafeError(f"onnxruntime static quantization of {src.parent.name} failed: {first_line(exc)}") from None
    return out


def _ort_static(path: Path, inputs: QuantizeInputs, scheme: Int8Scheme | None = None) -> None:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = quantize_static_unet(prepared(path, Path(tmp)), Path(tmp) / "int8.onnx", inputs.calibration,
                                   scheme=scheme)
        save_onnx(onnx.load(str(out)), path)


def _ort_dynamic(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = prepared(path, Path(tmp))
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(src), str(out), op_types_to_quantize=OPS, per_channel=True, weight_type=QuantType.QInt8)
        save_onnx(onnx.load(str(out)), path)


def _nncf(path: Path, inputs: QuantizeInputs) -> None:
    import nncf
    from nncf.onnx.quantization.backend_parameters import BackendParameters

    # a UNet over 2 GB stays on disk: NNCF reads its weights from the folder (a 2 GB protobuf cannot be built)
    big = _big(path)
    model = onnx.load(str(path), load_external_data=not big)
    advanced = nncf.AdvancedQuantizationParameters(
        backend_params={BackendParameters.EXTERNAL_DATA_DIR: str(path.parent.resolve())}) if big else None
    # quantizing the attention score and value MatMuls would also make NNCF collect each self-attention's scores
    # (1 GB apiece at SD's 64x64 latents) during calibration
    calibration = inputs.calibration
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration),
                              ignored_scope=nncf.IgnoredScope(names=fp32_layers(model)), advanced_parameters=advanced)
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


def _hybrid(folder: Path, inputs: QuantizeInputs) -> None:
    _ort_static(folder / "unet" / "model.onnx", inputs)
    for name, path in onnx_files(folder).items():
        if name != "unet":
            _weight_only(path)


def _mixed(folder: Path, inputs: QuantizeInputs) -> None:
    from .sensitivity import mixed_int8

    mixed_int8(folder, inputs)


def _optimized(folder: Path, inputs: QuantizeInputs | None) -> None:
    from .optimize import optimize_folder

    optimize_folder(folder)


ONNX_QUANTIZERS: dict[str, Callable[[Path, QuantizeInputs], None]] = {
    "fp32-optimized": _optimized,
    "int8-ort-dynamic": lambda folder, inputs: _ort_dynamic(folder / "unet" / "model.onnx"),
    "int8-ort-static": lambda folder, inputs: _ort_static(folder / "unet" / "model.onnx", inputs),
    "int8-mixed": _mixed,
    "int8-tensorrt": lambda folder, inputs: _ort_static(folder / "unet" / "model.onnx", inputs, TENSORRT),
    "int8-nncf": lambda folder, inputs: _nncf(folder / "unet" / "model.onnx", inputs),
    "int8-hybrid": _hybrid,
}
"""Variant name -> what rewrites the copied fp32 folder in place."""
ONNX_PRECISIONS = {"fp32": "fp32", "fp32-optimized": "fp32",
                   **{q: "int8" for q in ONNX_QUANTIZERS if q.startswith("int8")}}
"""Each ONNX artefact -> the ``export.parity`` precision that judges it."""


def quantize_folder(src: Path, dst: Path, method: str, inputs: QuantizeInputs | None) -> Path:
    """Copy the fp32 export ``src`` to ``dst`` and apply ``method`` there; ``dst`` appears only when done (an
    ``int8-mixed`` analysis already in ``dst`` is carried over for the search to reuse)."""
    from .sensitivity import ANALYSIS

    with atomic_dir(dst, copy_from=src) as partial:
        if (dst / "unet" / ANALYSIS).is_file():
            shutil.copy2(dst / "unet" / ANALYSIS, partial / "unet" / ANALYSIS)
        ONNX_QUANTIZERS[method](partial, inputs)
    return dst
