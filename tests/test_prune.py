import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from torch.utils.flop_counter import FlopCounterMode

from edgesafe.errors import BudgetError
from edgesafe.models.architectures import UNET_CONFIGS
from edgesafe.models.inputs import unet_example_inputs
from edgesafe.models.stats import count_macs, count_params, meta_copy
from edgesafe.models.structure import SPEC_NAME, load_unet, read_structure, save_unet
from edgesafe.prune import accumulate_taylor_gradients, prune_to_budget, prune_width
from edgesafe.prune.blocks import bk_sdm_param_count, remove_blocks
from edgesafe.prune.budget import trace_inputs
from edgesafe.prune.width import score_channels
from edgesafe.recipe import Budget
from edgesafe.zoo.tiny_shapes.build import make_unet


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return make_unet().eval()


@pytest.fixture(scope="module")
def inputs(unet):
    return unet_example_inputs(unet, batch=1, text_length=16)


def _taylor(unet, inputs):
    accumulate_taylor_gradients(unet, [lambda u: u(*inputs).sample.pow(2).mean()])


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "random"])
def test_width_pruning_keeps_a_working_unet(unet, inputs, importance):
    if importance == "taylor":
        _taylor(unet, inputs)
    student = prune_width(unet, 0.5, inputs, importance=importance, round_to=8).unet
    unet.zero_grad(set_to_none=True)
    assert 0.2 < count_params(student) / count_params(unet) < 0.3  # width^2
    out = student(*inputs).sample
    assert out.shape == unet(*inputs).sample.shape and torch.isfinite(out).all()
    assert student.conv_out.out_channels == unet.conv_out.out_channels
    for (name, a), (_, b) in zip(unet.named_modules(), student.named_modules(), strict=True):
        if isinstance(a, Attention):
            assert b.heads == a.heads // 2, name  # whole heads removed, head dim kept
            assert b.to_q.out_features // b.heads == a.to_q.out_features // a.heads
            if a.is_cross_attention:
                assert b.to_k.in_features == a.to_k.in_features  # still reads the text encoder
        if isinstance(a, GEGLU):
            assert b.proj.out_features == a.proj.out_features // 2  # both halves lost the same share
        if isinstance(b, torch.nn.Conv2d) and name != "conv_out":
            assert b.out_channels % 8 == 0, name


def test_importances_choose_differently(unet, inputs):
    magnitude = prune_width(unet, 0.5, inputs, importance="magnitude").unet
    random = prune_width(unet, 0.5, inputs, importance="random", seed=1).unet
    assert not torch.equal(magnitude.conv_in.weight, random.conv_in.weight)
    again = prune_width(unet, 0.5, inputs, importance="random", seed=1).unet
    assert torch.equal(random.conv_in.weight, again.conv_in.weight)


def test_taylor_needs_gradients(unet, inputs):
    unet.zero_grad(set_to_none=True)
    with pytest.raises(BudgetError, match="needs gradients"):
        prune_width(unet, 0.5, inputs, importance="taylor")


def test_save_load_round_trip_without_pickle(unet, inputs, tmp_path):
    student = prune_width(unet, 0.5, inputs).unet
    save_unet(student, tmp_path)
    assert (tmp_path / SPEC_NAME).is_file() and not list(tmp_path.glob("*.bin"))
    again = load_unet(tmp_path)
    assert torch.equal(again(*inputs).sample, student(*inputs).sample)


def test_corrupt_structure_is_a_clear_error(unet, inputs, tmp_path):
    from edgesafe.errors import ModelLoadError

    save_unet(prune_width(unet, 0.5, inputs).unet, tmp_path)
    other = tmp_path / "other"
    save_unet(prune_width(unet, 0.25, inputs).unet, other)
    (tmp_path / "diffusion_pytorch_model.safetensors").replace(other / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match="does not match"):
        load_unet(other)


# This UNet's GroupNorms have 4 channels per group at 64 channels, so widths move in quarter steps:
# params reach 0.51 and MACs (attention counted) 0.28 of the teacher on those steps.
@pytest.mark.parametrize(("metric", "ratio", "measure"), [
    ("params", 0.5, count_params),
    ("macs", 0.29, lambda u: float(count_macs(u, batch=2, text_length=16))),
])
def test_budget_search_hits_the_target(unet, inputs, metric, ratio, measure):
    seen = []

    def recording(u):
        seen.append(next(u.parameters()).device.type)
        return measure(u)

    own = copy.deepcopy(unet)
    result = prune_to_budget(own, Budget(metric=metric, ratio=ratio), recording)
    assert abs(result.relative_error) <= 0.05
    assert measure(result.unet) == pytest.approx(result.value)
    assert seen[0] == "cpu" and set(seen[1:]) == {"meta"}  # the teacher, then weightless trials only
    assert result.unet is own  # the chosen ratio is applied in place: no second copy of the UNet
    direct = prune_width(unet, result.ratio, inputs)  # the same channels as pruning the real UNet directly
    assert all(torch.equal(a, b) for a, b in zip(direct.unet.parameters(), result.unet.parameters(), strict=True))
    assert result.kept_channels == direct.kept_channels


