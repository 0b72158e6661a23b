"""Device profiles (data files beside this module) and their latency estimators.

A profile says how a device runs a model (runtime, compute units, precision, channel multiple,
memory budget) and how long a UNet step takes there. ``measured`` profiles time the model with
onnxruntime on this machine; ``roofline`` profiles estimate

    ms per step = 1000 * max(MACs / macs_per_s, parameter bytes / bytes_per_s)

with ``macs_per_s`` taken from a published per-step figure of a reference architecture
(``published``/``proxy``) or from datasheet peak arithmetic times an efficiency (``datasheet``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import EdgesafeError

PROFILE_DIR = Path(__file__).parent / "profiles"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PublishedCalibration(_Strict):
    """A per-step latency published for a reference architecture on this (or a stand-in) device."""

    kind: Literal["published", "proxy"]
    reference_model: str
    reference_batch: int = Field(ge=1)
    reference_macs: int = Field(gt=0)
    published_ms_per_step: float = Field(gt=0)
    source: str

    @property
    def macs_per_s(self) -> float:
        return self.reference_macs / (self.published_ms_per_step / 1000)


class DatasheetCalibration(_Strict):
    """Peak arithmetic from a datasheet times an assumed efficiency (no published SD figure)."""

    kind: Literal["datasheet"]
    peak_macs_per_s: float = Field(gt=0)
    efficiency: float = Field(gt=0, le=1)
    source: str

    @property
    def macs_per_s(self) -> float:
        return self.peak_macs_per_s * self.efficiency


class RooflineEstimator(_Strict):
    kind: Literal["roofline"]
    bytes_per_s: float = Field(gt=0)
    calibration: Annotated[PublishedCalibration | DatasheetCalibration, Field(discriminator="kind")]

    def ms_per_step(self, macs: int, param_bytes: int) -> float:
        return 1000 * max(macs / self.calibration.macs_per_s, param_bytes / self.bytes_per_s)


class MeasuredEstimator(_Strict):
    kind: Literal["measured"]
    note: str = ""


class DeviceProfile(_Strict):
    name: str
    title: str
    runtime: Literal["coreml", "onnxruntime", "openvino"]
    compute_units: Literal["cpu", "gpu", "npu", "cpu_and_ne", "cpu_and_gpu", "all"]
    precision: Literal["fp32", "fp16", "int8"]
    channel_multiple: int = Field(ge=1)
    memory_budget_mb: int = Field(gt=0)
    """Memory the model may take on the device; the bench gates the edge artefact's weights on it."""
    estimator: Annotated[RooflineEstimator | MeasuredEstimator, Field(discriminator="kind")]

    @property
    def measured(self) -> bool:
        return isinstance(self.estimator, MeasuredEstimator)

    def estimate_ms_per_step(self, macs: int, param_bytes: int) -> float:
        """Estimated UNet ms per step; ``measured`` profiles have no estimate (time the model instead)."""
        if isinstance(self.estimator, MeasuredEstimator):
            raise EdgesafeError(f"device {self.name!r} is measured, not estimated: time the exported model")
        return self.estimator.ms_per_step(macs, param_bytes)

    def provenance(self) -> str:
        if isinstance(self.estimator, MeasuredEstimator):
            return "measured on this machine with onnxruntime"
        cal = self.estimator.calibration
        return f"{cal.kind}: {' '.join(cal.source.split())}"


@cache
def load_profiles() -> dict[str, DeviceProfile]:
    """Every shipped profile by name."""
    profiles = {}
    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        try:
            profile = DeviceProfile.model_validate(yaml.safe_load(path.read_text()))
        except ValidationError as exc:  # a broken shipped file is a bug, but say which
            raise EdgesafeError(f"{path}: invalid device profile: {exc.errors()[0]['msg']}") from None
        profiles[profile.name] = profile
    return profiles


def get_profile(name: str) -> DeviceProfile:
    profiles = load_profiles()
    if name not in profiles:
        raise EdgesafeError(f"unknown device {name!r}; known devices: {', '.join(profiles)}")
    return profiles[name]
