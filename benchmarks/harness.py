"""What every benchmark records and how it drives the CLI: provenance (commit, versions, hardware) and
``run_cli``, which runs one ``edgesafe`` command in its own process and measures its wall time and
peak resident memory (that process's own, from ``wait4``), so that figures come from the path users run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

import edgesafe

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "torch-pruning", "onnx", "onnxruntime",
            "coremltools", "nncf", "openvino")


def provenance() -> dict:
    """The date, commit (and whether the tree had changes), edgesafe and package versions, and hardware (CPU model,
    cores, torch threads, memory, GPU) of this measurement."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"), "tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "edgesafe": edgesafe.__version__, "python": platform.python_version(), "versions": versions,
        "hardware": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "memory_gib": round(memory, 1), "gpu": gpu},
    }


@dataclass(frozen=True)
class Measured:
    returncode: int
    seconds: float
    peak_rss_gib: float
    output_tail: str


def run_cli(*args: str, log: Path) -> Measured:
    """Run ``edgesafe ARGS`` in a child process (output to ``log``); its wall time and peak RSS. The child's
    peak starts from this process's resident memory at the fork, so call it from a small process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("w") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "edgesafe", "--log-json", *args], stdout=out,
                                 stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    return Measured(child.returncode, round(seconds, 1), round(usage.ru_maxrss / 2**20, 3),
                    log.read_text()[-2000:])


def real_recipes() -> list[Path]:
    """The shipped recipes for real models (every recipe whose model is not in the zoo)."""
    import yaml

    return [p for p in sorted((ROOT / "recipes").glob("*.yaml"))
            if not yaml.safe_load(p.read_text())["model"]["source"].startswith("zoo:")]


def stand_in(work: Path, arch: str) -> tuple[Path, Path]:
    """A random-weight pipeline of ``arch`` and 24 captioned images under ``work`` (written once)."""
    model, images = work / arch, work / "images"
    if not (model / "model_index.json").is_file() or not images.is_dir():
        done = run_cli("zoo", "standin", arch, "--out", str(model), "--images", str(images), log=work / f"{arch}.log")
        if done.returncode:
            sys.exit(f"stand-in {arch} failed:\n{done.output_tail}")
    return model, images


def small_run(images: Path, *, resolution: int = 256, steps: int = 2) -> list[str]:
    """``--set`` overrides that keep a real-model recipe small enough for a CPU: the stand-in's images at
    ``resolution``, ``steps`` fine-tuning steps at batch 1 (so Taylor calibration takes 4 samples), and
    ``steps`` sampling steps for the export's INT8 calibration and parity images and the bench's images (at the
    model's 512 px), and a bench of one seed per prompt, two wanted prompts and one latency round."""
    sets = [f"data.path={images}", f"data.resolution={resolution}", f"finetune.steps={steps}",
            "finetune.batch_size=1", f"finetune.checkpoint_every={steps}", f"sampling.steps={steps}",
            "bench.seeds=1", "bench.safety_seeds=1", "bench.wanted_prompts=2", "bench.latency_rounds=1",
            "bench.latency_repeats=1"]
    return [a for s in sets for a in ("--set", s)]
