"""The builder, the loader and the committed zoo models."""

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from diffusers import StableDiffusionPipeline

from edgesafe import load_evaluator, load_pipeline
from edgesafe.errors import ModelLoadError
from edgesafe.measure.images import frechet_distance, generate
from edgesafe.zoo import WEIGHTS_DIR
from edgesafe.zoo.tiny_shapes import world
from edgesafe.zoo.tiny_shapes.build import SCHEDULES, Cycle, build
from edgesafe.zoo.tiny_shapes.metrics import evaluate_pipeline, real_images

BUILT = (WEIGHTS_DIR / "tiny-shapes").is_dir()
needs_zoo = pytest.mark.skipif(not BUILT, reason="zoo weights not built in this checkout")


def test_short_build_writes_real_diffusers_folders(short_build):
    pipe = StableDiffusionPipeline.from_pretrained(short_build / "tiny-shapes")
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert all(f.suffix != ".bin" for f in (short_build / "tiny-shapes").rglob("*") if f.is_file())
    info = json.loads((short_build / "tiny-shapes" / "build.json").read_text())
    assert [c["steps"] for c in info["schedule"]["cycles"]] == [c.steps for c in SCHEDULES["short"].cycles]


def test_build_is_deterministic_and_resumable(tmp_path, short_build):
    """Same seed, fresh work folder, killed after the evaluator phase and halfway through the first diffusion cycle
    (its optimizer and EMA state restored from the checkpoint of step 2): the same weights."""
    work = tmp_path / "work"
    build(tmp_path / "a", work=work, seed=0, schedule=SCHEDULES["short"])
    for phase in ["vae"] + [c.name for c in SCHEDULES["short"].cycles[1:]]:
        shutil.rmtree(work / phase)
    first = work / SCHEDULES["short"].cycles[0].name
    assert sorted(p.name for p in first.glob("step-*")) == ["step-0000002.safetensors", "step-0000004.safetensors"]
    (first / "step-0000004.safetensors").unlink()
    (first / "latest.json").write_text(json.dumps({"file": "step-0000002.safetensors", "step": 2}))
    build(tmp_path / "b", work=work, seed=0, schedule=SCHEDULES["short"])
    for sub in ("tiny-shapes/unet", "tiny-shapes/vae", "tiny-shapes-evaluator"):
        a = (tmp_path / "a" / sub).glob("*.safetensors")
        for f in a:
            assert f.read_bytes() == (short_build / sub / f.name).read_bytes(), sub
            assert f.read_bytes() == (tmp_path / "b" / sub / f.name).read_bytes(), sub


def test_a_cycle_names_only_values_of_the_world():
    assert Cycle("star", 2, 1e-4, ("star",), 6.0).oversample == ("star",)
    with pytest.raises(ValueError, match=r"oversamples unknown values \['unicorn'\]"):
        Cycle("x", 2, 1e-4, ("star", "unicorn"), 2.0)


def test_load_errors(tmp_path, short_pipeline_dir):
    with pytest.raises(ModelLoadError, match="unknown zoo model 'nope'"):
        load_pipeline("zoo:nope")
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_pipeline(tmp_path / "missing")
    partial = tmp_path / "partial"
    shutil.copytree(short_pipeline_dir, partial)
    shutil.rmtree(partial / "unet")
    with pytest.raises(ModelLoadError, match="component folder unet/ is missing"):
        load_pipeline(partial)


