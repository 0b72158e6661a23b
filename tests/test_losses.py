"""Each fine-tuning loss against a value computed by hand on small tensors."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from edgesafe.finetune.losses import DenoisingTask, FeatureAligner, LowerObjective
from edgesafe.finetune.unlearn import anchor_prompts, parameter_subset, unlearning_loss, unlearning_target
from edgesafe.models.inputs import unet_example_inputs
from edgesafe.prune import prune_width
from edgesafe.recipe import Concept, LowerLevel
from edgesafe.zoo.tiny_shapes.build import SCHEDULER_CONFIG, make_unet


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return make_unet().eval()


def task_for(prediction_type="epsilon"):
    scheduler = DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return DenoisingTask(SimpleNamespace(scheduler=scheduler))


def test_min_snr_weights_by_hand():
    task = task_for()
    t = torch.tensor([10, 500, 990])
    a = task.scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(task.snr_weights(t, 5.0), expected)
    assert task.snr_weights(t, 5.0)[0] < 1 and task.snr_weights(t, 5.0)[2] == 1  # low noise is down-weighted
    assert torch.equal(task.snr_weights(t, None), torch.ones(3))
    v = task_for("v_prediction").snr_weights(t, 5.0)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_lower_objective_of_the_teacher_itself(teacher):
    x, t, states = unet_example_inputs(teacher, batch=2, text_length=16)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    inputs = {"sample": x, "timestep": t, "encoder_hidden_states": states, "target": target}
    aligner = FeatureAligner(teacher, teacher, "kept")
    objective = LowerObjective(teacher, task_for(), LowerLevel(output_kd=2.0, feature_kd=3.0), aligner)
    terms = objective(teacher, inputs, objective.teacher_outputs(inputs))
    pred = teacher(x, t, states).sample
    assert terms["output_kd"].item() == 0 and terms["feature_kd"].item() == 0
    assert terms["denoise"].item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)
    assert terms["total"].item() == pytest.approx(terms["denoise"].item(), rel=1e-6)


def test_kept_alignment_compares_the_kept_teacher_channels(teacher):
    inputs = unet_example_inputs(teacher, batch=1, text_length=16)
    pruned = prune_width(teacher, 0.5, inputs)
    aligner = FeatureAligner(pruned.unet, teacher, "kept", pruned.kept_channels)
    kept = pruned.kept_channels
    gen = torch.Generator().manual_seed(0)
    t_feats = {p: torch.randn(1, teacher.get_submodule(p).resnets[-1].conv2.out_channels, 2, 2, generator=gen)
               for p in aligner.points}
    same = {p: t_feats[p][:, kept[p]] for p in aligner.points}
    assert aligner(same, t_feats).item() == 0
    shifted = {p: f + 1 for p, f in same.items()}
    assert aligner(shifted, t_feats).item() == pytest.approx(1.0)


def test_projection_alignment_is_learnable(teacher):
    inputs = unet_example_inputs(teacher, batch=1, text_length=16)
    student = prune_width(teacher, 0.5, inputs).unet
    aligner = FeatureAligner(student, teacher, "projection")
    assert sum(p.numel() for p in aligner.parameters()) > 0
    with pytest.raises(ValueError, match="unknown feature alignment"):
        FeatureAligner(student, teacher, "telepathy")


class ToyTeacher(torch.nn.Module):
    """Predicts the mean of its text states everywhere: eps(x, t, c) = mean(c)."""

    def forward(self, x, t, states):
        return SimpleNamespace(sample=states.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x))


def encode(prompts):
    """'' -> 0, a prompt naming 'star' -> 2, anything else -> 1."""
    values = [0.0 if not p else 2.0 if "star" in p else 1.0 for p in prompts]
    return torch.tensor(values).view(-1, 1, 1).expand(-1, 3, 4)


def test_esd_target_by_hand():
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([1, 2])
    concept = Concept(name="star", target="star", prompts=["a red star"], eta=1.5)
    # student predicts 2 for the concept prompt; target = 0 - 1.5 * (2 - 0) = -3; loss = (2 + 3)^2
    prompts = ["a red star"] * 2
    target = unlearning_target(ToyTeacher(), x, t, concept, prompts, encode)
    assert unlearning_loss(ToyTeacher(), target, x, t, prompts, encode).item() == pytest.approx(25.0)


def test_ablation_target_by_hand():
    concept = Concept(name="star", target="star", objective="ablation", anchor="circle", prompts=["a red star"])
    assert anchor_prompts(concept, ["a red STAR on a plain background"]) == ["a red circle on a plain background"]
    x, t = torch.zeros(1, 1, 2, 2), torch.tensor([1])
    # student says 2 for the star prompt; the teacher says 1 for the anchor prompt
    target = unlearning_target(ToyTeacher(), x, t, concept, ["a red star"], encode)
    assert unlearning_loss(ToyTeacher(), target, x, t, ["a red star"], encode).item() == pytest.approx(1.0)


def test_parameter_subsets_partition_the_unet(teacher):
    full = set(parameter_subset(teacher, "full"))
    xattn = set(parameter_subset(teacher, "xattn"))
    rest = set(parameter_subset(teacher, "noxattn"))
    assert xattn and rest and not xattn & rest and xattn | rest == full
