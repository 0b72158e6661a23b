"""The machine a figure was measured on: CPU name, feature flags and the vector extensions that change the
speed of CPU kernels (what makes two latency ratios comparable)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimddp",
               "i8mm", "sve")
"""Extensions whose presence changes which kernels onnxruntime and PyTorch run (x86 and Arm)."""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags, lower case (Linux /proc/cpuinfo, macOS sysctl); empty where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].lower().split())
    except OSError:
        pass
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                             capture_output=True, text=True, timeout=5).stdout
        return {f.replace(".", "_") for f in out.lower().split()}
    except (OSError, subprocess.SubprocessError):
        return set()


def speed_isa(flags: set[str] | None = None) -> list[str]:
    """The :data:`SPEED_FLAGS` this CPU has, in that order."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in SPEED_FLAGS if f in flags]
