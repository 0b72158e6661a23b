"""Solvers on a toy problem with a known answer, and the real training loop: checkpoints, resume, errors."""

import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from edgesafe import load_pipeline
from edgesafe.errors import CheckpointError, EdgesafeError
from edgesafe.finetune.solvers import SOLVERS, StepLosses
from edgesafe.finetune.trainer import Interrupted, Trainer
from edgesafe.models.stats import unet_example_inputs
from edgesafe.prune import prune_width
from edgesafe.recipe import load_recipe

from .conftest import ROOT


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))


def toy_losses():
    # L_ft = (a-1)^2 + (b-1)^2 ; L_unlearn = (b+1)^2, reaching only b
    return StepLosses(lower=lambda m: (m.a - 1) ** 2 + (m.b - 1) ** 2, upper=lambda m: (m.b + 1) ** 2)


def run_toy(name, steps=300, **kw):
    model = Toy()
    solver = SOLVERS[name](
        student=model, upper_params=[model.b], lower_opt=torch.optim.SGD(model.parameters(), lr=0.1),
        upper_opt=torch.optim.SGD([model.b], lr=0.1), lower_steps=steps, **kw,
    )
    if name == "bilevel-penalty":
        solver.phi = Toy()
        solver.phi_opt = torch.optim.SGD(solver.phi.parameters(), lr=0.1)
    figures = [solver.step(i, toy_losses()) for i in range(solver.total_steps())]
    return model, solver, figures


def test_kd_ignores_the_concept():
    model, _, _ = run_toy("kd")
    assert model.a.item() == pytest.approx(1, abs=1e-4) and model.b.item() == pytest.approx(1, abs=1e-4)


def test_two_stage_erases_after_distilling():
    model, solver, figures = run_toy("two-stage")
    assert solver.total_steps() == 600 and "upper" in figures[-1] and "lower" in figures[0]
    assert model.a.item() == pytest.approx(1, abs=1e-4)  # untouched by the erase stage
    assert model.b.item() == pytest.approx(-1, abs=1e-4)  # forgets L_ft entirely on b


@pytest.mark.parametrize(("lam", "b_star"), [(1.0, 0.0), (3.0, 0.5)])
def test_bilevel_penalty_reaches_the_penalised_optimum(lam, b_star):
    # argmin_b (b+1)^2 + lam * (b-1)^2  =  (lam - 1) / (lam + 1)
    model, solver, figures = run_toy("bilevel-penalty", penalty_lambda=lam, inner_steps=2)
    assert model.a.item() == pytest.approx(1, abs=1e-3)
    assert model.b.item() == pytest.approx(b_star, abs=1e-3)
    assert solver.phi.b.item() == pytest.approx(1, abs=1e-3)  # phi solves the lower level
    assert figures[-1]["gap"] == pytest.approx((b_star - 1) ** 2, abs=1e-3)
    first = run_toy("bilevel-penalty", steps=1, penalty_lambda=lam)[0]
    assert 0 < first.a.item() and first.b.item() < first.a.item()  # the first step already trades b off


def test_phi_measures_the_gap_without_steering_theta():
    every, sparse = run_toy("bilevel-penalty", steps=40, penalty_lambda=3.0)[:2], run_toy(
        "bilevel-penalty", steps=40, penalty_lambda=3.0, gap_every=7)[:2]
    assert every[0].b.item() == sparse[0].b.item() and every[0].a.item() == sparse[0].a.item()
    figures = run_toy("bilevel-penalty", steps=15, gap_every=7)[2]
    assert [i for i, f in enumerate(figures) if "gap" in f] == [0, 7, 14]


def test_bilevel_alternating_fixed_point():
    # lower then upper SGD steps on b with lr 0.1: b = 0.64 b - 0.04  =>  b = -1/9
    model, _, figures = run_toy("bilevel-alternating", upper_every=1)
    assert model.b.item() == pytest.approx(-1 / 9, abs=1e-4) and model.a.item() == pytest.approx(1, abs=1e-4)
    _, _, sparse = run_toy("bilevel-alternating", steps=10, upper_every=5)
    assert sum("upper" in f for f in sparse) == 2


# --- the real loop ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(short_pipeline_dir):
    teacher = load_pipeline(short_pipeline_dir)
    inputs = unet_example_inputs(teacher.unet, batch=1, text_length=teacher.tokenizer.model_max_length)
    student = prune_width(teacher.unet, 0.25, inputs)
    overrides = {"finetune.steps": 4, "finetune.batch_size": 4, "finetune.checkpoint_every": 2}
    return teacher, student, overrides


def make_trainer(setup, folder, solver="bilevel-penalty"):
    import copy

    teacher, student, overrides = setup
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides={**overrides, "finetune.solver": solver})
    return Trainer(teacher, copy.deepcopy(student), recipe, folder)


