"""benchmarks/paper_claim.py's probe: the held-out erasure figure and the settings it passes on to the image sweep."""

import importlib.util

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def paper_claim():
    spec = importlib.util.spec_from_file_location("paper_claim", ROOT / "benchmarks" / "paper_claim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_erasure_is_the_objectives_loss_against_the_concept_prompts_distillation_loss(paper_claim):
    held = {"output_kd": 0.1, "concept_kd.a": 0.2, "unlearn.a.esd": 0.1, "unlearn.a.ablation": 0.6,
            "concept_kd.b": 0.1, "unlearn.b.esd": 0.3, "unlearn.b.ablation": 0.1}
    assert paper_claim.erasure(held, "esd") == pytest.approx((0.5 + 3.0) / 2)
    assert paper_claim.erasure(held, "ablation") == pytest.approx((3.0 + 1.0) / 2)


def test_the_probe_passes_on_the_spread_of_the_front_that_kd_does_not_beat(paper_claim):
    kd = (1.5, 0.10)  # (erasure, held-out distillation loss): lower is better for both
    points = {"c": (0.3, 0.40), "a": (0.5, 0.20), "b": (0.8, 0.15), "d": (0.9, 0.30), "e": (1.2, 0.12),
              "f": (1.6, 0.11)}  # d is beaten by b, f by kd
    assert paper_claim.choose(points, kd) == ["c", "b", "e"]  # the strongest, the weakest and one between
    assert paper_claim.choose(points, kd, k=5) == ["c", "a", "b", "e"]
    assert paper_claim.choose({"x": (2.0, 0.3), "y": (1.6, 0.2), "z": (1.7, 0.2)}, kd, k=2) == ["y", "z"]
