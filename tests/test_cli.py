import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgesafe import __version__, load_pipeline
from edgesafe.cli import app
from edgesafe.models.stats import count_params

from .conftest import RECIPES, ROOT

runner = CliRunner()
TINY = str(ROOT / "recipes" / "tiny-shapes.yaml")


def cli(*args, cwd=ROOT):
    """The real console script in a subprocess."""
    return subprocess.run([sys.executable, "-c", "from edgesafe.cli import run; run()", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_recipes_validate_all_shipped():
    result = runner.invoke(app, ["recipes", "validate", *map(str, RECIPES)])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("ok") == len(RECIPES)


def test_recipes_show_is_resolved_yaml():
    result = runner.invoke(app, ["recipes", "show", TINY, "--set", "finetune.steps=3"])
    assert result.exit_code == 0
    assert "steps: 3" in result.stdout and "feature_align: kept" in result.stdout


def test_devices_list_and_show():
    result = runner.invoke(app, ["--log-json", "devices", "list"])
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert {e["name"] for e in events} >= {"iphone15", "pixel8", "host-cpu", "jetson-orin-nano", "raspberry-pi5"}
    assert all(e["provenance"] for e in events)
    assert "apple/ml-stable-diffusion" in next(e for e in events if e["name"] == "iphone15")["provenance"]
    assert "runtime: coreml" in runner.invoke(app, ["devices", "show", "iphone15"]).stdout


def test_dry_run_prints_the_plan(tmp_path):
    result = runner.invoke(app, ["--log-json", "compress", "--recipe", TINY, "--dry-run", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.splitlines()[-1])
    assert plan["event"] == "plan" and plan["stages"][0] == {"stage": "teacher", "action": "run"}
    assert not (tmp_path / "r").exists(), "a dry run writes nothing"


def test_subprocess_validate_and_bad_recipe(tmp_path):
    ok = cli("recipes", "validate", *map(str, RECIPES))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes" / "tiny-shapes.yaml").read_text().replace("ratio: 0.5", "ratio: 7"))
    result = cli("compress", "--recipe", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "budget.ratio" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["compress", "--recipe", "missing.yaml"],
        ["compress", "--recipe", TINY, "--model", "/nonexistent/sd15"],
        ["compress", "--recipe", TINY, "--set", "novalue"],
        ["devices", "show", "abacus"],
        ["check", "missing.json", "--baseline", "missing.json"],
    ],
)
def test_user_errors_are_one_line_exit_2(args, tmp_path):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1


def test_check_refuses_what_is_not_a_bench_report(tmp_path):
    """Exit codes 0 and 1 on real reports: test_bench_run."""
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"x": 1.0}))
    (tmp_path / "gates.json").write_text(json.dumps({"gates": [{"metric": "x", "max": 2}]}))
    done = cli("check", str(report), "--baseline", str(tmp_path / "gates.json"))
    assert done.returncode == 2 and "not an edgesafe bench report" in done.stderr
    assert cli("check", str(report)).returncode == 2  # neither --baseline nor --write-baseline


