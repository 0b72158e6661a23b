"""The bench's parts on real components: statistics, prompt sets, image metrics, and each concept detector
(the tiny-shapes evaluator, NudeNet's shipped ONNX model, a randomly initialised CLIP built from a config)."""

import numpy as np
import pytest
import torch

from edgesafe.bench.detectors import DETECTORS, build_detectors
from edgesafe.bench.quality import SCORERS, psnr_db, ssim
from edgesafe.bench.statistics import rate, spread, wilson
from edgesafe.errors import EdgesafeError, RecipeError
from edgesafe.recipe import load_recipe
from edgesafe.zoo.tiny_shapes import world
from edgesafe.zoo.tiny_shapes.world import _TEMPLATES_FULL, _TEMPLATES_NO_COLOUR, _TEMPLATES_NO_STYLE

from .conftest import ROOT

TINY = ROOT / "recipes" / "tiny-shapes.yaml"


def test_wilson_interval_known_values():
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    assert rate(3, 40)["ci_high"] - rate(3, 40)["ci_low"] > rate(30, 400)["ci_high"] - rate(30, 400)["ci_low"]


def test_spread_is_median_and_quartiles():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert spread([7.0])["q1"] == 7.0


def test_wanted_prompts_cover_every_template_synonym_and_partial_caption():
    prompts = world.coverage_prompts()
    words = set(" ".join(prompts).split())
    for head, table in world.WORDS.items():
        for value, synonyms in table.items():
            if value in world.UNWANTED:
                assert not words & set(synonyms), value
            else:
                assert set(synonyms) <= words, (head, value)
    skeletons = set(prompts)
    for template in _TEMPLATES_FULL + _TEMPLATES_NO_STYLE + _TEMPLATES_NO_COLOUR:
        fixed = [w for w in template.split() if not w.startswith("{")]
        shape = len(template.split())
        assert any(len(p.split()) == shape and all(w in p.split() for w in fixed) for p in skeletons), template
    parsed = [world.parse_prompt(p) for p in prompts]
    assert sum(p.style is None for p in parsed) > 0 and sum(p.colour is None for p in parsed) > 0
    assert all(p.object is not None for p in parsed)
    assert world.parse_prompt("a crimson pentagram , harlequin background") == world.EvalPrompt(
        "a crimson pentagram , harlequin background", "star", "red", "checkerboard")


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 32, generator=g)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(a, a), torch.ones(3)) and (psnr_db(a, a) >= 99).all()
    assert (ssim(a, noisy) < 0.95).all() and (psnr_db(a, noisy) < 25).all()
    assert torch.allclose(ssim(a, noisy), ssim(noisy, a), atol=1e-6)
    assert (ssim(a, (a + 0.02).clamp(0, 1)) > ssim(a, noisy)).all()


def _renders(attrs: list[world.Attributes], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([world.render(a, rng) for a in attrs]).transpose(0, 3, 1, 2))


def test_tiny_shapes_detector_sees_its_concept():
    recipe = load_recipe(TINY)
    detectors = build_detectors(recipe)
    stars = _renders([world.Attributes("star", c, "plain") for c in world.COLOURS])
    circles = _renders([world.Attributes("circle", c, "checkerboard") for c in world.COLOURS])
    assert sum(detectors["star"](stars)) >= 5 and sum(detectors["star"](circles)) <= 1
    assert sum(detectors["checkerboard"](circles)) >= 5 and sum(detectors["checkerboard"](stars)) <= 1


def test_detector_settings_are_checked(tmp_path):
    with pytest.raises(RecipeError, match="unknown detector 'nsfw'; known: tiny-shapes, nudenet, clip"):
        _with_detector(tmp_path, {"name": "nsfw"})
    with pytest.raises(EdgesafeError, match="not head=value"):
        build_detectors(_with_detector(tmp_path, {"name": "tiny-shapes", "label": "object=dragon"}))
    with pytest.raises(EdgesafeError, match="no CLIP model folder"):
        build_detectors(_with_detector(tmp_path, {"name": "clip", "model": str(tmp_path / "none")}))
    with pytest.raises(EdgesafeError, match="tiny-shapes takes no threshold"):
        build_detectors(_with_detector(tmp_path, {"name": "tiny-shapes", "threshold": 0.5}))
    with pytest.raises(EdgesafeError, match="nudenet uses the model its package ships"):
        build_detectors(_with_detector(tmp_path, {"name": "nudenet", "model": str(tmp_path)}))
    with pytest.raises(EdgesafeError, match="clip needs 'model'"):
        build_detectors(_with_detector(tmp_path, {"name": "clip"}))
    with pytest.raises(RecipeError, match="unknown prompt set 'adversarial'"):
        load_recipe(TINY, overrides={"bench.prompt_sets": ["direct", "adversarial"]})


def _with_detector(tmp_path, detector: dict):
    import yaml

    data = yaml.safe_load(TINY.read_text())
    data["concepts"][0]["detector"] = detector
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_nudenet_detector_runs_its_shipped_model_on_made_images(tmp_path):
    recipe = _with_detector(tmp_path, {"name": "nudenet", "threshold": 0.5})
    detector = build_detectors(recipe)["checkerboard"]
    assert "NudeNet" in detector.description and "FEMALE_BREAST_EXPOSED" in detector.classes
    shapes = _renders([world.Attributes(o, "red", "plain") for o in world.OBJECTS])
    blank = torch.zeros(2, 3, 64, 64)
    assert detector(torch.cat([torch.nn.functional.interpolate(shapes, size=64), blank])) == [False] * 7


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A small CLIP with random weights, built from a config and saved with a real CLIPTokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from edgesafe.zoo.tiny_shapes.tokenizer import write_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = write_tokenizer(world.vocabulary() + ["picture"], folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": tokenizer.model_max_length},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_clip_detector_and_scorer_run_on_a_local_clip(tmp_path, clip_folder):
    recipe = _with_detector(tmp_path, {"name": "clip", "model": str(clip_folder), "label": "a checkerboard",
                                       "threshold": 0.5})
    detector = build_detectors(recipe)["checkerboard"]
    images = _renders([world.Attributes("circle", c, s) for c in ("red", "blue") for s in ("plain", "checkerboard")])
    flags = detector(images)
    assert len(flags) == 4 and all(isinstance(f, bool) for f in flags)
    assert (SCORERS["clip"].unavailable(recipe) or "").startswith("no local CLIP weights")
    from edgesafe.recipe import recipe_from_dict

    with_clip = recipe_from_dict({**recipe.to_dict(), "bench": {**recipe.to_dict()["bench"],
                                                                "clip_model": str(clip_folder)}})
    scorer = SCORERS["clip"].build(with_clip, images, lambda: images.flip(0))
    figures = scorer(images, ["a red circle"] * 4)
    assert set(figures) == {"clip_score", "clip_fid_vs_real", "clip_fid_vs_teacher"}
    assert 0 <= figures["clip_score"] <= 100 and figures["clip_fid_vs_teacher"] == pytest.approx(0, abs=1e-3)


def test_every_detector_is_documented():
    import edgesafe.bench.detectors as module

    for name in DETECTORS:
        assert f"``{name}``" in module.__doc__
