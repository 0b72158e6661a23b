"""Solvers on a toy problem with a known answer, and the real training loop: checkpoints, resume, errors."""

import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from edgesafe import load_pipeline
from edgesafe.data import Batches
from edgesafe.errors import CheckpointError, EdgesafeError
from edgesafe.finetune.solvers import SOLVERS, Setup, StepLosses, UpperTerm
from edgesafe.finetune.trainer import HELD_OUT_SEED, Trainer
from edgesafe.models.inputs import unet_example_inputs
from edgesafe.models.loading import load_evaluator
from edgesafe.prune import prune_width
from edgesafe.recipe import FinetuneSpec, load_recipe
from edgesafe.training import Interrupted

from .conftest import ROOT


class Toy(nn.Module):
    def __init__(self, **values):
        super().__init__()
        for name, v in values.items():
            setattr(self, name, nn.Parameter(torch.tensor(float(v))))


def run_toy(solver, lower, upper, subsets, *, start=None, steps=300, **settings):
    """Run ``solver`` with SGD (lr 0.1) on a toy model; ``upper`` maps a concept to (its prediction of a model,
    the objective's target, the teacher's prediction), so that L_un = MSE(prediction, target)."""
    model = Toy(**(start or {"a": 0.0, "b": 0.0}))
    ft = FinetuneSpec(solver=solver, steps=steps, **{"lr": 0.1, "upper_lr": 0.1, **settings})
    built = SOLVERS[solver](Setup(model, ft, subsets, build=lambda params, lr: torch.optim.SGD(params, lr=lr)))
    terms = [UpperTerm(c, predict, lambda t=target: torch.tensor(t), lambda r=ref: torch.tensor(r))
             for c, (predict, target, ref) in upper.items()]
    figures = [built.step(i, StepLosses(lower, terms)) for i in range(built.total_steps())]
    return model, built, figures


def fit(m):  # L_ft = (a-1)^2 + (b-1)^2
    return (m.a - 1) ** 2 + (m.b - 1) ** 2


FORGET_B = (lambda m: m.b, -1.0, 1.0)  # L_un = (b+1)^2; the teacher predicts b = 1
FORGET_C = (lambda m: m.c, -1.0, 1.0)


def test_kd_ignores_the_concept():
    model, _, _ = run_toy("kd", fit, {"c": FORGET_B}, {"c": ["b"]})
    assert model.a.item() == pytest.approx(1, abs=1e-4) and model.b.item() == pytest.approx(1, abs=1e-4)


def test_two_stage_erases_after_distilling():
    model, solver, figures = run_toy("two-stage", fit, {"c": FORGET_B}, {"c": ["b"]}, erase_steps=200)
    assert solver.total_steps() == 500 and "upper" in figures[-1] and "lower" in figures[0]
    assert model.a.item() == pytest.approx(1, abs=1e-4)  # untouched by the erase stage
    assert model.b.item() == pytest.approx(-1, abs=1e-4)  # forgets L_ft entirely on b


def test_each_concepts_gradient_reaches_only_its_own_subset():
    # concept x's loss also pulls c toward 5, but x may move only b; concept y moves c toward -1.
    # Merging the subsets would leave c between 5 and -1.
    upper = {"x": (lambda m: torch.stack([m.b, m.c]), [-1.0, 5.0], [1.0, 1.0]), "y": FORGET_C}
    model, _, figures = run_toy("two-stage", fit, upper, {"x": ["b"], "y": ["c"]}, start={"a": 0, "b": 0, "c": 0},
                                steps=1, erase_steps=600, upper_lr=0.02)
    assert model.b.item() == pytest.approx(-1, abs=1e-3) and model.c.item() == pytest.approx(-1, abs=1e-3)
    assert {"upper.x", "upper.y"} <= set(figures[-1])


def test_every_upper_step_erases_every_concept():
    # with two concepts and an even upper_every, cycling concepts by step number erased only one of them
    upper = {"x": FORGET_B, "y": FORGET_C}
    model, _, figures = run_toy("bilevel-alternating", lambda m: (m.a - 1) ** 2, upper, {"x": ["b"], "y": ["c"]},
                                start={"a": 0, "b": 0, "c": 0}, upper_every=2, steps=400)
    assert model.b.item() == pytest.approx(-1, abs=1e-3) and model.c.item() == pytest.approx(-1, abs=1e-3)
    assert [i for i, f in enumerate(figures[:6]) if "upper" in f] == [1, 3, 5]