def test_export_runs_the_stages_before_it_resumes_and_prints_as_asked(tmp_path, short_pipeline_dir):
    """Up to the export (`compress` with its bench stage is test_bench_run's). --log-json prints only JSON events
    (each stage's progress among them); libraries' progress bars (onnxruntime's graph fusions here) go to
    runs/<name>/log.txt; --quiet prints nothing; a run without a terminal ends with a table of what each stage
    made and where."""
    run_dir = tmp_path / "run"
    args = ["export", "--recipe", TINY, "--model", str(short_pipeline_dir), "--out", str(run_dir),
            "--set", "finetune.steps=2", "--set", "finetune.batch_size=4", "--set", "export.targets=[onnx]",
            "--set", "export.quantize=[fp32-optimized]"]
    first = cli("--log-json", *args)
    assert first.returncode == 0, first.stderr
    events = [json.loads(line) for line in first.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert {"task": "finetune (bilevel-alternating)", "done": 2, "total": 2} in [
        {k: e[k] for k in ("task", "done", "total")} for e in progress]  # every stage's progress, in JSON
    log = (run_dir / "log.txt").read_text()
    assert "fusion:" in log, log[-2000:]
    teacher = json.loads((run_dir / "0-teacher" / "stage.json").read_text())["figures"]
    assert teacher["unet_params"] > 1_000_000 and teacher["unet_macs_per_step"] == 2 * teacher["unet_macs"]
    assert teacher["ms_per_step"] > 0 and teacher["ms_per_step_source"].startswith("measured")
    pruned = json.loads((run_dir / "1-prune" / "stage.json").read_text())["figures"]
    assert abs(pruned["unet_params"] / teacher["unet_params"] - 0.5) <= 0.5 * 0.05
    assert abs(pruned["budget_relative_error"]) <= 0.05
    assert (run_dir / "recipe.yaml").is_file()

    pipe = load_pipeline(run_dir / "1-prune")  # rebuilt from the structure spec, no pickle
    assert count_params(pipe.unet) == pruned["unet_params"]
    image = pipe("a red circle on a plain background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)

    again = cli("--log-json", *args, "--resume")
    actions = {e["stage"]: e["action"] for e in map(json.loads, again.stdout.splitlines()) if e["event"] == "stage"}
    assert actions == {"teacher": "skip", "prune": "skip", "finetune": "skip", "export": "skip"}
    finetuned = load_pipeline(run_dir / "2-finetune" / "final")
    assert count_params(finetuned.unet) == pruned["unet_params"]
    assert (run_dir / "2-finetune" / "curves.png").stat().st_size > 0
    exported = json.loads((run_dir / "3-export" / "stage.json").read_text())["figures"]
    assert exported["onnx"]["fp32"]["image_psnr_db"] >= 40 and "coreml" not in exported
    assert (run_dir / "3-export" / "onnx" / "fp32" / "unet" / "model.onnx").is_file()

    fewer = [*args, "--set", "export.quantize=[]", "--resume"]  # the export alone is made again
    quiet = cli("--quiet", *fewer)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    assert not (run_dir / "3-export" / "onnx" / "fp32-optimized").exists()
    table = cli(*fewer)
    assert table.returncode == 0 and table.stderr == ""
    rows = table_rows(table.stdout)
    for stage, made in (("teacher", "ms per step on host-cpu"), ("prune", "of the teacher's params"),
                        ("finetune", "2 steps of bilevel-alternating"), ("export", "onnx/fp32")):
        assert made in rows[stage], table.stdout


def table_rows(text: str) -> dict[str, str]:
    """A printed table's first column -> its second, each cell's wrapped lines joined by spaces."""
    rows: dict[str, list[str]] = {}
    stage = None
    for line in text.splitlines():
        cells = line.split("│")
        if len(cells) < 4:
            continue
        stage = cells[1].strip() or stage
        rows.setdefault(stage, []).append(cells[2].strip())
    return {name: " ".join(parts) for name, parts in rows.items()}


def test_finetune_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, short_pipeline_dir):
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    sets = ["--set", "finetune.steps=6", "--set", "finetune.batch_size=4", "--set", "finetune.checkpoint_every=2",
            "--set", "prune.importance=magnitude"]
    base = ["finetune", "--recipe", TINY, "--model", str(short_pipeline_dir), *sets]
    whole = cli(*base, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-c", "from edgesafe.cli import run; run()", *base, "--out", str(cut)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = cut / "2-finetune" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (pointer.is_file() and json.loads(pointer.read_text())["step"] >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((cut / "2-finetune" / "stage.json").read_text())["status"] == "running"

    resumed = cli(*base, "--out", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    figures = json.loads((cut / "2-finetune" / "stage.json").read_text())["figures"]
    assert figures["resumed_from"] >= 2
    a = load_file(str(tmp_path / "whole" / "2-finetune" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(cut / "2-finetune" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # stated tolerance: 1e-6 absolute


@pytest.mark.parametrize(("case", "message"), [
    ("no-captions", "has no images with captions"),
    ("broken-image", "0001.png: not a readable image"),
    ("resolution", "data.resolution: 40 px is not a multiple of 16 px"),
])
def test_bad_data_is_one_line_before_any_work(tmp_path, case, message):
    from edgesafe.models.standin import write_captioned_images

    images = write_captioned_images(tmp_path / "images", count=2, size=32)
    sets = ["--set", "data.kind=folder", "--set", f"data.path={images}"]
    if case == "no-captions":
        for caption in images.glob("*.txt"):
            caption.unlink()
    elif case == "broken-image":
        (images / "0001.png").write_bytes(b"not a png")
    else:
        sets += ["--set", "data.resolution=40"]
    done = cli("prune", "--recipe", TINY, "--out", str(tmp_path / "run"), *sets)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "1-prune" / "unet").exists()


def test_zoo_standin_rejects_an_unknown_architecture(tmp_path):
    done = cli("zoo", "standin", "sd-9", "--out", str(tmp_path / "m"))
    assert done.returncode == 2 and "unknown architecture 'sd-9'; known: sd-1.5, sd-2.1-base" in done.stderr
    assert not (tmp_path / "m").exists()


def test_an_export_whose_package_is_missing_stops_before_any_work(tmp_path):
    """Core ML is an extra: without coremltools a recipe that exports to it stops at once, naming the extra."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['coremltools'] = None\nfrom edgesafe.cli import run; run()",
         "compress", "--recipe", TINY, "--out", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert "coreml needs coremltools: pip install 'edgesafe[coreml]'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_packaging_metadata_is_clean_and_heavy_backends_are_extras():
    import warnings

    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # setuptools warns about a license table
        project = read_configuration(ROOT / "pyproject.toml")["project"]
    assert project["license"] == "Apache-2.0"
    base = " ".join(project["dependencies"])
    for heavy, extra in (("coremltools", "coreml"), ("nncf", "nncf"), ("openvino", "openvino"),
                         ("bitsandbytes", "8bit"), ("nudenet", "nudenet")):
        assert heavy not in base and any(heavy in d for d in project["optional-dependencies"][extra])
    assert "edgesafe[all]" in project["optional-dependencies"]["test"]  # what make test / make demo install
