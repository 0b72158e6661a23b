import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="session")
def short_build(tmp_path_factory) -> Path:
    """A tiny-shapes pipeline and evaluator built by the real builder on its short schedule."""
    from edgesafe.zoo.tiny_shapes.build import SCHEDULES, build

    out = tmp_path_factory.mktemp("zoo")
    build(out, work=out / "work", seed=0, schedule=SCHEDULES["short"])
    return out


@pytest.fixture(scope="session")
def short_pipeline_dir(short_build) -> Path:
    return short_build / "tiny-shapes"
