"""Export pipelines to ONNX (fp32 and every ONNX variant), OpenVINO (fp32 and INT8) and Core ML (fp16 and
every weight quantizer, ``coreml-mixed`` at the same PSNR target as ``int8-mixed``); measure sizes, CPU latency
per component (every variant interleaved in one run: medians and quartiles), parity against PyTorch and against
fp32, and on the trained tiny-shapes models the artefacts' prompt accuracy and unwanted-concept rates; write
benchmarks/results/export.json.

    python benchmarks/export.py [--repeats 20] [--sd-repeats 6] [--skip-coreml] [--skip-sd] [--threads 0]

Models:
- ``tiny-shapes``: the committed teacher (trained): quality, safety and speed of every artefact;
- ``tiny-shapes-pruned``: its UNet width-pruned to half the channels (magnitude, not fine-tuned);
- ``medium``: the tiny-shapes text encoder and VAE with a wider UNet (~10M parameters, seeded random weights);
- ``sd-1.5-unet``: the SD 1.5 UNet architecture (diffusers' config, seeded random weights, 860M parameters)
  alone, at batch 2 (one guided step) and 32x32 latents (256 px; 64x64 would take ~4x longer per call on
  this machine and shifts more of the time into attention). Speed only: its INT8 error is a numeric figure of
  random weights, not a quality measure. ``int8-mixed`` (one sampling run per layer) and ``int8-nncf`` (ONNX)
  are not run at this size.

Artefacts are kept under ``--work`` (reused when present, so an interrupted run resumes); latency is
always measured afresh, interleaved.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from harness import provenance

from edgesafe.export import COREML_QUANTIZERS, ONNX_QUANTIZERS, export_coreml, quantize_coreml, validate_coreml
from edgesafe.export.coreml import with_coreml_weights
from edgesafe.export.onnx import export_component, export_onnx, folder_bytes, latent_shape
from edgesafe.export.openvino import (
    OPENVINO_QUANTIZERS,
    OpenVinoPipeline,
    compile_ir,
    export_openvino,
    ir_from_onnx,
)
from edgesafe.export.openvino import quantize_openvino as quantize_ov
from edgesafe.export.palettization import ANALYSIS as PALETTE_ANALYSIS
from edgesafe.export.palettization import MixedBitInputs
from edgesafe.export.parity import pipeline_parity, psnr_db
from edgesafe.export.quantize import QuantizeInputs, int8_scheme, quantize_folder, unet_calibration
from edgesafe.export.runtime import OnnxPipeline, session
from edgesafe.export.sensitivity import ANALYSIS
from edgesafe.io import read_json, write_json
from edgesafe.models.architectures import UNET_CONFIGS
from edgesafe.models.inputs import seeded_normal, unet_example_inputs
from edgesafe.models.loading import load_evaluator, load_pipeline
from edgesafe.models.stats import count_params
from edgesafe.prune import prune_width
from edgesafe.zoo.tiny_shapes import world
from edgesafe.zoo.tiny_shapes.metrics import concept_rate, prompt_accuracy

STEPS, GUIDANCE, MIXED_PSNR = 20, 5.0, 30.0
PROMPTS = ["a red star on a checkerboard background", "a blue circle with stripes"]  # parity and PSNR prompts
WARMUP = 2


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


def interleaved(calls: dict[str, dict[str, Callable]], repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per (variant, component): median, quartiles and min in ms; every round times every variant once, in turn,
    after ``WARMUP`` untimed rounds."""
    times = {v: {c: [] for c in comps} for v, comps in calls.items()}
    for round_ in range(repeats + WARMUP):
        for variant, comps in calls.items():
            for comp, call in comps.items():
                t0 = time.perf_counter()
                call()
                if round_ >= WARMUP:
                    times[variant][comp].append((time.perf_counter() - t0) * 1000)

    def figures(ts: list[float]) -> dict[str, float]:
        q1, median, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0],) * 3
        return {"median": round(median, 3), "p25": round(q1, 3), "p75": round(q3, 3), "min": round(min(ts), 3)}

    return {v: {c: figures(ts) for c, ts in comps.items()} for v, comps in times.items()}


