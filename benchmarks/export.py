"""Export three pipelines to ONNX (fp32 + every INT8 quantizer) and Core ML (fp16 + every weight
quantizer); measure file sizes, onnxruntime CPU latency per component (medians, all variants
interleaved in one run), parity against PyTorch and against fp32; write benchmarks/results/export.json.

    python benchmarks/export.py [--repeats 30] [--skip-coreml] [--out benchmarks/results/export.json]

Models: the committed tiny-shapes teacher; its UNet width-pruned to half the channels (magnitude,
not fine-tuned: parity and speed do not depend on training); and a medium pipeline, the tiny-shapes
text encoder and VAE with a wider UNet (~10M parameters, 32x32 latents, seeded random weights).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from harness import provenance

from edgesafe.export import (
    COREML_QUANTIZERS,
    ONNX_QUANTIZERS,
    OnnxPipeline,
    export_coreml,
    export_onnx,
    onnx_parity,
    quantize_coreml,
    quantize_folder,
    validate_coreml,
)
from edgesafe.export.onnx import folder_bytes, latent_shape
from edgesafe.export.parity import psnr_db
from edgesafe.export.quantize import unet_calibration
from edgesafe.io import write_json
from edgesafe.models.inputs import unet_example_inputs
from edgesafe.models.loading import load_pipeline
from edgesafe.models.stats import count_params
from edgesafe.prune import prune_width
from edgesafe.zoo.tiny_shapes import world

STEPS, GUIDANCE = 20, 5.0
PROMPTS = ["a red star on a checkerboard background", "a blue circle with stripes"]  # parity and PSNR prompts


def medium_pipeline():
    pipe = load_pipeline("zoo:tiny-shapes")
    torch.manual_seed(0)
    channels = pipe.vae.config.latent_channels
    pipe.unet = UNet2DConditionModel(
        sample_size=32, in_channels=channels, out_channels=channels, down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3, block_out_channels=(96, 144, 144), layers_per_block=1,
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
    ).eval()
    return pipe


def pruned_pipeline():
    pipe = load_pipeline("zoo:tiny-shapes")
    pipe.unet = prune_width(pipe.unet, 0.5, unet_example_inputs(pipe.unet, batch=2, text_length=8)).unet.eval()
    return pipe


def component_feeds(pipe, runner: OnnxPipeline) -> dict[str, dict[str, np.ndarray]]:
    """One guidance step's inputs per component (UNet at batch 2, the rest at batch 1)."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(latent_shape(pipe, 2), generator=gen).numpy()
    ids = runner.tokenizer(["a red star"], padding="max_length", max_length=runner.tokenizer.model_max_length,
                           return_tensors="np").input_ids
    hidden = np.concatenate([runner.run("text_encoder", input_ids=ids)[0]] * 2)
    image = np.clip(torch.randn(1, 3, latents.shape[2] * 4, latents.shape[3] * 4, generator=gen).numpy(), -1, 1)
    return {
        "text_encoder": {"input_ids": ids},
        "unet": {"sample": latents, "timestep": np.array(500.0), "encoder_hidden_states": hidden},
        "vae_decoder": {"latent_sample": latents[:1]},
        "vae_encoder": {"sample": image},
    }


def interleaved_latency(pipe, runners: dict[str, OnnxPipeline], repeats: int) -> dict[str, dict[str, float]]:
    """Median ms per (variant, component), every round timing every variant once, in turn."""
    feeds = component_feeds(pipe, next(iter(runners.values())))
    times: dict[str, dict[str, list[float]]] = {v: {c: [] for c in feeds} for v in runners}
    for round_ in range(repeats + 3):
        for variant, runner in runners.items():
            for comp, feed in feeds.items():
                t0 = time.perf_counter()
                runner.run(comp, **feed)
                if round_ >= 3:  # warm-up rounds
                    times[variant][comp].append((time.perf_counter() - t0) * 1000)
    return {v: {c: round(statistics.median(ts), 3) for c, ts in comps.items()} for v, comps in times.items()}


