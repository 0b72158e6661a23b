"""ONNX / Core ML export of the committed tiny-shapes teacher and a pruned student: real exporters,
real onnxruntime sessions, optimum's pipeline, real quantizers."""

import copy
import gc
import json
import os
import shutil
import signal

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgesafe.errors import EdgesafeError, ModelLoadError
from edgesafe.export import (
    COREML_QUANTIZERS,
    ONNX_QUANTIZERS,
    OnnxPipeline,
    ParityError,
    export_coreml,
    export_onnx,
    onnx_parity,
    quantize_coreml,
    quantize_folder,
    validate_coreml,
)
from edgesafe.export.onnx import export_component, latent_shape
from edgesafe.export.parity import check_parity, component_parity, generate_pair, psnr_db
from edgesafe.export.quantize import QuantizeInputs, int8_scheme, unet_calibration, weight_only_int8
from edgesafe.export.runtime import session
from edgesafe.models.inputs import seeded_normal, unet_example_inputs
from edgesafe.models.loading import load_pipeline
from edgesafe.prune import prune_width
from edgesafe.recipe import Tolerance, load_recipe

PROMPTS = ["a red star on a checkerboard background", "a blue circle with stripes"]


def test_parity_prompts_come_from_the_recipe(tmp_path):
    from edgesafe.export import parity_prompts
    from edgesafe.models.standin import write_captioned_images

    shapes = load_recipe("recipes/tiny-shapes.yaml")
    assert parity_prompts(shapes)[0] == shapes.concepts[0].prompts[0]
    assert not any(w in parity_prompts(shapes)[1] for w in ("star", "checker"))  # a caption of concept-free data
    write_captioned_images(tmp_path / "images", count=4, size=32, seed=0)
    captions = {p.read_text().strip() for p in (tmp_path / "images").glob("*.txt")}
    real = load_recipe("recipes/iphone15.yaml", overrides={"concepts": [], "finetune.solver": "kd",
                                                          "data.path": str(tmp_path / "images")})
    assert len(parity_prompts(real)) == 2 and set(parity_prompts(real)) <= captions


def test_the_mixed_searches_take_their_prompts_sampling_and_target_from_the_recipe():
    from edgesafe.export import TARGETS, parity_prompts

    asked = load_recipe("recipes/tiny-shapes.yaml", overrides={
        "export.targets": ["onnx", "coreml"], "export.quantize": ["coreml-mixed"], "export.mixed_psnr_db": 33,
        "sampling.steps": 7, "sampling.guidance_scale": 3.5})
    inputs = TARGETS["coreml"].prepare("the pipeline", asked)
    assert (inputs.pipe, inputs.prompts, inputs.steps, inputs.guidance, inputs.psnr_db) == (
        "the pipeline", parity_prompts(asked), 7, 3.5, 33)
    not_asked = load_recipe("recipes/tiny-shapes.yaml", overrides={
        "export.targets": ["coreml"], "export.quantize": ["coreml-palettize6"]})
    assert TARGETS["coreml"].prepare("the pipeline", not_asked) is None  # nothing to prepare for it


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("zoo:tiny-shapes")


@pytest.fixture(scope="module")
def onnx_dir(pipe, tmp_path_factory):
    return export_onnx(pipe, tmp_path_factory.mktemp("export") / "onnx")


