"""``int8-mixed``: static INT8 with the fewest UNet layers kept in fp32 that meet an image-PSNR target.

Apple's mixed-bit palettization analysis is the model: each quantizable layer's effect on the output is
measured alone (the images of the fp32 pipeline with only that layer in INT8, PSNR against the fp32 images
from the same prompts and latents), layers are ranked most sensitive first, and the search finds the
smallest number of top-ranked layers to keep in fp32 for the whole model to reach ``export.mixed_psnr_db``
(bisection on that number). The analysis is written beside the UNet as ``unet/mixed_precision.json``; when
the variant is made again over a folder that holds one measured on the same fp32 UNet, calibration, prompts and
scheme (a new target, say), its ranking is reused and only the search runs.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import EdgesafeError
from ..io import read_json, write_json
from ..models.inputs import seeded_normal
from .onnx import save_onnx
from .parity import psnr_db
from .quantize import QuantizeInputs, always_fp32, int8_scheme, prepared, quantizable_layers, quantize_static_unet
from .runtime import OnnxPipeline, session

ANALYSIS = "mixed_precision.json"


def _op_types(model: onnx.ModelProto) -> dict[str, str]:
    return {n.name: n.op_type for n in model.graph.node}


def mixed_int8(folder: Path, inputs: QuantizeInputs) -> dict[str, Any]:
    """Quantize ``folder``'s UNet (a copy of the fp32 export) in place with the fewest fp32 layers that meet
    ``inputs.mixed_psnr_db``; write and return the analysis.

    Raises:
        EdgesafeError: when no layer can be in INT8 within the target (one line, naming the best figure).
    """
    t0 = time.perf_counter()
    unet = folder / "unet" / "model.onnx"
    target = inputs.mixed_psnr_db
    key = _key(unet, inputs)
    previous = read_json(folder / "unet" / ANALYSIS) if (folder / "unet" / ANALYSIS).is_file() else {}
    runner = OnnxPipeline(folder)
    latents = seeded_normal((len(inputs.prompts), *_latent_chw(folder)), 0).numpy()

    def images() -> np.ndarray:
        return runner(inputs.prompts, latents=latents, num_inference_steps=inputs.steps,
                      guidance_scale=inputs.guidance)

    reference = images()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        src = prepared(unet, tmp)
        model = onnx.load(str(src), load_external_data=False)
        layers, ops = quantizable_layers(model), _op_types(model)
        if not layers:
            raise EdgesafeError(f"int8-mixed: {unet} has no layer to quantize")
        ranges = tmp / "ranges.json"
        evaluations = 0

        def psnr_with(**which) -> float:
            nonlocal evaluations
            evaluations += 1
            out = quantize_static_unet(src, tmp / "candidate.onnx", inputs.calibration, ranges=ranges, **which)
            runner.sessions["unet"] = session(out)
            return psnr_db(reference, images())

        tried = {0: psnr_with(exclude=[])}
        reused = previous.get("key") == key and bool(previous.get("layers"))  # a ranking was measured
        if reused:
            alone = {layer["name"]: layer["psnr_db_alone"] for layer in previous["layers"]}
        elif tried[0] < target:
            alone = {layer: psnr_with(only=[layer]) for layer in layers}
        else:  # every layer in INT8 meets the target: nothing to rank
            alone = {}
        order = sorted(layers, key=lambda layer: alone.get(layer, 0.0))  # most sensitive first
        if tried[0] < target:
            tried[len(order) - 1] = alone[order[-1]]  # the least sensitive layer alone in INT8
            if tried[len(order) - 1] < target:
                raise EdgesafeError(
                    f"int8-mixed: no mix reaches {target:g} dB against fp32; with only the least sensitive layer "
                    f"({order[-1]}) in INT8 the images are at {tried[len(order) - 1]:.1f} dB")
            low, high = 0, len(order) - 1  # low fails, high meets
            while high - low > 1:
                mid = (low + high) // 2
                tried[mid] = psnr_with(exclude=order[:mid])
                low, high = (low, mid) if tried[mid] >= target else (mid, high)
            keep = high
        else:
            keep = 0
        final = quantize_static_unet(src, tmp / "int8.onnx", inputs.calibration, ranges=ranges,
                                     exclude=order[:keep])
        save_onnx(onnx.load(str(final)), unet)
    analysis = {
        "key": key,
        "reused_ranking": reused,
        "target_psnr_db": target,
        "psnr_db": round(tried[keep], 3),
        "all_int8_psnr_db": round(tried[0], 3),
        "kept_fp32": order[:keep],
        "always_fp32": always_fp32(model),
        "int8_layers": len(order) - keep,
        "layers": [{"name": layer, "op": ops[layer], "psnr_db_alone": round(alone[layer], 3)} for layer in order
                   if layer in alone],
        "searched": {str(k): round(v, 3) for k, v in sorted(tried.items())},
        "evaluations": evaluations,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(folder / "unet" / ANALYSIS, analysis)
    return analysis


def _key(unet: Path, inputs: QuantizeInputs) -> dict[str, Any]:
    """What a ranking depends on: the fp32 UNet, the calibration feeds, the prompts and sampling, the scheme."""
    model, feeds = hashlib.sha256(), hashlib.sha256()
    for path in sorted(unet.parent.glob("model.onnx*")):
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                model.update(chunk)
    for feed in inputs.calibration:
        for name in sorted(feed):
            feeds.update(name.encode() + np.ascontiguousarray(feed[name]).tobytes())
    return {"model_sha256": model.hexdigest(), "calibration_sha256": feeds.hexdigest(), "prompts": inputs.prompts,
            "steps": inputs.steps, "guidance": inputs.guidance, "scheme": int8_scheme().to_dict()}


def _latent_chw(folder: Path) -> tuple[int, int, int]:
    """The UNet's latent (channels, height, width) as its config gives them."""
    config = read_json(folder / "unet" / "config.json")
    size = config["sample_size"]
    size = size if isinstance(size, int) else size[0]
    return config["in_channels"], size, size