@pytest.mark.parametrize("name", [
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
])
def test_a_truncated_model_file_is_named(tmp_path, short_pipeline_dir, name):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(short_pipeline_dir, corrupt)
    path = corrupt / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(corrupt)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_metrics_on_a_real_pipeline(short_build):
    pipe = load_pipeline(short_build / "tiny-shapes")
    evaluator = load_evaluator(short_build / "tiny-shapes-evaluator")
    images = generate(pipe, ["a red circle on a plain background"], seeds=[0, 1], steps=2)
    again = generate(pipe, ["a red circle on a plain background"], seeds=[1], steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.allclose(images[1], again[0], atol=1e-5)
    _, feats = evaluator.classify(real_images(64, seed=0))
    assert frechet_distance(feats, feats) == pytest.approx(0, abs=1e-6)


@needs_zoo
def test_committed_evaluator_reads_procedural_images():
    import numpy as np

    evaluator = load_evaluator("zoo:tiny-shapes-evaluator")
    images, _, labels = world.sample_batch(300, np.random.default_rng([777, 1]))
    names, _ = evaluator.classify(torch.from_numpy(images))
    for k, head in enumerate(world.HEADS):
        acc = np.mean([names[head][i] == world.HEADS[head][labels[i, k]] for i in range(len(labels))])
        assert acc >= 0.98, (head, acc)


def test_the_evaluator_builds_alone_as_the_teachers_build_makes_it(tmp_path, short_build):
    """`edgesafe zoo build tiny-shapes-evaluator`: phase 1 of the teacher's build, the same weights."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgesafe", "zoo", "build", "tiny-shapes-evaluator", "--schedule",
                           "short", "--out", str(tmp_path), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "tiny-shapes").exists()
    for f in (short_build / "tiny-shapes-evaluator").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "tiny-shapes-evaluator" / f.name).read_bytes()
    info = json.loads((tmp_path / "tiny-shapes-evaluator" / "build.json").read_text())
    assert info["evaluator_steps"] == SCHEDULES["short"].evaluator_steps and info["seed"] == 0


@needs_zoo
def test_committed_evaluator_says_none_where_there_is_no_object_or_pattern_and_reads_bent_objects():
    """Backgrounds alone and shapeless blobs are object `none`, patternless blotches style `none`, not the nearest
    value; objects bent, tinted and blurred as a student draws them are still read (held-out seeds)."""
    import numpy as np

    from edgesafe.zoo.tiny_shapes.evaluator import augment

    evaluator = load_evaluator("zoo:tiny-shapes-evaluator")
    rng = np.random.default_rng([778, 1])

    def read(images):
        return evaluator.classify(torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2) * 2 - 1))[0]

    blobs = read([world.render_unclear(None, None if i % 4 == 0 else "red", "plain" if i % 2 else "dots", rng)
                  for i in range(100)])
    assert np.mean([n == "none" for n in blobs["object"]]) >= 0.9
    smears = read([world.render_unclear("cross" if i % 2 else "star", "blue", None, rng) for i in range(100)])
    assert np.mean([n == "none" for n in smears["style"]]) >= 0.9
    assert np.mean([n == ("cross" if i % 2 else "star") for i, n in enumerate(smears["object"])]) >= 0.9
    images, _, labels = world.sample_batch(300, np.random.default_rng([779, 1]))
    names, _ = evaluator.classify(augment(torch.from_numpy(images), torch.Generator().manual_seed(779)))
    objects = [world.HEADS["object"][k] for k in labels[:, 0]]
    assert np.mean([a == b for a, b in zip(names["object"], objects, strict=True)]) >= 0.95


@pytest.fixture(scope="module")
def committed_figures():
    pipe = load_pipeline("zoo:tiny-shapes")
    evaluator = load_evaluator("zoo:tiny-shapes-evaluator")
    return evaluate_pipeline(pipe, evaluator, seeds=[0], steps=12)


@needs_zoo
def test_committed_weights_come_from_the_full_schedule():
    info = json.loads((WEIGHTS_DIR / "tiny-shapes" / "build.json").read_text())
    assert info["schedule"] == json.loads(json.dumps(asdict(SCHEDULES["full"]))) and info["seed"] == 0


@needs_zoo
def test_committed_teacher_generates_what_it_is_asked(committed_figures):
    plain = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR / "tiny-shapes")
    assert type(plain.unet).__name__ == "UNet2DConditionModel"
    assert committed_figures["prompt_accuracy"] >= 0.8


@needs_zoo
def test_committed_teacher_knows_the_unwanted_concepts(committed_figures):
    assert committed_figures["concept_rate_direct_min"] >= 0.9