@pytest.fixture(scope="module")
def calibration(pipe):
    prompts = ["a red circle on a plain background", "a blue square with stripes"]
    # a mixed-precision target the all-INT8 UNet meets: the search itself is tested on a fragile UNet below
    return QuantizeInputs(unet_calibration(pipe, prompts, steps=4), prompts, 6, 5.0, 20.0)


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_layout_is_optimums_and_its_pipeline_generates_the_same_image(pipe, onnx_dir):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert (onnx_dir / name / "model.onnx").is_file() and (onnx_dir / name / "config.json").is_file()
    assert json.loads((onnx_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    ort_pipe = ORTStableDiffusionPipeline.from_pretrained(onnx_dir, local_files_only=True)
    latents = torch.randn(latent_shape(pipe, 1), generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=6, guidance_scale=5.0, output_type="np")
    got = ort_pipe("a green triangle with dots", latents=latents.clone(), **kwargs).images
    ref = pipe("a green triangle with dots", latents=latents.clone(), **kwargs).images
    assert got.shape == (1, 32, 32, 3) and got.std() > 0.05
    assert psnr_db(ref, got) > 60


def test_bare_sessions_match_pytorch_at_any_batch(pipe, onnx_dir):
    runner = OnnxPipeline(onnx_dir)
    errors = component_parity(pipe, runner, PROMPTS)
    assert set(errors) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert all(e["max_abs"] < 1e-3 for e in errors.values()), errors
    sample = np.random.default_rng(0).standard_normal(latent_shape(pipe, 3)).astype(np.float32)
    hidden = runner.encode_prompt(["a", "b", "c"])
    out = runner.run("unet", sample=sample, timestep=np.array(10.0), encoder_hidden_states=hidden)[0]
    ref = pipe.unet(torch.from_numpy(sample), 10, torch.from_numpy(hidden)).sample.detach().numpy()
    assert out.shape == latent_shape(pipe, 3) and np.abs(out - ref).max() < 1e-3
    ref_images, images = generate_pair(pipe, runner, PROMPTS, steps=5)
    assert psnr_db(ref_images, images) > 60


def test_a_pruned_unet_exports_and_matches(pipe, tmp_path):
    student = load_pipeline("zoo:tiny-shapes")
    student.unet = prune_width(student.unet, 0.5, unet_example_inputs(student.unet, batch=2, text_length=8)).unet
    path = export_component(student, "unet", tmp_path / "unet")
    sample, hidden = torch.randn(latent_shape(pipe, 2)), torch.randn(2, pipe.tokenizer.model_max_length, 64)
    got = session(path).run(None, {"sample": sample.numpy(), "timestep": np.array(700.0, np.float32),
                                   "encoder_hidden_states": hidden.numpy()})[0]
    ref = student.unet(sample, 700, hidden).sample.detach().numpy()
    assert np.abs(got - ref).max() < 1e-3
    assert path.stat().st_size < 0.6 * sum(p.numel() for p in pipe.unet.parameters()) * 4


def test_external_data_format_loads(pipe, tmp_path):
    path = export_component(pipe, "vae_decoder", tmp_path / "vae_decoder", external_over=0)
    assert (tmp_path / "vae_decoder" / "model.onnx_data").stat().st_size > path.stat().st_size
    latents = torch.randn(latent_shape(pipe, 1))
    got = session(path).run(None, {"latent_sample": latents.numpy()})[0]
    assert np.abs(got - pipe.vae.decode(latents).sample.detach().numpy()).max() < 1e-3


# int8-nncf (~35 s; no shipped recipe asks for it since jetson moved to int8-tensorrt) runs with -m slow
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "int8-nncf" else m
                                    for m in sorted(ONNX_QUANTIZERS)])
def test_each_onnx_variant_keeps_the_image(pipe, onnx_dir, calibration, method, tmp_path):
    src = onnx_dir
    if method == "int8-nncf":  # NNCF reads an external-data UNet (as at SD size, past 2 GB) from its folder
        src = tmp_path / "fp32"
        shutil.copytree(onnx_dir, src)
        shutil.rmtree(src / "unet")
        export_component(pipe, "unet", src / "unet", external_over=0)
        assert (src / "unet" / "model.onnx_data").is_file()
    out = quantize_folder(src, tmp_path / method, method, calibration)
    figures = onnx_parity(pipe, out, PROMPTS, steps=6)
    if method == "fp32-optimized":  # fused, still fp32
        assert {"MultiHeadAttention", "SkipLayerNormalization"} <= _ops(out / "unet" / "model.onnx")
        assert "SkipLayerNormalization" in _ops(out / "text_encoder" / "model.onnx")
        assert figures["components"]["unet"]["max_abs"] < 1e-4 and figures["image_psnr_db"] > 60
        return
    fp32_bytes = (onnx_dir / "unet" / "model.onnx").stat().st_size
    assert (out / "unet" / "model.onnx").stat().st_size < 0.5 * fp32_bytes
    ops = _ops(out / "unet" / "model.onnx")
    assert ops & {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear"}
    if method in ("int8-ort-static", "int8-mixed", "int8-hybrid"):  # the CPU's scheme: INT8 kernels, not QDQ
        assert {"QLinearConv", "QLinearMatMul"} <= ops
    if method == "int8-tensorrt":  # TensorRT's explicit quantization: QDQ pairs, int8 with every zero point 0
        zeros = [numpy_helper.to_array(i) for i in onnx.load(str(out / "unet" / "model.onnx")).graph.initializer
                 if i.name.endswith("_zero_point")]
        assert "QuantizeLinear" in ops and not ops & {"QLinearConv", "QLinearMatMul"}
        assert len(zeros) > 50 and all(z.dtype == np.int8 and not z.any() for z in zeros)
    if method == "int8-hybrid":
        assert "DequantizeLinear" in _ops(out / "text_encoder" / "model.onnx")
        assert (out / "vae_decoder" / "model.onnx").stat().st_size < 0.5 * (
            onnx_dir / "vae_decoder" / "model.onnx").stat().st_size
    assert 12 < figures["image_psnr_db"] < 100  # changed, yet still the same picture


def test_static_int8_keeps_the_first_and_last_convolutions_time_embedding_and_attention_scores_in_fp32(
        onnx_dir, calibration, tmp_path):
    model = onnx.load(str(quantize_folder(onnx_dir, tmp_path / "s", "int8-ort-static", calibration)
                          / "unet" / "model.onnx"))
    by_name = {n.name: n.op_type for n in model.graph.node}
    assert by_name["/unet/conv_in/Conv"] == by_name["/unet/conv_out/Conv"] == "Conv"
    assert by_name["/unet/time_embedding/linear_1/Gemm"] == "Gemm"
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]  # scores and values: no constant operand
    constants = {t.name for t in model.graph.initializer}
    assert matmuls and not any(n.input[1] in constants for n in matmuls)
    assert "Softmax" in by_name.values() and not any(op.startswith("QLinearSoftmax") for op in by_name.values())


