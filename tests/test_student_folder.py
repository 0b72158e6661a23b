"""A compressed student is a pipeline folder that plain diffusers loads."""

import json
import os
import subprocess
import sys

import torch
from diffusers import StableDiffusionPipeline

from edgesafe import PrunedUNet2DConditionModel, load_pipeline
from edgesafe.models.inputs import unet_example_inputs
from edgesafe.models.loading import resolve_source
from edgesafe.models.saving import save_student
from edgesafe.prune import prune_width, remove_blocks

PLAIN = dict(safety_checker=None, requires_safety_checker=False, local_files_only=True)


def test_width_pruned_student_loads_with_plain_diffusers(tmp_path):
    source = resolve_source("zoo:tiny-shapes")
    teacher = load_pipeline(source)
    inputs = unet_example_inputs(teacher.unet, batch=1, text_length=16)
    student = prune_width(teacher.unet, 0.5, inputs).unet
    save_student(student, source, tmp_path / "student")
    index = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert index["unet"] == ["edgesafe.models.structure", "PrunedUNet2DConditionModel"]
    for name in ("text_encoder", "vae", "tokenizer", "scheduler"):  # the teacher's, byte for byte
        for f in (source / name).iterdir():
            assert (tmp_path / "student" / name / f.name).read_bytes() == f.read_bytes()

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "student", **PLAIN)
    assert isinstance(pipe.unet, PrunedUNet2DConditionModel)
    assert torch.equal(pipe.unet(*inputs).sample, student(*inputs).sample)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    pipe.save_pretrained(tmp_path / "again")  # diffusers' own save keeps the structure spec and the class
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "again", **PLAIN)
    assert torch.equal(again.unet(*inputs).sample, student(*inputs).sample)


def test_block_removed_student_loads_without_edgesafe(tmp_path):
    source = resolve_source("zoo:tiny-shapes")
    teacher = load_pipeline(source)
    student = remove_blocks(teacher.unet, "small")
    save_student(student, source, tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    script = (
        "import sys; sys.modules['edgesafe'] = None\n"  # importing edgesafe now fails
        "from diffusers import StableDiffusionPipeline\n"
        f"p = StableDiffusionPipeline.from_pretrained({str(tmp_path)!r}, safety_checker=None, "
        "requires_safety_checker=False, local_files_only=True)\n"
        "print(type(p.unet).__name__, sum(x.numel() for x in p.unet.parameters()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["UNet2DConditionModel", str(sum(p.numel() for p in student.parameters()))]
