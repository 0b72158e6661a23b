"""Latency of a UNet step measured with onnxruntime on this machine's CPU."""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from diffusers import UNet2DConditionModel

from ..models.stats import unet_example_inputs


def export_unet_onnx(unet: UNet2DConditionModel, path: Path, *, batch: int, text_length: int, opset: int = 17) -> None:
    """Export ``unet`` at a fixed batch to ONNX (TorchScript exporter, fp32)."""
    inputs = unet_example_inputs(unet, batch=batch, text_length=text_length)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            unet.eval(), inputs, str(path), input_names=["sample", "timestep", "encoder_hidden_states"],
            output_names=["out_sample"], opset_version=opset, dynamo=False,
        )


def measure_unet_ms(
    unet: UNet2DConditionModel, *, batch: int = 2, text_length: int = 77, repeats: int = 20, warmup: int = 3,
    threads: int = 0,
) -> float:
    """Median ms of one UNet call in onnxruntime (CPU), after ``warmup`` runs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.onnx"
        export_unet_onnx(unet, path, batch=batch, text_length=text_length)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sample, t, hidden = unet_example_inputs(unet, batch=batch, text_length=text_length)
        feed = {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": hidden.numpy()}
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - t0) * 1000)
    return float(statistics.median(times))