def test_the_int8_scheme_follows_the_cpu():
    assert int8_scheme("x86_64", {"avx2", "avx512f", "avx512_vnni"}).reduce_range is False
    no_vnni = int8_scheme("x86_64", {"avx2", "avx512f"})
    assert no_vnni.reduce_range is True and "without VNNI" in no_vnni.reason
    assert int8_scheme("aarch64", {"asimd", "asimddp"}).reduce_range is False
    assert int8_scheme().quant_format == "QOperator"


def test_static_int8_calibrates_only_the_layers_it_quantizes_and_gets_onnxruntimes_scales(
        onnx_dir, calibration, tmp_path):
    """onnxruntime calibrates every tensor of every Conv / MatMul / Gemm (at SD's 512 px, the attention scores
    take that past 24 GiB); int8-ort-static calibrates only the layers it quantizes, and its scales must be
    those of onnxruntime's own calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    from edgesafe.export.quantize import OPS, _Reader, always_fp32, prepared, quantize_static_unet

    src = prepared(onnx_dir / "unet" / "model.onnx", tmp_path)
    ours = quantize_static_unet(src, tmp_path / "ours.onnx", calibration.calibration, ranges=tmp_path / "r.json")
    whole = tmp_path / "whole.onnx"
    scheme = int8_scheme()
    quantize_static(str(src), str(whole), _Reader(calibration.calibration), quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=OPS, per_channel=True, reduce_range=scheme.reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=always_fp32(onnx.load(str(src))), calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "MatMulConstBOnly": True})

    def scales(path):
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
                if i.name.endswith(("_scale", "_zero_point"))}

    a, b = scales(ours), scales(whole)
    assert len(a) > 100 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    model = onnx.load(str(src))
    constants = {t.name for t in model.graph.initializer}
    scores = [n.output[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in constants]
    calibrated = set(load_tensors_data(tmp_path / "r.json").data)
    assert scores and not calibrated & set(scores)


def test_static_int8_keeps_the_last_up_blocks_shortcut_convolutions_in_fp32(onnx_dir):
    from edgesafe.export.quantize import always_fp32, quantizable_layers

    model = onnx.load(str(onnx_dir / "unet" / "model.onnx"), load_external_data=False)
    shortcuts = [n.name for n in model.graph.node if n.op_type == "Conv" and "conv_shortcut" in n.name]
    last = [s for s in shortcuts if "/up_blocks.3/" in s]
    assert len(last) == 2 and set(last) <= set(always_fp32(model))
    assert set(shortcuts) - set(last) <= set(quantizable_layers(model))  # the other shortcuts stay INT8


def _fragile_pipeline():
    """The tiny-shapes text encoder and VAE with a small UNet in which one layer cannot take INT8: the input of
    the first block's feed-forward projection has one channel 1000x the rest (its LayerNorm scaled up, the
    projection's weights scaled down: the same function in fp32), so quantizing that activation to 8 bits
    zeroes every other channel; the block's output is amplified so that the loss shows in the image."""
    from diffusers import UNet2DConditionModel

    pipe = load_pipeline("zoo:tiny-shapes")
    c = pipe.unet.config
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=c.cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8).eval()
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    with torch.no_grad():
        block.norm3.weight[3] *= 1000
        block.norm3.bias[3] *= 1000
        block.ff.net[0].proj.weight[:, 3] /= 1000
        block.ff.net[2].weight *= 20
    return pipe


