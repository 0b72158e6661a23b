"""``fp32-optimized``: the ONNX export with onnxruntime's transformer-graph fusions, still fp32.

onnxruntime's transformers optimizer rewrites the attention blocks of the UNet, the VAE and the CLIP text
encoder into its fused contrib operators (Attention / MultiHeadAttention, SkipLayerNormalization,
LayerNormalization, Gelu). Only the fusions onnxruntime's CPU provider has kernels for are enabled:
GroupNorm, NHWC convolution, BiasSplitGelu and packed QKV are CUDA-only. The session's own graph
optimizations run on top at load time, as for every variant.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .onnx import onnx_files, save_onnx

MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "vae_decoder": "vae", "vae_encoder": "vae"}
"""Component -> the onnxruntime transformers optimizer's model type for it."""


def _cpu_fusions(model_type: str):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    for cuda_only in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                      "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
        setattr(options, cuda_only, False)
    return options


def optimize_component(path: Path, component: str) -> dict[str, int]:
    """Fuse ``path`` (a component's ``model.onnx``) in place; return the fused operators' counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # per-fusion chatter
    model_type = MODEL_TYPES[component]
    fused = optimize_model(str(path), model_type=model_type, opt_level=0, optimization_options=_cpu_fusions(model_type),
                           use_gpu=False)
    save_onnx(fused.model, path)
    return {op: n for op, n in fused.get_fused_operator_statistics().items() if n}


def optimize_folder(folder: Path) -> None:
    """Fuse every component of an exported folder in place."""
    for component, path in onnx_files(folder).items():
        optimize_component(path, component)
