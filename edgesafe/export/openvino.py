"""OpenVINO export: each component as an OpenVINO IR in optimum-intel's folder layout, run by the OpenVINO
runtime, and its NNCF INT8 variant.

``out/`` holds ``model_index.json``, ``tokenizer/``, ``scheduler/`` and one folder per component
(``text_encoder``, ``unet``, ``vae_encoder``, ``vae_decoder``) with ``openvino_model.xml`` / ``.bin`` and the
component's ``config.json``. The IR is converted from the same ONNX graph the ``onnx`` target writes, so the
two runtimes run one graph. Needs the ``openvino`` extra (``pip install 'edgesafe[openvino]'``).

``openvino-int8``: NNCF post-training quantization of the UNet (activations and weights, transformer
preset: SmoothQuant on the attention projections and the attention MatMuls kept in fp32), calibrated on the
same sampling-trajectory feeds as the ONNX variants; the text encoder and VAE get NNCF's INT8 weight
compression (weights stored in INT8, computed in fp32).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from diffusers import StableDiffusionPipeline

from ..errors import EdgesafeError, ModelLoadError, first_line
from ..io import atomic_dir
from .onnx import COMPONENTS, export_component
from .quantize import QuantizeInputs
from .runtime import ExportedPipeline

MODEL_FILE = "openvino_model.xml"


class _SignalStack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]  # Linux's stack_t


def keeps_signal_stack(fn):
    """Give the calling thread its alternate signal stack back when ``fn`` returns.

    On Linux, each OpenVINO CPU plugin (one per ``ov.Core``; NNCF makes hundreds) installs an alternate signal
    stack of its own and, when destroyed, puts back the one it found, after unmapping its own. Plugins destroyed
    out of order leave the thread on an unmapped stack, and the next signal handled there (Ctrl-C, SIGTERM, or
    faulthandler's SIGSEGV report) kills the process with a bare segmentation fault. A plugin destroyed later
    leaves a stack that is not its own alone, so restoring the caller's after every call is enough.
    """
    if not sys.platform.startswith("linux"):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        libc = ctypes.CDLL(None)
        before = _SignalStack()
        if libc.sigaltstack(None, ctypes.byref(before)) != 0:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        finally:
            libc.sigaltstack(ctypes.byref(before), None)

    return wrapper


def _core():
    import openvino as ov

    return ov.Core()


@keeps_signal_stack
def ir_from_onnx(onnx_path: Path, folder: Path) -> Path:
    """Convert an ONNX model to ``folder/openvino_model.xml`` (+ ``.bin``, fp32 weights)."""
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO's frontends raise their own exception types
        raise EdgesafeError(f"OpenVINO conversion of {onnx_path.parent.name} failed: {first_line(exc)}") from None
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(folder / MODEL_FILE), compress_to_fp16=False)
    return folder / MODEL_FILE


def export_openvino(pipe: StableDiffusionPipeline, out: Path, *, opset: int = 17) -> Path:
    """Convert every component of ``pipe`` to ``out/<component>/openvino_model.xml`` (fp32 weights; ``out``
    replaced whole once all succeed)."""
    with atomic_dir(Path(out)) as partial, tempfile.TemporaryDirectory(dir=partial) as tmp:
        for name, component in COMPONENTS.items():
            ir_from_onnx(export_component(pipe, name, Path(tmp) / name, opset=opset), partial / name)
            component.config(pipe, partial / name)
        pipe.tokenizer.save_pretrained(partial / "tokenizer")
        pipe.scheduler.save_pretrained(partial / "scheduler")
        pipe.save_config(partial)
    return Path(out)


@keeps_signal_stack
def _int8(folder: Path, inputs: QuantizeInputs) -> None:
    import nncf
    import openvino as ov

    core = _core()
    for name in COMPONENTS:
        path = folder / name / MODEL_FILE
        if not path.is_file():  # a folder of some components only (a UNet benchmarked alone)
            continue
        model = core.read_model(str(path))
        try:
            if name == "unet":
                model = nncf.quantize(model, nncf.Dataset(inputs.calibration), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(inputs.calibration))
            else:
                model = nncf.compress_weights(model)
        except Exception as exc:  # NNCF raises plain and backend exceptions alike
            raise EdgesafeError(f"openvino-int8: NNCF failed on {name}: {first_line(exc)}") from None
        path.unlink()
        path.with_suffix(".bin").unlink()
        ov.save_model(model, str(path), compress_to_fp16=False)


OPENVINO_QUANTIZERS: dict[str, Callable[[Path, QuantizeInputs], None]] = {"openvino-int8": _int8}


def quantize_openvino(src: Path, dst: Path, method: str, inputs: QuantizeInputs) -> Path:
    """Copy the fp32 IR folder ``src`` to ``dst`` and apply ``method`` there; ``dst`` appears only when done."""
    with atomic_dir(dst, copy_from=src) as partial:
        OPENVINO_QUANTIZERS[method](partial, inputs)
    return dst


@keeps_signal_stack
def compile_ir(path: Path, *, threads: int = 0):
    """``path`` (an ``openvino_model.xml``) compiled for the CPU at fp32 inference precision."""
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    try:
        return _core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise ModelLoadError(f"{path}: OpenVINO cannot load it ({first_line(exc)})") from None


class OpenVinoPipeline(ExportedPipeline):
    """An exported OpenVINO folder compiled for the CPU at fp32 inference precision (OpenVINO would otherwise
    run bf16 on CPUs that have it, and the artefact's figures would be the hint's, not the export's)."""

    model_file = MODEL_FILE
    runtime = "OpenVINO"

    @staticmethod
    @keeps_signal_stack
    def parse(path: Path) -> None:
        try:
            _core().read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ModelLoadError(f"{path}: not a readable OpenVINO model ({first_line(exc)})") from None

    def load(self, path: Path):
        return compile_ir(path, threads=self.threads)

    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        compiled = self.sessions[name]
        types = {i.get_any_name(): i.get_element_type().get_type_name() for i in compiled.inputs}
        cast = {k: np.asarray(v, np.int64 if types[k] == "i64" else np.int32 if types[k] == "i32" else np.float32)
                for k, v in feeds.items()}
        result = compiled(cast)
        return [result[out] for out in compiled.outputs]