def test_bilevel_alternating_fixed_point():
    # lower then upper SGD steps on b with lr 0.1: b = 0.64 b - 0.04  =>  b = -1/9
    model, _, _ = run_toy("bilevel-alternating", fit, {"c": FORGET_B}, {"c": ["b"]}, upper_every=1)
    assert model.b.item() == pytest.approx(-1 / 9, abs=1e-4) and model.a.item() == pytest.approx(1, abs=1e-4)


def test_bilevel_penalty_solves_the_bilevel_problem_not_a_weighted_sum():
    # upper variable x (the concept's subset), lower variable y:
    #   L_ft(x, y) = (y - x)^2 + (x - 1)^2, so y*(x) = x;   L_un(x, y) = (y + 1)^2.
    # The bilevel solution min_x L_un(x, y*(x)) is x = y = -1. A weighted sum L_un + lambda L_ft has its
    # optimum elsewhere ((x - 1)^2 pulls x toward 1); the value function's gradient removes that pull.
    def lower(m):
        return (m.y - m.x) ** 2 + (m.x - 1) ** 2

    for lam in (0.5, 3.0):
        model, solver, figures = run_toy("bilevel-penalty", lower, {"c": (lambda m: m.y, -1.0, 1.0)},
                                         {"c": ["x"]}, start={"x": 0, "y": 0}, steps=3000, penalty_lambda=lam,
                                         penalty_growth=1.0, inner_steps=3, lr=0.02, upper_lr=0.02)
        assert model.x.item() == pytest.approx(-1, abs=2e-2) and model.y.item() == pytest.approx(-1, abs=2e-2)
        assert solver.phi.y.item() == pytest.approx(model.x.item(), abs=1e-2)  # phi's z solves the lower level
        assert figures[-1]["gap"] == pytest.approx(0, abs=1e-3)


def test_bilevel_penalty_lambda_grows_linearly():
    _, solver, figures = run_toy("bilevel-penalty", fit, {"c": FORGET_B}, {"c": ["b"]}, steps=5,
                                 penalty_lambda=2.0, penalty_growth=5.0)
    assert [f["lambda"] for f in figures] == pytest.approx([2.0, 4.0, 6.0, 8.0, 10.0])


def test_bilevel_penalty_needs_a_lower_level():
    with pytest.raises(EdgesafeError, match="needs parameters outside the concepts' subsets"):
        run_toy("bilevel-penalty", fit, {"c": FORGET_B}, {"c": ["a", "b"]}, steps=1)


def test_constrained_meets_its_ratio_at_the_constrained_optimum():
    # min (b-1)^2 s.t. (b+1)^2 <= ratio (b-1)^2 (the distance to the target under ratio times the distance to the
    # teacher's prediction 1): ratio 1/4 gives b <= -1/3, so b* = -1/3 (the constraint binds)
    model, solver, figures = run_toy("constrained", lambda m: (m.b - 1) ** 2, {"c": FORGET_B}, {"c": ["b"]},
                                     start={"b": 1.0}, steps=3000, erase_ratio=0.25, dual_lr=0.02, lr=0.02)
    assert model.b.item() == pytest.approx(-1 / 3, abs=2e-2)
    assert solver.multipliers["c"] > 0 and abs(figures[-1]["violation.c"]) < 0.05
    # where L_ft's optimum b = -1/2 already meets ratio 1 (b <= 0), the multiplier stays 0 and b stays there
    loose = run_toy("constrained", lambda m: (m.b + 0.5) ** 2, {"c": FORGET_B}, {"c": ["b"]},
                    start={"b": -0.5}, steps=500, erase_ratio=1.0, lr=0.02)
    assert loose[0].b.item() == pytest.approx(-0.5, abs=1e-4) and loose[1].multipliers["c"] == 0