def test_the_mixed_search_keeps_the_fragile_layer_in_fp32_and_no_more_than_it_needs(tmp_path):
    from edgesafe.export.sensitivity import ANALYSIS

    pipe = _fragile_pipeline()
    fp32 = export_onnx(pipe, tmp_path / "fp32")
    prompts = ["a red circle on a plain background", "a blue square with stripes"]
    inputs = QuantizeInputs(unet_calibration(pipe, prompts, steps=4), prompts, 4, 5.0, 25.0)
    out = quantize_folder(fp32, tmp_path / "mixed", "int8-mixed", inputs)
    analysis = json.loads((out / "unet" / ANALYSIS).read_text())
    fragile = "/unet/down_blocks.0/attentions.0/transformer_blocks.0/ff/net.0/proj/MatMul"
    assert analysis["layers"][0]["name"] == fragile  # ranked most sensitive
    assert analysis["all_int8_psnr_db"] < 25 <= analysis["psnr_db"]
    keep = len(analysis["kept_fp32"])
    assert analysis["kept_fp32"][0] == fragile and analysis["searched"][str(keep - 1)] < 25  # one fewer misses
    nodes = {n.name: n.op_type for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node}
    assert nodes[fragile] == "MatMul" and "QLinearMatMul" in nodes.values()
    runner = OnnxPipeline(out)
    latents = torch.randn(latent_shape(pipe, 2), generator=torch.Generator().manual_seed(0)).numpy()
    reference = OnnxPipeline(fp32)(prompts, latents=latents, num_inference_steps=4)
    assert psnr_db(reference, runner(prompts, latents=latents, num_inference_steps=4)) >= 25
    # made again over its folder with a new target: the ranking is reused, only the search runs
    again = json.loads((quantize_folder(fp32, out, "int8-mixed", QuantizeInputs(
        inputs.calibration, prompts, 4, 5.0, 30.0)) / "unet" / ANALYSIS).read_text())
    assert again["reused_ranking"] and again["layers"] == analysis["layers"]
    assert again["evaluations"] < 10 and len(again["kept_fp32"]) >= keep and again["psnr_db"] >= 30
    with pytest.raises(EdgesafeError, match=r"int8-mixed: no mix reaches 150 dB against fp32; with only the least "
                                            r"sensitive layer \(.+\) in INT8 the images are at [\d.]+ dB"):
        quantize_folder(fp32, out, "int8-mixed", QuantizeInputs(inputs.calibration, prompts, 4, 5.0, 150.0))
    assert json.loads((out / "unet" / ANALYSIS).read_text())["target_psnr_db"] == 30  # the last good one stays


def test_weight_only_int8_dequantizes_to_the_weights():
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 5, 5])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y],
                                   [numpy_helper.from_array(w, "w")])
    opset = [onnx.helper.make_opsetid("", 17)]
    model = weight_only_int8(onnx.helper.make_model(graph, opset_imports=opset, ir_version=9))
    import onnxruntime as ort

    feed = np.random.default_rng(1).standard_normal((1, 8, 5, 5)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": feed})[0]
    ref = torch.nn.functional.conv2d(torch.from_numpy(feed), torch.from_numpy(w)).numpy()
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.INT8, onnx.TensorProto.FLOAT}
    assert 0 < np.abs(got - ref).max() < 0.02 * np.abs(ref).max()