@pytest.mark.parametrize("solver", ["kd", "two-stage", "bilevel-penalty", "bilevel-alternating"])
def test_every_solver_trains_the_real_student(setup, tmp_path, solver):
    before = {k: v.clone() for k, v in setup[1].state_dict().items()}
    result = make_trainer(setup, tmp_path, solver).run(resume=False, checkpoint_every=2)
    assert result.steps == (8 if solver == "two-stage" else 4) and len(result.curves) == result.steps
    changed = [k for k, v in result.student.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(v).all() for v in result.student.state_dict().values())
    assert "denoise" in result.curves[0] and "feature_kd" in result.curves[0]


def test_interrupt_and_resume_match_an_uninterrupted_run(setup, tmp_path):
    whole = make_trainer(setup, tmp_path / "whole").run(resume=False, checkpoint_every=100)

    def stop_at_two(done, total):
        if done == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match="at step 2"):
        make_trainer(setup, tmp_path / "cut").run(resume=False, checkpoint_every=100, progress=stop_at_two)
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == 2
    resumed = make_trainer(setup, tmp_path / "cut").run(resume=True, checkpoint_every=100)
    assert resumed.resumed_from == 2
    for k, v in whole.student.state_dict().items():
        assert torch.allclose(v, resumed.student.state_dict()[k], atol=1e-6), k
    assert [c["lower"] for c in resumed.curves] == pytest.approx([c["lower"] for c in whole.curves], abs=1e-6)


def test_bad_checkpoints_are_clear_errors_and_never_replace_the_good_one(setup, tmp_path):
    make_trainer(setup, tmp_path).run(resume=False, checkpoint_every=2)
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["file"]
    with pytest.raises(CheckpointError, match="from solver 'bilevel-penalty', not 'kd'"):
        make_trainer(setup, tmp_path, "kd").run(resume=True, checkpoint_every=2)
    path = tmp_path / "checkpoints" / latest
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        make_trainer(setup, tmp_path).run(resume=True, checkpoint_every=2)
    teacher, student, overrides = setup
    other = prune_width(teacher.unet, 0.5, unet_example_inputs(teacher.unet, batch=1, text_length=16))
    path.write_bytes(good)
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides=overrides)
    with pytest.raises(CheckpointError, match="from another model"):
        Trainer(teacher, other, recipe, tmp_path).run(resume=True, checkpoint_every=2)


def test_unlearning_solver_without_concepts(setup, tmp_path):
    teacher, student, overrides = setup
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides={**overrides, "concepts": []})
    with pytest.raises(EdgesafeError, match="needs at least one concept"):
        Trainer(teacher, student, recipe, tmp_path)


@pytest.mark.parametrize("launcher", [
    ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
    # on CPUs `--cpu --num_processes 2` starts one process; --multi_gpu with Accelerator(cpu=True) starts two
    ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29534"],
], ids=["torchrun", "accelerate"])
def test_two_cpu_ranks_take_identical_steps(short_pipeline_dir, tmp_path, launcher):
    import subprocess
    import sys

    script = ROOT / "tests" / "two_rank_train.py"
    cmd = [sys.executable, *launcher,
           str(script), str(short_pipeline_dir), str(ROOT / "recipes" / "tiny-shapes.yaml"), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    digests = {p.name: p.read_text() for p in tmp_path.glob("rank*-of-2.txt")}
    assert len(digests) == 2, done.stderr[-2000:]
    assert len(set(digests.values())) == 1  # gradients were averaged: both ranks hold the same weights
    assert (tmp_path / "checkpoints" / "latest.json").is_file()  # written once, by rank 0


# --- placement, precision and memory -----------------------------------------------------------

def _own_trainer(short_pipeline_dir, folder, **overrides):
    """A trainer on its own teacher (the trainer moves and casts its teacher's components)."""
    teacher = load_pipeline(short_pipeline_dir)
    student = prune_width(teacher.unet, 0.25, unet_example_inputs(teacher.unet, batch=1, text_length=16))
    base = {"finetune.steps": 2, "finetune.batch_size": 4, "finetune.checkpoint_every": 100}
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides={**base, **overrides})
    return Trainer(teacher, student, recipe, folder)