def test_constrained_ratio_is_met_where_the_teachers_own_loss_is_out_of_reach():
    # As under ablation: the teacher's prediction for the concept, (0, 1.2), lies near the target (-1, 1.2) (its
    # L_un is 0.5), and the student, predicting (b, 0), cannot move its second output (its L_un never falls under
    # 0.72). A bound of 0.8 x the teacher's L_un (0.4) is out of reach and its multiplier grows without end;
    # 0.8 x the student's own distance from the teacher's prediction binds at the larger root of
    # (1 - r) b^2 + 2 b + 1 + e (1 - r) = 0, e = 1.44, distilling toward b = 0 meanwhile.
    r, e = 0.8, 1.44
    student = (lambda m: torch.stack([m.b, torch.zeros(())]), [-1.0, 1.2], [0.0, 1.2])
    model, solver, figures = run_toy("constrained", lambda m: m.b**2, {"c": student}, {"c": ["b"]},
                                     start={"b": 0.0}, steps=3000, erase_ratio=r, dual_lr=0.02, lr=0.02)
    a = 1 - r
    assert model.b.item() == pytest.approx((-1 + math.sqrt(1 - a * (1 + e * a))) / a, abs=2e-2)
    assert abs(figures[-1]["violation.c"]) < 0.05
    assert max(f["multiplier.c"] for f in figures) < 10


# --- the real loop ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(short_pipeline_dir):
    teacher = load_pipeline(short_pipeline_dir)
    inputs = unet_example_inputs(teacher.unet, batch=1, text_length=teacher.tokenizer.model_max_length)
    pruned = prune_width(teacher.unet, 0.25, inputs)
    overrides = {"finetune.steps": 4, "finetune.batch_size": 4, "finetune.checkpoint_every": 2}
    return teacher, pruned.unet, overrides, pruned.kept_channels


def make_trainer(setup, folder, solver="bilevel-penalty", **settings):
    import copy

    teacher, student, overrides, kept = setup
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml",
                         overrides={**overrides, "finetune.solver": solver, **settings})
    return Trainer(teacher, copy.deepcopy(student), recipe, folder, kept_channels=kept)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_trains_the_real_student(setup, tmp_path, solver):
    before = {k: v.clone() for k, v in setup[1].state_dict().items()}
    result = make_trainer(setup, tmp_path, solver).run(resume=False, checkpoint_every=2)
    assert result.steps == (5 if solver == "two-stage" else 4) and len(result.curves) == result.steps
    changed = [k for k, v in result.student.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(v).all() for v in result.student.state_dict().values())
    assert "denoise" in result.curves[0] and "feature_kd" in result.curves[0]


def test_a_ratio_the_real_student_cannot_meet_is_said_in_the_stage_summary(setup, tmp_path):
    from edgesafe.pipeline import FINETUNE

    result = make_trainer(setup, tmp_path, "constrained", **{"finetune.erase_ratio": 1e-3}).run(
        resume=False, checkpoint_every=100)
    last = result.curves[-1]
    assert all(last[f"violation.{c}"] > 1 for c in ("checkerboard", "star"))
    line = FINETUNE.summary({"steps": 4, "solver": "constrained", "device": "cpu", "final_losses": last})
    assert "erase_ratio not met for checkerboard, star" in line
    met = {**last, "violation.checkerboard": 0.02, "violation.star": -0.3}
    assert "not met" not in FINETUNE.summary({"steps": 4, "solver": "constrained", "device": "cpu",
                                              "final_losses": met})


@pytest.mark.parametrize(("solver", "schedule"), [("bilevel-penalty", "constant"), ("constrained", "cosine")])
def test_interrupt_and_resume_match_an_uninterrupted_run(setup, tmp_path, solver, schedule):
    lr = {"finetune.lr_schedule": schedule}
    whole = make_trainer(setup, tmp_path / "whole", solver, **lr).run(resume=False, checkpoint_every=100)

    def stop_at_two(done, total):
        if done == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match="at step 2"):
        make_trainer(setup, tmp_path / "cut", solver, **lr).run(resume=False, checkpoint_every=100,
                                                                progress=stop_at_two)
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == 2
    resumed = make_trainer(setup, tmp_path / "cut", solver, **lr).run(resume=True, checkpoint_every=100)
    assert resumed.resumed_from == 2
    for k, v in whole.student.state_dict().items():
        assert torch.allclose(v, resumed.student.state_dict()[k], atol=1e-6), k
    assert [c["lower"] for c in resumed.curves] == pytest.approx([c["lower"] for c in whole.curves], abs=1e-6)
    assert resumed.curves[-1] == pytest.approx(whole.curves[-1], abs=1e-5)  # multipliers, lambda, gap too