def test_unreachable_budget_names_the_smallest(unet, inputs):
    with pytest.raises(BudgetError, match=r"unreachable: the smallest reachable is .* of the teacher"):
        prune_to_budget(copy.deepcopy(unet), Budget(metric="params", ratio=0.01), count_params)


def test_pruning_traced_small_or_on_meta_matches_full_size(unet, inputs):
    scores = score_channels(unet, trace_inputs(unet))
    full = prune_width(unet, 0.4, inputs, round_to=8).unet
    small = prune_width(unet, 0.4, trace_inputs(unet), scores=scores, round_to=8).unet
    shape = prune_width(meta_copy(unet), 0.4, trace_inputs(meta_copy(unet)), scores=scores, round_to=8).unet
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), small.parameters(), strict=True))
    assert [p.shape for p in shape.parameters()] == [p.shape for p in full.parameters()]
    assert all(p.is_meta for p in shape.parameters())


def test_macs_count_attention_whatever_the_device(unet):
    # on the CPU fused attention has no FLOP formula; counting on a meta copy includes it
    real = count_macs(unet, batch=2, text_length=16)
    assert real == count_macs(meta_copy(unet), batch=2, text_length=16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*unet_example_inputs(unet, batch=2, text_length=16))
    assert real > counter.get_total_flops() // 2


def test_taylor_gradients_accumulate_in_place(unet, inputs):
    seen = []
    accumulate_taylor_gradients(unet, [lambda u: u(*inputs).sample.pow(2).mean()] * 3,
                                progress=lambda done, total: seen.append((done, total)))
    thrice = [p.grad.clone() for p in unet.parameters()]
    accumulate_taylor_gradients(unet, [lambda u: u(*inputs).sample.pow(2).mean()])
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert all(torch.allclose(a, 3 * p.grad, rtol=1e-4, atol=1e-7)
               for a, p in zip(thrice, unet.parameters(), strict=True))
    unet.zero_grad(set_to_none=True)


def test_bk_sdm_sizes_on_the_sd15_architecture():
    published = {"base": 0.58e9, "small": 0.49e9, "tiny": 0.33e9}
    for variant, size in published.items():
        assert abs(bk_sdm_param_count(UNET_CONFIGS["sd-1.5"], variant) / size - 1) <= 0.021, variant


@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
def test_block_removal_loads_with_plain_from_pretrained(unet, inputs, variant, tmp_path):
    student = remove_blocks(unet, variant)
    assert count_params(student) < count_params(unet) or variant == "base"  # base is a no-op at 1 layer/stage
    student.save_pretrained(tmp_path, safe_serialization=True)
    plain = UNet2DConditionModel.from_pretrained(tmp_path)
    assert torch.allclose(plain(*inputs).sample, student(*inputs).sample, atol=1e-5)
    if variant != "tiny":  # every kept block carries the teacher's weights
        assert torch.equal(student.conv_in.weight, unet.conv_in.weight)


def test_kept_channels_name_the_teacher_channels_each_block_output_kept(unet, inputs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from edgesafe.models.architectures import block_output_layers
    from edgesafe.models.loading import resolve_source
    from edgesafe.models.saving import save_student

    pruned = prune_width(unet, 0.5, inputs)
    student, kept = pruned.unet, pruned.kept_channels
    assert set(kept) == set(block_output_layers(unet))
    for point, layer in block_output_layers(unet).items():
        teacher_bias, student_bias = unet.get_submodule(layer).bias, student.get_submodule(layer).bias
        assert torch.equal(teacher_bias[kept[point]], student_bias), point
    again = prune_width(student, 0.5, inputs, kept_channels=kept)  # pruning a pruned UNet composes
    for point, layer in block_output_layers(unet).items():
        assert torch.equal(unet.get_submodule(layer).bias[again.kept_channels[point]],
                           again.unet.get_submodule(layer).bias), point
    save_unet(student, tmp_path / "unet", kept_channels=kept)
    assert read_structure(tmp_path / "unet")["kept_channels"] == kept
    assert read_structure(tmp_path)["kept_channels"] == {}  # a plain UNet folder: nothing pruned
    # a student folder loaded and saved again by plain diffusers keeps them
    save_student(student, resolve_source("zoo:tiny-shapes"), tmp_path / "student", kept_channels=kept)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "student", safety_checker=None, local_files_only=True)
    pipe.save_pretrained(tmp_path / "again")
    assert read_structure(tmp_path / "again" / "unet")["kept_channels"] == kept
