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


def test_a_two_stage_cell_continues_from_its_kd_cell(paper_claim):
    assert paper_claim.distillation_cell(("two-stage-esd", "esd", "erase30-lr0.001", 2)) == ("kd", "none", "-", 2)
    assert paper_claim.distillation_cell(("bilevel-alternating", "esd", "every5", 0)) is None


def test_a_cell_is_finished_only_with_a_current_record_and_its_final_checkpoint(paper_claim, tmp_path):
    from edgesafe.io import write_json

    work, cells = tmp_path / "work", tmp_path / "cells"
    kd = paper_claim.KD
    record = {"pruned_student": "abc", "steps": 600,
              "finetune": paper_claim.cell_recipe(*kd).finetune.model_dump(mode="json")}
    write_json(paper_claim.trained_path(cells, kd), record)
    assert paper_claim.finished(kd, work, cells, "abc") is None  # the scratch folder lost its checkpoints
    pointer = paper_claim.train_folder(work, kd) / "checkpoints" / "latest.json"
    write_json(pointer, {"file": "step-0000600.safetensors", "step": 600})
    assert paper_claim.finished(kd, work, cells, "abc") == record
    assert paper_claim.finished(kd, work, cells, "other-student") is None
    assert paper_claim.finished(kd, work, cells, "abc", steps=50) is None  # other settings
    write_json(pointer, {"file": "step-0000300.safetensors", "step": 300})
    assert paper_claim.finished(kd, work, cells, "abc") is None  # stopped before its last step


def test_a_record_goes_stale_only_with_a_setting_its_solver_reads(paper_claim):
    cell = ("bilevel-penalty", "esd", "lambda1.0", 0)
    recipe = paper_claim.cell_recipe(*cell)
    made = recipe.finetune.model_dump(mode="json")
    record = {"pruned_student": "abc", "finetune": {**made, "erase_ratio": 0.1}}  # the constrained solver's
    assert paper_claim.current(record, recipe, "abc")
    assert not paper_claim.current({**record, "finetune": {**made, "penalty_lambda": 3.0}}, recipe, "abc")
    assert not paper_claim.current({**record, "finetune": {**made, "lr": 1e-4}}, recipe, "abc")
    assert not paper_claim.current({**record, "finetune": {k: v for k, v in made.items() if k != "inner_steps"}},
                                   recipe, "abc")
    assert not paper_claim.current(record, recipe, "other-student")


def test_a_cell_is_claimed_by_one_live_process_at_a_time(paper_claim, tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "cell.json"
    assert paper_claim.claim(path)
    assert paper_claim.claim(path)  # this process holds it: train() claims what the probe loop claimed
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.with_suffix(".claim").write_text(str(other.pid))
        assert not paper_claim.claim(path)  # a live process holds it
    finally:
        other.kill()
        other.wait()
    assert paper_claim.claim(path)  # its holder died: the claim is taken over
    assert path.with_suffix(".claim").read_text() == str(os.getpid())


ESD_OWN = {"finetune.erase_against": "distilled", "finetune.upper_latents": "model-samples"}


@pytest.mark.parametrize("erase", [{}, ESD_OWN])
def test_continuing_after_kds_checkpoint_ends_where_the_whole_two_stage_run_does(paper_claim, short_pipeline_dir,
                                                                                tmp_path, erase):
    import copy

    import torch

    from edgesafe import load_pipeline
    from edgesafe.finetune.trainer import Trainer
    from edgesafe.models.inputs import unet_example_inputs
    from edgesafe.prune import prune_width
    from edgesafe.recipe import load_recipe

    teacher = load_pipeline(short_pipeline_dir)
    pruned = prune_width(teacher.unet, 0.25, unet_example_inputs(teacher.unet, batch=1,
                                                                 text_length=teacher.tokenizer.model_max_length))

    def trainer(folder, solver):
        recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides={
            "finetune.solver": solver, "finetune.steps": 3, "finetune.batch_size": 4, "finetune.erase_steps": 2,
            "finetune.upper_lr": 1e-2, **erase})
        return Trainer(teacher, copy.deepcopy(pruned.unet), recipe, tmp_path / folder,
                       kept_channels=pruned.kept_channels)

    trainer("kd", "kd").run(resume=False, checkpoint_every=100)
    whole = trainer("whole", "two-stage").run(resume=False, checkpoint_every=100)
    continued = trainer("continued", "two-stage")
    paper_claim.continue_after_distillation(continued, tmp_path / "kd")
    result = continued.run(resume=True, checkpoint_every=100)
    assert result.resumed_from == 3 and result.steps == 5
    erased = result.student.state_dict()
    for name, value in whole.student.state_dict().items():
        assert torch.equal(erased[name], value), name
    assert any(not torch.equal(erased[n], v) for n, v in pruned.unet.state_dict().items())
    assert result.curves == whole.curves
