"""ONNX / Core ML export of the committed tiny-shapes teacher and a pruned student: real exporters,
real onnxruntime sessions, optimum's pipeline, real quantizers."""

import json
import shutil

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
from edgesafe.export.quantize import unet_calibration, weight_only_int8
from edgesafe.export.runtime import session
from edgesafe.models.inputs import unet_example_inputs
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


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("zoo:tiny-shapes")


@pytest.fixture(scope="module")
def onnx_dir(pipe, tmp_path_factory):
    return export_onnx(pipe, tmp_path_factory.mktemp("export") / "onnx")


@pytest.fixture(scope="module")
def calibration(pipe):
    return unet_calibration(pipe, ["a red circle on a plain background", "a blue square with stripes"], steps=4)


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


@pytest.mark.parametrize("method", sorted(ONNX_QUANTIZERS))
def test_each_onnx_quantizer_shrinks_the_unet_and_keeps_the_image(pipe, onnx_dir, calibration, method, tmp_path):
    out = quantize_folder(onnx_dir, tmp_path / method, method, calibration)
    fp32_bytes = (onnx_dir / "unet" / "model.onnx").stat().st_size
    assert (out / "unet" / "model.onnx").stat().st_size < 0.5 * fp32_bytes
    ops = _ops(out / "unet" / "model.onnx")
    assert ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}
    if method == "int8-hybrid":
        assert "DequantizeLinear" in _ops(out / "text_encoder" / "model.onnx")
        assert (out / "vae_decoder" / "model.onnx").stat().st_size < 0.5 * (
            onnx_dir / "vae_decoder" / "model.onnx").stat().st_size
    figures = onnx_parity(pipe, out, PROMPTS, steps=6)
    assert 12 < figures["image_psnr_db"] < 100  # changed, yet still the same picture


def test_static_calibration_one_feed_at_a_time_gives_the_ranges_of_all_at_once(onnx_dir, calibration, tmp_path):
    """int8-ort-static folds each feed's ranges in before the next (bounded memory at SD size); the scales
    must be those of holding every feed at once."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgesafe.export.quantize import OPS, _prepared, _Reader, quantize_folder

    strided = quantize_folder(onnx_dir, tmp_path / "strided", "int8-ort-static", calibration) / "unet" / "model.onnx"
    whole = tmp_path / "whole.onnx"
    quantize_static(str(_prepared(onnx_dir / "unet" / "model.onnx", tmp_path)), str(whole), _Reader(calibration),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=OPS, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, extra_options={"ActivationSymmetric": False})

    def scales(path):
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
                if i.name.endswith(("_scale", "_zero_point"))}

    a, b = scales(strided), scales(whole)
    assert len(a) > 100 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


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
def test_coreml_quantizers_compress_the_unet(pipe, coreml_dir, tmp_path, method, op):
    assert method in COREML_QUANTIZERS
    out = quantize_coreml(coreml_dir, tmp_path / method, method)
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


@pytest.mark.parametrize("method,op", [("coreml-linear8", "constexpr_affine_dequantize"),
                                       ("coreml-palettize6", "constexpr_lut_to_dense")])
def test_coreml_quantizers_leave_a_77_token_causal_mask_alone(pipe, tmp_path, method, op):
    """At SD's 77 tokens CLIP's causal mask (-inf above the diagonal) is big enough to count as a weight."""
    import copy

    from transformers import CLIPTextConfig, CLIPTextModel

    from edgesafe.export.coreml import _convert, _specs, describe_package

    sd_length = copy.copy(pipe)
    sd_length.tokenizer = copy.deepcopy(pipe.tokenizer)
    sd_length.tokenizer.model_max_length = 77
    torch.manual_seed(0)
    sd_length.text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(pipe.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=64)).eval()
    factory, inputs, outputs = _specs(sd_length)["TextEncoder"]
    COREML_QUANTIZERS[method](_convert(factory(), inputs, outputs)).save(str(tmp_path / "TextEncoder.mlpackage"))
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


def test_coreml_weights_decompress_into_the_pytorch_pipeline(coreml_dir, tmp_path):
    """What the bench measures for Core ML on Linux: the package's own (palettized, fp16) weights in PyTorch."""
    from edgesafe.export.coreml import load_coreml_weights

    out = quantize_coreml(coreml_dir, tmp_path / "pal4", "coreml-palettize4")
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


def test_coreml_weights_of_another_model_are_refused(coreml_dir, tmp_path):
    from edgesafe.export.coreml import load_coreml_weights

    pipe = load_pipeline("zoo:tiny-shapes")
    pipe.unet = prune_width(pipe.unet, 0.5, example_inputs=unet_example_inputs(pipe.unet, batch=1, text_length=16)).unet
    out = quantize_coreml(coreml_dir, tmp_path / "pal6", "coreml-palettize6")
    with pytest.raises(EdgesafeError, match="matches no parameter of the unet"):
        load_coreml_weights(pipe, out)