def test_a_broken_artefact_fails_parity_with_its_figures(pipe, onnx_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    path = broken / "unet" / "model.onnx"
    model = onnx.load(str(path))
    for t in model.graph.initializer:  # a botched conversion: every weight matrix 50% too large
        if np.prod(t.dims) > 1000:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    onnx.save(model, str(path))
    figures = onnx_parity(pipe, broken, PROMPTS, steps=6)
    with pytest.raises(ParityError, match=r"onnx/broken: parity failed: image PSNR [\d.]+ dB < 40 dB; "
                                          r"unet max-abs error [\d.e+-]+ > 0.001"):
        check_parity("onnx/broken", figures, Tolerance(max_abs=1e-3, psnr_db=40))
    check_parity("onnx/fp32", onnx_parity(pipe, onnx_dir, PROMPTS, steps=6), Tolerance(max_abs=1e-3, psnr_db=40))


def test_an_unreadable_onnx_folder_is_one_clear_error(onnx_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(onnx_dir, bad)
    (bad / "unet" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load it"):
        OnnxPipeline(bad)
    (bad / "unet" / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="not an exported ONNX pipeline"):
        OnnxPipeline(bad)


@pytest.fixture(scope="module")
def coreml_dir(pipe, tmp_path_factory):
    return export_coreml(pipe, tmp_path_factory.mktemp("coreml") / "fp16")


@pytest.fixture(scope="module")
def palettized4(coreml_dir):
    return quantize_coreml(coreml_dir, coreml_dir.parent / "coreml-palettize4", "coreml-palettize4")


def test_coreml_packages_have_the_swift_pipelines_interface(pipe, coreml_dir):
    report = validate_coreml(pipe, coreml_dir)
    unet = report["packages"]["Unet"]
    assert unet["inputs"] == {"sample": list(latent_shape(pipe, 2)), "timestep": [2],
                              "encoder_hidden_states": [2, 64, 1, pipe.tokenizer.model_max_length]}
    assert list(unet["outputs"]) == ["noise_pred"] and unet["spec_version"] >= 8
    assert report["packages"]["TextEncoder"]["outputs"].keys() == {"last_hidden_state", "pooled_outputs"}
    assert list(report["packages"]["VAEDecoder"]["inputs"]) == ["z"]
    assert report["predicted"] is False and "macOS" in report["prediction_note"]
    assert json.loads((coreml_dir / "vocab.json").read_text()) == pipe.tokenizer.get_vocab()


@pytest.mark.parametrize("method,op", [("coreml-linear8", "constexpr_affine_dequantize"),
                                       ("coreml-palettize4", "constexpr_lut_to_dense")])
def test_coreml_quantizers_compress_the_unet(pipe, coreml_dir, tmp_path, method, op, request):
    assert method in COREML_QUANTIZERS
    out = request.getfixturevalue("palettized4") if method == "coreml-palettize4" else quantize_coreml(
        coreml_dir, tmp_path / method, method)
    report = validate_coreml(pipe, out)
    base = validate_coreml(pipe, coreml_dir)["packages"]["Unet"]
    assert report["packages"]["Unet"]["ops"].get(op, 0) > 10
    assert report["packages"]["Unet"]["bytes"] < (0.75 if method.endswith("4") else 0.95) * base["bytes"]


def test_a_coreml_folder_without_the_tokenizer_files_is_rejected(pipe, coreml_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(coreml_dir, bad)
    (bad / "merges.txt").unlink()
    with pytest.raises(EdgesafeError, match="missing merges.txt"):
        validate_coreml(pipe, bad)


@pytest.mark.parametrize("method,op", [("linear8", "constexpr_affine_dequantize"),
                                       ("palettize6", "constexpr_lut_to_dense")])
def test_coreml_quantizers_leave_a_77_token_causal_mask_alone(pipe, tmp_path, method, op):
    """At SD's 77 tokens CLIP's causal mask (-inf above the diagonal) is big enough to count as a weight."""
    import copy

    from transformers import CLIPTextConfig, CLIPTextModel

    from edgesafe.export.coreml import _convert, _specs, describe_package, linear8, palettize

    sd_length = copy.copy(pipe)
    sd_length.tokenizer = copy.deepcopy(pipe.tokenizer)
    sd_length.tokenizer.model_max_length = 77
    torch.manual_seed(0)
    sd_length.text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(pipe.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=64)).eval()
    factory, inputs, outputs = _specs(sd_length)["TextEncoder"]
    compress = linear8 if method == "linear8" else palettize(6)
    compress(_convert(factory(), inputs, outputs)).save(str(tmp_path / "TextEncoder.mlpackage"))
    assert describe_package(tmp_path / "TextEncoder.mlpackage")["ops"].get(op, 0) >= 4  # q, k, v, out, fc1, fc2

    # the bench reads the compressed weights back; at 77 positions the converter folds the position
    # embedding lookup into a constant of its own name, matched to its parameter by value
    from edgesafe.export.coreml import load_package_weights

    encoder = copy.deepcopy(sd_length.text_encoder)
    coverage = load_package_weights(encoder, tmp_path / "TextEncoder.mlpackage", "text_encoder")
    positions = encoder.text_model.embeddings.position_embedding.weight
    original = sd_length.text_encoder.text_model.embeddings.position_embedding.weight
    assert coverage > 0.99 and not torch.equal(positions, original)
    assert (positions - original).norm() / original.norm() < 0.1


def test_coreml_weights_decompress_into_the_pytorch_pipeline(palettized4):
    """What the bench measures for Core ML on Linux: the package's own (palettized, fp16) weights in PyTorch."""
    from edgesafe.export.coreml import load_coreml_weights

    out = palettized4
    fp32 = load_pipeline("zoo:tiny-shapes")
    student = load_pipeline("zoo:tiny-shapes")
    coverage = load_coreml_weights(student, out)
    assert set(coverage) == {"TextEncoder", "Unet", "VAEDecoder"} and min(coverage.values()) > 0.99
    conv = student.unet.down_blocks[0].resnets[0].conv1.weight
    assert conv.unique().numel() <= 16  # a 4-bit palette
    assert not torch.equal(conv, fp32.unet.down_blocks[0].resnets[0].conv1.weight)
    vae = student.vae.decoder.conv_in.weight  # the VAE stays fp16: rounded, not palettized
    assert torch.equal(vae, vae.half().float()) and vae.unique().numel() > 16
    latents = torch.randn(latent_shape(fp32, 1), generator=torch.Generator().manual_seed(0))
    ref, got = (p("a red circle", latents=latents.clone(), num_inference_steps=8, output_type="np").images
                for p in (fp32, student))
    assert 15 < psnr_db(ref, got) < 60


def test_coreml_weights_of_another_model_are_refused(palettized4):
    from edgesafe.export.coreml import load_coreml_weights

    pipe = load_pipeline("zoo:tiny-shapes")
    pipe.unet = prune_width(pipe.unet, 0.5, example_inputs=unet_example_inputs(pipe.unet, batch=1, text_length=16)).unet
    with pytest.raises(EdgesafeError, match="matches no parameter of the unet"):
        load_coreml_weights(pipe, palettized4)


@pytest.mark.slow  # ~2 min: coremltools k-means at 4, 6 and 8 bits for every weight; int8-mixed keeps its search in CI
def test_the_mixed_palettization_widens_the_fragile_weight_and_no_more_than_it_needs(tmp_path):
    """The fragile UNet's feed-forward projection has a column of weights 1000x smaller than the rest (its input
    channel 1000x larger): one 16-entry palette cannot hold both scales, and the loss shows in the image."""
    from edgesafe.export.coreml import describe_package, load_coreml_weights
    from edgesafe.export.palettization import ANALYSIS, MixedBitInputs

    pipe = _fragile_pipeline()
    fp16 = export_coreml(pipe, tmp_path / "fp16")
    prompts = ["a red circle on a plain background", "a blue square with stripes"]
    out = quantize_coreml(fp16, tmp_path / "mixed", "coreml-mixed", MixedBitInputs(pipe, prompts, 4, 5.0, 25.0))
    analysis = json.loads((out / ANALYSIS).read_text())
    fragile = "Unet:down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
    weights = {w["name"]: w for w in analysis["weights"]}
    assert min(weights, key=lambda k: weights[k]["psnr_db_alone"]["4"]) == fragile  # measured most sensitive
    assert analysis["all_4bit_psnr_db"] < 25 <= analysis["psnr_db"]
    assert weights[fragile]["bits"] > 4 and analysis["searched"][str(analysis["widenings"] - 1)] < 25
    assert analysis["weights_at_bits"]["4"] >= len(weights) - 2 and analysis["bytes"] < 0.3 * analysis["fp16_bytes"]
    ops = describe_package(out / "Unet.mlpackage")["ops"]
    assert ops.get("constexpr_lut_to_dense", 0) > 20

    device, reference = (load_pipeline("zoo:tiny-shapes") for _ in range(2))  # what the device computes with
    for p, folder in ((device, out), (reference, fp16)):
        p.unet = copy.deepcopy(pipe.unet)
        load_coreml_weights(p, folder)
    wide = dict(device.unet.named_parameters())[fragile.split(":")[1]]
    assert 16 < wide.unique().numel() <= 2 ** weights[fragile]["bits"]
    assert device.unet.down_blocks[0].resnets[0].conv1.weight.unique().numel() <= 16
    latents = seeded_normal(latent_shape(pipe, 2), 0)  # the search's latents: the target holds where measured
    got, ref = (p(prompts, latents=latents.clone(), num_inference_steps=4, guidance_scale=5.0, output_type="np").images
                for p in (device, reference))
    assert psnr_db(ref, got) == pytest.approx(analysis["psnr_db"], abs=1e-3)

    # made again over its folder with a new target: the per-weight figures are reused, only the search runs
    again = json.loads((quantize_coreml(fp16, out, "coreml-mixed", MixedBitInputs(pipe, prompts, 4, 5.0, 32.0))
                        / ANALYSIS).read_text())
    assert again["reused_ranking"] and again["weights"][0]["psnr_db_alone"] == analysis["weights"][0]["psnr_db_alone"]
    assert again["evaluations"] < 12 and again["psnr_db"] >= 32 and again["mean_bits"] > analysis["mean_bits"]
    with pytest.raises(EdgesafeError, match=r"coreml-mixed: no palettized mix reaches 150 dB against fp16; with "
                                            r"only \S+ at \d+ bits the images are at [\d.]+ dB"):
        quantize_coreml(fp16, out, "coreml-mixed", MixedBitInputs(pipe, prompts, 4, 5.0, 150.0))
    assert json.loads((out / ANALYSIS).read_text())["target_psnr_db"] == 32  # the last good one stays


def signal_stack() -> tuple[int, int]:
    """The calling thread's alternate signal stack (address, size)."""
    import ctypes

    from edgesafe.export.openvino import _SignalStack

    current = _SignalStack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current)) == 0
    return current.sp, current.size


def test_openvino_round_trip_matches_pytorch_and_its_int8_variant_runs(pipe, calibration, tmp_path):
    from edgesafe.bench.subjects import SUBJECT_KINDS, Subject
    from edgesafe.export.openvino import OpenVinoPipeline, export_openvino, quantize_openvino
    from edgesafe.export.parity import pipeline_parity

    stack = signal_stack()
    base = export_openvino(pipe, tmp_path / "fp32")
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):  # optimum-intel's layout
        assert {p.name for p in (base / name).iterdir()} == {"openvino_model.xml", "openvino_model.bin", "config.json"}
    assert (base / "model_index.json").is_file() and (base / "tokenizer").is_dir()
    figures = pipeline_parity(pipe, OpenVinoPipeline(base), PROMPTS, steps=6)
    assert all(e["max_abs"] < 1e-3 for e in figures["components"].values()), figures["components"]
    assert figures["image_psnr_db"] > 60
    int8 = quantize_openvino(base, tmp_path / "openvino-int8", "openvino-int8", calibration)
    weights = "unet/openvino_model.bin"
    assert (int8 / weights).stat().st_size < 0.4 * (base / weights).stat().st_size
    assert 12 < pipeline_parity(pipe, OpenVinoPipeline(int8), PROMPTS, steps=6)["image_psnr_db"] < 100
    runner = SUBJECT_KINDS["openvino"].runner(Subject("openvino/openvino-int8", "openvino", str(int8), "export", "x"))
    latents = np.zeros(latent_shape(pipe, 1), np.float32)
    times = runner.time_components("a red star", latents, steps=2, guidance=5.0, repeats=1)
    assert set(times) == {"text_encoder", "unet_step", "vae_decode", "end_to_end"}
    (int8 / "unet" / "openvino_model.xml").unlink()
    with pytest.raises(ModelLoadError, match="not an exported OpenVINO pipeline \\(missing unet\\)"):
        OpenVinoPipeline(int8)

    # OpenVINO's CPU plugins swap the thread's alternate signal stack and, destroyed out of order, leave it
    # unmapped: the next SIGINT / SIGTERM (a fine-tune's clean stop) would die as a bare segmentation fault
    del runner
    gc.collect()
    assert signal_stack() == stack
    got = []
    previous = signal.signal(signal.SIGTERM, lambda *_: got.append(1))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got == [1]