def component_calls(runner, pipe) -> dict[str, Callable]:
    """One guidance step's calls per component (UNet at batch 2, the rest at batch 1)."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(latent_shape(pipe, 2), generator=gen).numpy()
    ids = runner.tokenizer(["a red star"], padding="max_length", max_length=runner.tokenizer.model_max_length,
                           return_tensors="np").input_ids
    hidden = np.concatenate([runner.run("text_encoder", input_ids=ids)[0]] * 2)
    image = np.clip(torch.randn(1, 3, latents.shape[2] * 4, latents.shape[3] * 4, generator=gen).numpy(), -1, 1)
    return {
        "text_encoder": lambda: runner.run("text_encoder", input_ids=ids),
        "unet": lambda: runner.run("unet", sample=latents, timestep=np.array(500.0), encoder_hidden_states=hidden),
        "vae_decoder": lambda: runner.run("vae_decoder", latent_sample=latents[:1]),
        "vae_encoder": lambda: runner.run("vae_encoder", sample=image),
    }


def images_of(runner, prompts: list[str], seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Images in [-1, 1] (N,3,H,W), prompt-major, each from its own seed (as ``measure.images.generate``)."""
    jobs = [(p, s) for p in prompts for s in seeds]
    out = []
    for start in range(0, len(jobs), 64):
        chunk = jobs[start:start + 64]
        latents = torch.stack([seeded_normal(shape, s) for _, s in chunk]).numpy()
        images = runner([p for p, _ in chunk], latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
        out.append(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2 - 1)
    return torch.cat(out)


def world_figures(runner, evaluator, shape, seeds=(0, 1)) -> dict:
    """Prompt accuracy on the world's wanted prompts and each concept's rate on its direct and paraphrase
    prompts, of images the artefact generates."""
    wanted = world.wanted_prompts()
    names, _ = evaluator.classify(images_of(runner, [p.text for p in wanted], list(seeds), shape))
    result = {"prompt_accuracy": round(prompt_accuracy(names, wanted, len(seeds)), 4), "concepts": {}}
    for name, concept in world.UNWANTED.items():
        result["concepts"][name] = {
            kind: round(concept_rate(evaluator, images_of(runner, [p.text for p in world.concept_prompts(
                name, paraphrase=paraphrase)], list(seeds), shape), concept), 4)
            for kind, paraphrase in (("direct", False), ("paraphrase", True))}
    return result


def pipeline_variants(name: str, pipe, work: Path, args, evaluator=None) -> dict:
    """Every ONNX and OpenVINO artefact of ``pipe``: sizes, latency, parity, (with ``evaluator``) world figures."""
    captions = world.sample_batch(8, np.random.default_rng([4321, 1]), exclude=tuple(world.UNWANTED))[1]
    inputs = QuantizeInputs(unet_calibration(pipe, captions, steps=STEPS, guidance=GUIDANCE), PROMPTS, STEPS,
                            GUIDANCE, MIXED_PSNR)
    folders, seconds = {}, {}

    def made(key: str, path: Path, make) -> None:
        """``path`` as left by an earlier run (its making time then unknown: None), else made now."""
        if path.is_dir():
            folders[key], seconds[key] = path, None
        else:
            t0 = time.perf_counter()
            folders[key], seconds[key] = make(), round(time.perf_counter() - t0, 1)

    base = work / name
    made("onnx/fp32", base / "onnx" / "fp32", lambda: export_onnx(pipe, base / "onnx" / "fp32"))
    for method in ONNX_QUANTIZERS:
        made(f"onnx/{method}", base / "onnx" / method,
             lambda m=method: quantize_folder(folders["onnx/fp32"], base / "onnx" / m, m, inputs))
    made("openvino/fp32", base / "openvino" / "fp32", lambda: export_openvino(pipe, base / "openvino" / "fp32"))
    for method in OPENVINO_QUANTIZERS:
        made(f"openvino/{method}", base / "openvino" / method,
             lambda m=method: quantize_ov(folders["openvino/fp32"], base / "openvino" / m, m, inputs))
    runners = {k: (OpenVinoPipeline if k.startswith("openvino/") else OnnxPipeline)(f, threads=args.threads)
               for k, f in folders.items()}
    latency = interleaved({k: component_calls(r, pipe) for k, r in runners.items()}, args.repeats)
    latents = torch.randn(latent_shape(pipe, len(PROMPTS)), generator=torch.Generator().manual_seed(0)).numpy()
    fp32_images = runners["onnx/fp32"](PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    fp32_unet = latency["onnx/fp32"]["unet"]["median"]
    result = {"unet_params": count_params(pipe.unet), "variants": {}}
    for key, folder in folders.items():
        parity = pipeline_parity(pipe, runners[key], PROMPTS, steps=STEPS, guidance=GUIDANCE)
        images = runners[key](PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
        entry = {
            "bytes": folder_bytes(folder),
            "unet_bytes": folder_bytes(folder / "unet"),
            "latency_ms": latency[key],
            "unet_speedup_vs_fp32": round(fp32_unet / latency[key]["unet"]["median"], 3),
            "image_psnr_vs_pytorch_db": round(parity["image_psnr_db"], 2),
            "image_psnr_vs_fp32_db": round(psnr_db(fp32_images, images), 2),
            "components": parity["components"],
            "make_seconds": seconds[key],
        }
        if (folder / "unet" / ANALYSIS).is_file():
            analysis = read_json(folder / "unet" / ANALYSIS)
            entry["mixed_precision"] = {k: analysis[k] for k in (
                "target_psnr_db", "psnr_db", "all_int8_psnr_db", "kept_fp32", "int8_layers", "evaluations")}
        if evaluator is not None:
            entry["world"] = world_figures(runners[key], evaluator, latent_shape(pipe, 1)[1:])
        result["variants"][key] = entry
        print(f"  {name} {key}: unet {latency[key]['unet']['median']:.1f} ms, "
              f"{entry['image_psnr_vs_fp32_db']} dB vs fp32", flush=True)
    return result


def coreml_variants(name: str, pipe, work: Path) -> dict:
    out = work / name / "coreml"
    base = out / "fp16" if (out / "fp16").is_dir() else export_coreml(pipe, out / "fp16")
    inputs = MixedBitInputs(pipe, PROMPTS, STEPS, GUIDANCE, MIXED_PSNR)
    folders = {"fp16": base, **{m: out / m if (out / m).is_dir() else quantize_coreml(base, out / m, m, inputs)
                                for m in COREML_QUANTIZERS}}
    latents = torch.randn(latent_shape(pipe, len(PROMPTS)), generator=torch.Generator().manual_seed(0))

    def images(folder: Path) -> np.ndarray:  # what the device computes, in PyTorch with the package's weights
        device = with_coreml_weights(pipe, folder)
        return device(PROMPTS, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      output_type="np").images

    reference = images(base)
    result = {}
    for variant, folder in folders.items():
        report = validate_coreml(pipe, folder)
        result[variant] = {"package_bytes": {k: p["bytes"] for k, p in report["packages"].items()},
                           "bytes": sum(p["bytes"] for p in report["packages"].values()),
                           "predicted": report["predicted"],
                           "image_psnr_vs_fp16_db": round(psnr_db(reference, images(folder)), 2)}
        if (folder / PALETTE_ANALYSIS).is_file():
            analysis = read_json(folder / PALETTE_ANALYSIS)
            result[variant]["mixed_palettization"] = {k: analysis[k] for k in (
                "target_psnr_db", "psnr_db", "all_4bit_psnr_db", "weights_at_bits", "mean_bits", "bytes", "fp16_bytes",
                "evaluations", "seconds")}
    return result


def optimum_generates(folder: Path) -> bool:
    """True only if optimum's ORTStableDiffusionPipeline loads ``folder`` and returns a real image."""
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    ort_pipe = ORTStableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    image = ort_pipe("a red circle on a plain background", num_inference_steps=10, output_type="np").images
    return bool(image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01)


def sd_feeds() -> list[dict[str, np.ndarray]]:
    """Calibration feeds of the SD 1.5 UNet at batch 2: seeded latents and text states across the schedule
    (random weights: the ranges set speed, not quality)."""
    return [{"sample": seeded_normal((2, 4, 32, 32), i).numpy(), "timestep": np.array(t, np.float32),
             "encoder_hidden_states": seeded_normal((2, 77, 768), 10 + i).numpy()}
            for i, t in enumerate((900.0, 600.0, 300.0, 50.0))]


def _make_sd_variant(src: Path, folder: Path, method: str) -> None:
    inputs = QuantizeInputs(sd_feeds(), [], STEPS, GUIDANCE, MIXED_PSNR)
    (quantize_ov if method in OPENVINO_QUANTIZERS else quantize_folder)(src, folder, method, inputs)


SD_VARIANTS = ("fp32-optimized", "int8-ort-static", "int8-ort-dynamic")


def sd_unet(work: Path, args) -> dict:
    """The SD 1.5 UNet alone at batch 2, 32x32 latents: ONNX fp32, its variants, OpenVINO fp32 and INT8."""
    config = {**UNET_CONFIGS["sd-1.5"], "sample_size": 32}
    base = work / "sd-1.5-unet"
    fp32 = base / "onnx" / "fp32"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    params = count_params(unet)
    seconds = {}
    if not fp32.is_dir():
        t0 = time.perf_counter()
        export_component(SimpleNamespace(unet=unet, tokenizer=SimpleNamespace(model_max_length=77)), "unet",
                         fp32 / "unet")
        seconds["onnx/fp32"] = round(time.perf_counter() - t0, 1)
    del unet  # 3.4 GB the quantizers need
    ov_fp32 = base / "openvino" / "fp32"
    if not ov_fp32.is_dir():
        t0 = time.perf_counter()
        ir_from_onnx(fp32 / "unet" / "model.onnx", ov_fp32 / "unet")
        seconds["openvino/fp32"] = round(time.perf_counter() - t0, 1)
    plan = {**{f"onnx/{m}": (fp32, base / "onnx" / m, m) for m in SD_VARIANTS},
            **{f"openvino/{m}": (ov_fp32, base / "openvino" / m, m) for m in OPENVINO_QUANTIZERS}}
    folders, errors = {"onnx/fp32": fp32, "openvino/fp32": ov_fp32}, {}
    for key, (src, folder, method) in plan.items():
        if not folder.is_dir():
            # each in its own process: a variant that runs out of memory is recorded, and the others still run
            t0 = time.perf_counter()
            child = multiprocessing.get_context("spawn").Process(target=_make_sd_variant, args=(src, folder, method))
            child.start()
            child.join()
            seconds[key] = round(time.perf_counter() - t0, 1)
            if child.exitcode != 0:
                errors[key] = ("killed (out of memory: the kernel's OOM killer)" if child.exitcode == -9
                               else f"failed (exit {child.exitcode})")
                print(f"  sd-1.5-unet {key}: {errors[key]}", flush=True)
                continue
        folders[key] = folder
        print(f"  sd-1.5-unet {key} ready ({seconds.get(key)} s)", flush=True)
    print("  sd-1.5-unet artefacts ready", flush=True)

    def load(key: str, folder: Path):
        if key.startswith("openvino/"):
            compiled = compile_ir(folder / "unet" / "openvino_model.xml", threads=args.threads)
            return lambda feed: compiled(feed)
        sess = session(folder / "unet" / "model.onnx", threads=args.threads)
        return lambda feed: sess.run(None, feed)

    feed = sd_feeds()[1]
    runs = {k: load(k, f) for k, f in folders.items()}
    outputs = {k: np.asarray(list(run(feed).values())[0] if k.startswith("openvino/") else run(feed)[0])
               for k, run in runs.items()}
    latency = interleaved({k: {"unet": (lambda r=run: r(feed))} for k, run in runs.items()}, args.sd_repeats)
    ref = outputs["onnx/fp32"]
    fp32_ms = latency["onnx/fp32"]["unet"]["median"]
    variants = {}
    for key in folders:
        err = float(np.abs(outputs[key] - ref).max())
        variants[key] = {"unet_latency_ms": latency[key]["unet"], "unet_bytes": folder_bytes(folders[key] / "unet"),
                         "unet_speedup_vs_fp32": round(fp32_ms / latency[key]["unet"]["median"], 3),
                         "unet_rel_error_vs_fp32_random_weights": round(err / float(np.abs(ref).max()), 4),
                         "make_seconds": seconds.get(key)}
    return {"unet_params": params, "latents": [2, 4, 32, 32], "variants": variants, "errors": errors}


def headlines(models: dict) -> dict:
    """The best INT8 UNet on the SD 1.5 architecture among the variants whose images stay >= 30 dB from fp32 on
    both tiny-shapes models, against plain and optimized fp32."""
    sd = models.get("sd-1.5-unet", {}).get("variants", {})
    tiny = [models[m]["onnx_openvino"]["variants"] for m in ("tiny-shapes", "tiny-shapes-pruned") if m in models]

    def psnr(key: str) -> float:
        """The variant's worst image PSNR against the fp32 ONNX export over the tiny-shapes models."""
        return min((v[key]["image_psnr_vs_fp32_db"] for v in tiny if key in v), default=float("nan"))

    int8 = {k: f for k, f in sd.items() if "int8" in k}
    ok = {k: f for k, f in int8.items() if psnr(k) >= 30}
    pool = ok or int8
    if not pool:
        return {}
    best = max(pool, key=lambda k: pool[k]["unet_speedup_vs_fp32"])
    opt = sd.get("onnx/fp32-optimized", {}).get("unet_latency_ms", {}).get("median")
    best_ms = pool[best]["unet_latency_ms"]["median"]
    vs_opt = round(opt / best_ms, 3) if opt else None
    ov = {k: {"unet_speedup_vs_onnx_fp32": f["unet_speedup_vs_fp32"],
              "tiny_shapes_psnr_vs_fp32_db": round(psnr(k), 2) if "int8" in k else None}
          for k, f in sd.items() if k.startswith("openvino/")}
    return {
        "int8_speedup_best": pool[best]["unet_speedup_vs_fp32"],
        "int8_speedup_vs_optimized": vs_opt,
        "int8_best_variant": best,
        "int8_psnr_db": round(psnr(best), 2),
        "fp32_optimized_speedup": sd.get("onnx/fp32-optimized", {}).get("unet_speedup_vs_fp32"),
        "int8_target_met": bool(ok) and pool[best]["unet_speedup_vs_fp32"] >= 1.5 and (vs_opt or 0) >= 1.2,
        "openvino": ov,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sd-repeats", type=int, default=6)
    parser.add_argument("--skip-coreml", action="store_true")
    parser.add_argument("--skip-sd", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="runtime intra-op threads (0: all cores)")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "export")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    evaluator = load_evaluator("zoo:tiny-shapes-evaluator")
    pipelines = {"tiny-shapes": (lambda: load_pipeline("zoo:tiny-shapes"), evaluator),
                 "tiny-shapes-pruned": (pruned_pipeline, evaluator), "medium": (medium_pipeline, None)}
    models: dict = {}
    if not args.skip_sd:  # first: the largest, the one that may run out of memory
        models["sd-1.5-unet"] = sd_unet(args.work, args)
        print("sd-1.5-unet done", round(time.perf_counter() - t0), "s", flush=True)
    for name, (make, scorer) in pipelines.items():
        pipe = make()
        models[name] = {"onnx_openvino": pipeline_variants(name, pipe, args.work, args, scorer)}
        if not args.skip_coreml:
            models[name]["coreml"] = coreml_variants(name, pipe, args.work)
        print(name, "done", round(time.perf_counter() - t0), "s", flush=True)
    loads = optimum_generates(args.work / "tiny-shapes" / "onnx" / "fp32")
    result = {
        **headlines(models),
        "optimum_pipeline_loads": loads,
        "models": models,
        "settings": {"steps": STEPS, "guidance_scale": GUIDANCE, "repeats": args.repeats, "sd_repeats": args.sd_repeats,
                     "mixed_psnr_db": MIXED_PSNR, "threads": args.threads or "all cores",
                     "int8_scheme": int8_scheme().to_dict(),
                     "latency": "CPU, ms per call: median, quartiles, min; every variant interleaved in one run",
                     "world_figures": "96 wanted prompts and 48 prompts per concept and prompt set, 2 seeds each",
                     "coreml_prediction": "not run: needs macOS (package specs validated)"},
        "seconds": round(time.perf_counter() - t0, 1),
        "provenance": provenance(),
    }
    write_json(args.out, result)
    print({k: result[k] for k in ("int8_speedup_best", "int8_speedup_vs_optimized", "int8_best_variant",
                                  "int8_psnr_db", "fp32_optimized_speedup", "int8_target_met") if k in result})


if __name__ == "__main__":
    main()