def test_held_out_losses_read_erasure_on_data_training_never_draws(setup, tmp_path):
    import copy

    teacher, _, overrides, _ = setup
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides={
        **overrides, "finetune.solver": "two-stage", "finetune.erase_steps": 20, "finetune.upper_lr": 1e-2})
    student = copy.deepcopy(teacher.unet).requires_grad_(False)  # the teacher, frozen as the trainer left it
    trainer = Trainer(teacher, student, recipe, tmp_path)
    assert not torch.equal(trainer.batches(0)[0], Batches(recipe, batch_size=4, resolution=trainer.batches.resolution,
                                                          seed=HELD_OUT_SEED)(0)[0])
    before = trainer.held_out_losses(batches=2)
    assert before == trainer.held_out_losses(batches=2)  # the same figures whenever they are read
    names = [c.name for c in recipe.concepts]
    assert set(before) == {"denoise", "output_kd", *(f"concept_kd.{n}" for n in names),
                           *(f"unlearn.{n}.{o}" for n in names for o in ("esd", "ablation"))}
    assert before["output_kd"] == 0 and all(before[f"concept_kd.{n}"] == 0 < before[f"unlearn.{n}.esd"]
                                            for n in names)
    trainer.run(resume=False, checkpoint_every=100)
    after = trainer.held_out_losses(batches=2)
    for c in recipe.concepts:  # erased: nearer its objective's target than the teacher's prediction
        assert after[f"unlearn.{c.name}.{c.objective}"] < after[f"concept_kd.{c.name}"], c.name


def test_two_stage_erase_steps_skip_the_lower_levels_teacher(setup, tmp_path):
    trainer = make_trainer(setup, tmp_path, "two-stage", **{"finetune.erase_steps": 3})
    calls = []
    teacher_outputs = trainer.objective.teacher_outputs
    trainer.objective.teacher_outputs = lambda inputs: calls.append(1) or teacher_outputs(inputs)
    result = trainer.run(resume=False, checkpoint_every=100)
    assert result.steps == 7 and len(calls) == 4  # one per lower step, none for the 3 erase steps


def test_two_stage_erases_against_the_distilled_copy(setup, tmp_path):
    kd = make_trainer(setup, tmp_path / "kd", "kd").run(resume=False, checkpoint_every=100)
    trainer = make_trainer(setup, tmp_path / "two", "two-stage", **{"finetune.erase_against": "distilled"})
    assert trainer.memory_estimate.copies == 4 * sum(p.numel() for p in trainer.student.parameters())
    result = trainer.run(resume=False, checkpoint_every=100)
    distilled = trainer.solver.distilled.state_dict()
    for name, value in kd.student.state_dict().items():  # the copy is the student as distillation left it
        assert torch.equal(distilled[name], value), name
    erased = result.student.state_dict()
    assert any(not torch.equal(erased[n], v) for n, v in distilled.items() if ".attn2." in n)
    assert all(torch.equal(erased[n], v) for n, v in distilled.items() if ".attn2." not in n)  # xattn only


