"""Latency of a UNet step measured with onnxruntime on this machine's CPU (the prune stage's budget in ms when
a device profile is measured on this host, and the teacher stage's figure)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from diffusers import UNet2DConditionModel

from ..export.onnx import COMPONENTS, export_module, unet_module
from ..export.runtime import session
from ..models.inputs import unet_example_inputs


def measure_unet_ms(
    unet: UNet2DConditionModel, *, batch: int = 2, text_length: int = 77, repeats: int = 20, warmup: int = 3,
    threads: int = 0,
) -> float:
    """Median ms of one UNet call in onnxruntime (CPU, fixed shapes), after ``warmup`` runs."""
    inputs = unet_example_inputs(unet, batch=batch, text_length=text_length)
    spec = COMPONENTS["unet"]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_module(unet_module(unet), inputs, Path(tmp) / "unet.onnx", spec.inputs, spec.outputs,
                             dynamic=False)
        runner = session(path, threads=threads)
        feed = {name: tensor.numpy() for name, tensor in zip(spec.inputs, inputs, strict=True)}
        for _ in range(warmup):
            runner.run(None, feed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.run(None, feed)
            times.append((time.perf_counter() - t0) * 1000)
    return float(statistics.median(times))