def test_a_fine_tune_that_cannot_fit_stops_before_any_work(setup, tmp_path):
    import copy

    teacher, student, overrides = setup
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml",
                         overrides={**overrides, "finetune.batch_size": 500_000})
    with pytest.raises(EdgesafeError, match=r"finetune needs about [\d.]+ GiB on cpu \(.*activations.*\) but"):
        Trainer(teacher, copy.deepcopy(student), recipe, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_activation_estimate_scales_with_samples_resolution_and_checkpointing(setup):
    from edgesafe.finetune.memory import activation_bytes

    student = setup[1]

    def acts(**kw):
        return activation_bytes(student, **{"latent_size": 16, "text_length": 16, "samples": 1,
                                            "checkpointing": False, **kw})

    one = acts()
    assert acts(samples=4) == pytest.approx(4 * one, rel=0.02)
    assert acts(latent_size=32) > 3 * one
    assert acts(checkpointing=True) < one / 2
    assert all(p.device.type == "cpu" for p in student.parameters())  # traced on a meta copy


def test_gradient_checkpointing_takes_the_same_steps(short_pipeline_dir, tmp_path):
    plain = _own_trainer(short_pipeline_dir, tmp_path / "plain", **{"finetune.solver": "kd"})
    ckpt = _own_trainer(short_pipeline_dir, tmp_path / "ckpt",
                        **{"finetune.solver": "kd", "finetune.gradient_checkpointing": True})
    assert ckpt.student.is_gradient_checkpointing and not plain.student.is_gradient_checkpointing
    assert ckpt.memory_estimate.activations < plain.memory_estimate.activations
    a, b = plain.run(resume=False, checkpoint_every=100), ckpt.run(resume=False, checkpoint_every=100)
    for (name, x), y in zip(a.student.state_dict().items(), b.student.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), name


def test_bf16_mixed_precision_holds_the_teacher_in_half_and_trains_fp32_weights(short_pipeline_dir, tmp_path):
    trainer = _own_trainer(short_pipeline_dir, tmp_path, **{"finetune.mixed_precision": "bf16"})
    assert {m.dtype for m in (trainer.teacher, trainer.task.pipe.text_encoder, trainer.task.pipe.vae)} == {
        torch.bfloat16}
    result = trainer.run(resume=False, checkpoint_every=100)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in result.student.parameters())
    assert all(math.isfinite(c["lower"]) and math.isfinite(c["upper"]) for c in result.curves)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_fp16_without_a_gpu_is_a_clear_error(short_pipeline_dir, tmp_path):
    with pytest.raises(EdgesafeError, match="fp16 needs a CUDA GPU"):
        _own_trainer(short_pipeline_dir, tmp_path, **{"finetune.mixed_precision": "fp16"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_fine_tuning_runs_on_the_gpu(short_pipeline_dir, tmp_path, precision):
    trainer = _own_trainer(short_pipeline_dir, tmp_path, **{"finetune.mixed_precision": precision})
    devices = set()
    inputs = trainer.task.inputs

    def recording(*args):
        out = inputs(*args)
        devices.update(v.device.type for v in out.values())
        return out

    trainer.task.inputs = recording
    result = trainer.run(resume=False, checkpoint_every=100)
    assert devices == {"cuda"}
    assert all(p.is_cuda for p in result.student.parameters())
    assert all(p.is_cuda for p in trainer.solver.phi.parameters())
    assert all(m.device.type == "cuda" for m in (trainer.teacher, trainer.task.pipe.text_encoder,
                                                 trainer.task.pipe.vae))
    for opt in (trainer.solver.lower_opt, trainer.solver.upper_opt, trainer.solver.phi_opt):
        assert all(t.is_cuda for state in opt.state.values() for t in state.values() if torch.is_tensor(t)
                   and t.dim() > 0)
    assert all(math.isfinite(c["lower"]) for c in result.curves)


def test_8bit_adamw_keeps_quarter_size_states_and_resumes_exactly(short_pipeline_dir, tmp_path):
    eight = {"finetune.optimizer": "adamw-8bit", "finetune.steps": 4, "finetune.solver": "bilevel-alternating"}
    plain = _own_trainer(short_pipeline_dir, tmp_path / "plain", **{**eight, "finetune.optimizer": "adamw"})
    whole = _own_trainer(short_pipeline_dir, tmp_path / "whole", **eight)
    n = sum(p.numel() for p in whole.student.parameters())
    assert plain.memory_estimate.student - whole.memory_estimate.student == 6 * n
    result = whole.run(resume=False, checkpoint_every=100)
    states = [t for s in whole.solver.lower_opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert any(t.dtype == torch.uint8 for t in states)

    def stop_at_two(done, total):
        if done == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        _own_trainer(short_pipeline_dir, tmp_path / "cut", **eight).run(resume=False, checkpoint_every=100,
                                                                        progress=stop_at_two)
    resumed = _own_trainer(short_pipeline_dir, tmp_path / "cut", **eight).run(resume=True, checkpoint_every=100)
    assert resumed.resumed_from == 2
    for (name, a), b in zip(result.student.state_dict().items(), resumed.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