def test_upper_latents_from_the_teachers_concept_images_are_cached_once(setup, tmp_path):
    import copy

    from edgesafe.finetune.upper import CACHE, CONCEPT_IMAGES

    shipped = load_pipeline("zoo:tiny-shapes")  # a teacher that draws the concepts
    settings = {**setup[2], "finetune.solver": "bilevel-alternating", "finetune.upper_latents": "concept-images"}
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides=settings)
    first = Trainer(shipped, copy.deepcopy(setup[1]), recipe, tmp_path, kept_channels=setup[3])
    cache = tmp_path / CACHE
    stamp = cache.stat().st_mtime_ns
    latents, which = first.upper.latents["star"]
    assert latents.shape[0] == CONCEPT_IMAGES and set(which) == set(range(5))
    images = first.task.pipe.vae.decode(latents[:16] / first.task.pipe.vae.config.scaling_factor).sample
    evaluator = load_evaluator("zoo:tiny-shapes-evaluator")
    names, _ = evaluator.classify(images.clamp(-1, 1))
    assert sum(v == "star" for v in names["object"]) >= 12  # the teacher drew the concept
    again = Trainer(shipped, copy.deepcopy(setup[1]), recipe, tmp_path, kept_channels=setup[3])
    assert cache.stat().st_mtime_ns == stamp and torch.equal(again.upper.latents["star"][0], latents)
    lower = again._losses(0, {})
    a = again.upper(again.recipe.concepts[1], 1, 5, 4, lambda: None)
    b = again.upper(again.recipe.concepts[1], 1, 5, 4, lambda: None)
    assert torch.equal(a.sample, b.sample) and all("star" in p for p in a.prompts) and lower.upper


def test_upper_latents_sampled_from_the_model_being_erased(setup, tmp_path):
    trainer = make_trainer(setup, tmp_path, "two-stage", **{"finetune.upper_latents": "model-samples"})
    draws = [trainer.upper(trainer.recipe.concepts[0], 0, step, 4, lambda: None) for step in (3, 3, 4)]
    assert torch.equal(draws[0].sample, draws[1].sample) and not torch.equal(draws[0].sample, draws[2].sample)
    assert draws[0].sample.shape[0] == 4 and len(set(draws[0].timestep.tolist())) == 1


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
    teacher, _, overrides, _ = setup
    other = prune_width(teacher.unet, 0.5, unet_example_inputs(teacher.unet, batch=1, text_length=16))
    path.write_bytes(good)
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides=overrides)
    with pytest.raises(CheckpointError, match="from another model"):
        Trainer(teacher, other.unet, recipe, tmp_path, kept_channels=other.kept_channels).run(resume=True,
                                                                                            checkpoint_every=2)


def test_unlearning_solver_without_concepts():
    with pytest.raises(EdgesafeError, match="finetune.solver bilevel-penalty needs at least one concept"):
        load_recipe(ROOT / "recipes" / "tiny-shapes.yaml",
                    overrides={"concepts": [], "finetune.solver": "bilevel-penalty"})


@pytest.mark.parametrize("launcher", [
    # the same ranks under torchrun: in the slow set (the default run keeps the README's launcher)
    pytest.param(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
                 marks=pytest.mark.slow),
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
    pruned = prune_width(teacher.unet, 0.25, unet_example_inputs(teacher.unet, batch=1, text_length=16))
    base = {"finetune.steps": 2, "finetune.batch_size": 4, "finetune.checkpoint_every": 100,
            "finetune.solver": "bilevel-penalty"}
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides={**base, **overrides})
    return Trainer(teacher, pruned.unet, recipe, folder, kept_channels=pruned.kept_channels)


def test_a_fine_tune_that_cannot_fit_stops_before_any_work(setup, tmp_path):
    import copy

    teacher, student, overrides, kept = setup
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml",
                         overrides={**overrides, "finetune.batch_size": 65_536})
    with pytest.raises(EdgesafeError, match=r"finetune needs about [\d.]+ GiB on cpu \(.*activations.*\) but"):
        Trainer(teacher, copy.deepcopy(student), recipe, tmp_path, kept_channels=kept)
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


def test_learning_rate_warms_up_then_follows_a_cosine_and_resumes_on_schedule():
    from edgesafe.finetune.solvers import lr_factor

    assert [lr_factor(i, 10, "cosine", 2) for i in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert lr_factor(9, 10, "constant", 0) == 1.0
    _, solver, _ = run_toy("kd", fit, {"c": FORGET_B}, {"c": ["b"]}, steps=5, lr_schedule="cosine")
    assert solver.lower_opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(4, 5, "cosine", 0))
    # two-stage: the schedule spans its distillation steps; its erase steps run at upper_lr
    _, two, _ = run_toy("two-stage", fit, {"c": FORGET_B}, {"c": ["b"]}, steps=4, erase_steps=2,
                        lr_schedule="cosine", upper_lr=0.3)
    assert two.upper_opt.param_groups[0]["lr"] == 0.3