def onnx_variants(name: str, pipe, work: Path, repeats: int, threads: int) -> dict:
    fp32 = export_onnx(pipe, work / name / "fp32")
    captions = world.sample_batch(8, np.random.default_rng([4321, 1]), exclude=tuple(world.UNWANTED))[1]
    calibration = unet_calibration(pipe, captions, steps=STEPS, guidance=GUIDANCE)
    folders = {"fp32": fp32}
    quantize_seconds = {}
    for method in ONNX_QUANTIZERS:
        t0 = time.perf_counter()
        folders[method] = quantize_folder(fp32, work / name / method, method, calibration)
        quantize_seconds[method] = round(time.perf_counter() - t0, 1)
    runners = {v: OnnxPipeline(f, threads=threads) for v, f in folders.items()}
    latency = interleaved_latency(pipe, runners, repeats)
    latents = torch.randn(latent_shape(pipe, len(PROMPTS)), generator=torch.Generator().manual_seed(0)).numpy()
    fp32_images = runners["fp32"](PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    result = {"unet_params": count_params(pipe.unet), "variants": {}}
    for variant, folder in folders.items():
        parity = onnx_parity(pipe, folder, PROMPTS, steps=STEPS, guidance=GUIDANCE)
        images = runners[variant](PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
        result["variants"][variant] = {
            "bytes": folder_bytes(folder),
            "unet_bytes": folder_bytes(folder / "unet"),
            "latency_ms": latency[variant],
            "unet_speedup_vs_fp32": round(latency["fp32"]["unet"] / latency[variant]["unet"], 3),
            "image_psnr_vs_pytorch_db": round(parity["image_psnr_db"], 2),
            "image_psnr_vs_fp32_db": round(psnr_db(fp32_images, images), 2),
            "components": parity["components"],
            "quantize_seconds": quantize_seconds.get(variant),
        }
    return result


def coreml_variants(name: str, pipe, work: Path) -> dict:
    base = export_coreml(pipe, work / name / "coreml-fp16")
    folders = {"fp16": base, **{m: quantize_coreml(base, work / name / m, m) for m in COREML_QUANTIZERS}}
    result = {}
    for variant, folder in folders.items():
        report = validate_coreml(pipe, folder)
        result[variant] = {"package_bytes": {k: p["bytes"] for k, p in report["packages"].items()},
                           "bytes": sum(p["bytes"] for p in report["packages"].values()),
                           "predicted": report["predicted"]}
    return result


def optimum_generates(folder: Path) -> bool:
    """True only if optimum's ORTStableDiffusionPipeline loads ``folder`` and returns a real image."""
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    ort_pipe = ORTStableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    image = ort_pipe("a red circle on a plain background", num_inference_steps=10, output_type="np").images
    return bool(image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-coreml", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    models = {"tiny-shapes": lambda: load_pipeline("zoo:tiny-shapes"), "tiny-shapes-pruned": pruned_pipeline,
              "medium": medium_pipeline}
    result: dict = {"models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, make in models.items():
            pipe = make()
            entry = {"onnx": onnx_variants(name, pipe, work, args.repeats, args.threads)}
            if not args.skip_coreml:
                entry["coreml"] = coreml_variants(name, pipe, work)
            result["models"][name] = entry
            print(name, "done", round(time.perf_counter() - t0), "s", flush=True)
        result["optimum_pipeline_loads"] = optimum_generates(work / "tiny-shapes" / "fp32")
    medium = result["models"]["medium"]["onnx"]["variants"]
    ok = {v: f for v, f in medium.items() if v != "fp32" and f["image_psnr_vs_fp32_db"] >= 30}
    pool = ok or {v: f for v, f in medium.items() if v != "fp32"}
    best = max(pool, key=lambda v: pool[v]["unet_speedup_vs_fp32"])
    result = {
        "int8_speedup_best": pool[best]["unet_speedup_vs_fp32"],
        "int8_best_variant": best,
        "int8_psnr_db": pool[best]["image_psnr_vs_fp32_db"],
        "int8_target_met": bool(ok) and pool[best]["unet_speedup_vs_fp32"] >= 1.3,
        "optimum_pipeline_loads": result.pop("optimum_pipeline_loads"),
        **result,
        "settings": {"steps": STEPS, "guidance_scale": GUIDANCE, "repeats": args.repeats,
                     "threads": args.threads or "all cores",
                     "latency": "onnxruntime CPU, median; variants interleaved in one run",
                     "coreml_prediction": "not run: needs macOS (package specs validated)"},
        "seconds": round(time.perf_counter() - t0, 1),
        "provenance": provenance(),
    }
    write_json(args.out, result)
    print({k: result[k] for k in ("int8_speedup_best", "int8_best_variant", "int8_psnr_db", "int8_target_met",
                                  "optimum_pipeline_loads")})


if __name__ == "__main__":
    main()
