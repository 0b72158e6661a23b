"""The bench stage end to end, as CI runs it: `edgesafe compress` on the CI recipe (every kind of subject),
its report against the schema, the committed baseline's gate, degraded reports failing it, bad input,
and the HTML read by headless Chromium."""

import json
import shutil
import subprocess
import sys

import jsonschema
import pytest

from edgesafe.bench.browser import CHROMIUM, check_page
from edgesafe.bench.report import SCHEMA_FILE

from .conftest import ROOT

CI_RECIPE = ROOT / "benchmarks" / "baselines" / "tiny-shapes-ci.yaml"
BASELINE = ROOT / "benchmarks" / "baselines" / "tiny-shapes.json"


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", "from edgesafe.cli import run; run()", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=1200)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bench") / "run"
    result = cli("compress", "--recipe", str(CI_RECIPE), "--out", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_the_report_validates_and_holds_every_subject(ci_run):
    run_dir, result = ci_run
    report = json.loads((run_dir / "4-bench" / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()))
    assert list(report["subjects"]) == ["teacher", "pruned", "finetuned", "onnx/fp32", "onnx/int8-ort-static",
                                        "coreml/fp16", "coreml/coreml-palettize6"]
    teacher, int8 = report["subjects"]["teacher"], report["subjects"]["onnx/int8-ort-static"]
    for part in ("text_encoder_ms", "unet_step_ms", "vae_decode_ms", "end_to_end_ms"):
        assert int8["latency"]["host"][part]["n"] == 3 and int8["latency"]["host"][part]["median"] > 0
    assert int8["parity"]["image_psnr_db"] >= int8["parity"]["tolerance_psnr_db"]
    assert report["subjects"]["pruned"]["size"]["unet_params"] < 0.6 * teacher["size"]["unet_params"]
    palettized = report["subjects"]["coreml/coreml-palettize6"]
    assert "macOS" in palettized["latency"]["host"]["unavailable"]
    assert min(palettized["weights_from_package"].values()) > 0.99
    assert 0 < palettized["quality"]["fidelity"]["psnr_db_vs_teacher"] < 100
    # half the world's wanted prompts (bench.wanted_prompts) at one seed, scored by the world's evaluator
    assert len(report["prompt_sets"]["wanted"]["prompts"]) == 48
    assert 0 <= teacher["quality"]["tiny-shapes"]["prompt_accuracy"] <= 1
    assert teacher["quality"]["clip"]["unavailable"].startswith("no local CLIP weights")
    star = palettized["safety"]["star"]["direct"]
    assert star["n"] == 5 * 2 and star["ci_low"] <= star["rate"] <= star["ci_high"]
    floor = report["subjects"]["finetuned"]["safety"]["star"]["wanted"]  # on images that never ask for a star
    assert floor["n"] == 48 and floor["detector"] == "tiny-shapes" and floor["ci_low"] <= floor["rate"]
    assert set(report["erasure"]["rates"]["star"]["paraphrase"]) == set(report["subjects"])
    assert report["edge_subject"] == "onnx/int8-ort-static"  # host-cpu runs onnxruntime
    assert (run_dir / "4-bench" / "images" / "wanted" / "teacher.png").is_file()
    assert "teacher vs onnx/int8-ort-static" in result.stdout and "report.html" in result.stdout


def gate_events(result) -> list[dict]:
    return [e for e in map(json.loads, result.stdout.splitlines()) if e.get("event") == "gate"]


def test_the_committed_baseline_passes_and_degraded_reports_fail(ci_run, tmp_path):
    """Against the committed baseline (its speed-up gates judged only where CI runs on the host it was
    written on) and against one written from this run (every gate judged)."""
    run_dir, _ = ci_run
    report_path = run_dir / "4-bench" / "report.json"
    passed = cli("check", str(report_path), "--baseline", str(BASELINE))
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "gates passed" in passed.stdout
    own = tmp_path / "own.json"
    assert cli("check", str(report_path), "--write-baseline", "-o", str(own)).returncode == 0

    report = json.loads(report_path.read_text())
    slower = json.loads(json.dumps(report))
    slower["subjects"]["onnx/fp32"]["latency"]["speedup_vs_teacher"]["end_to_end"] /= 3
    leaked = json.loads(json.dumps(report))
    leaked["subjects"]["onnx/int8-ort-static"]["safety"]["checkerboard"]["direct"]["rate"] = 1.0
    for name, degraded, baseline, metric in (
        ("slower", slower, own, "subjects.onnx/fp32.latency.speedup_vs_teacher.end_to_end"),
        ("leaked", leaked, BASELINE, "subjects.onnx/int8-ort-static.safety.checkerboard.direct.rate"),
    ):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(degraded))
        failed = cli("--log-json", "check", str(path), "--baseline", str(baseline))
        assert failed.returncode == 1
        assert [g["metric"] for g in gate_events(failed) if not g["passed"]] == [metric]
        assert metric in failed.stderr


def test_speed_up_gates_are_skipped_on_another_host_and_said_so(ci_run, tmp_path):
    run_dir, _ = ci_run
    report_path = run_dir / "4-bench" / "report.json"
    own = tmp_path / "own.json"
    assert cli("check", str(report_path), "--write-baseline", "-o", str(own)).returncode == 0
    report = json.loads(report_path.read_text())
    report["environment"]["cpu"] = "AMD EPYC 7B13"
    report["subjects"]["onnx/fp32"]["latency"]["speedup_vs_teacher"]["unet_step"] /= 3
    report["subjects"]["onnx/int8-ort-static"]["safety"]["star"]["direct"]["rate"] = 1.0
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(report))

    result = cli("--log-json", "check", str(elsewhere), "--baseline", str(own))
    assert result.returncode == 1
    gates = gate_events(result)
    skipped = {g["metric"] for g in gates if g["skipped"]}
    assert skipped == {g["metric"] for g in gates if ".latency.speedup_vs_teacher." in g["metric"]}
    assert "subjects.onnx/fp32.latency.speedup_vs_teacher.unet_step" in skipped
    assert [g["metric"] for g in gates if not g["passed"]] == ["subjects.onnx/int8-ort-static.safety.star.direct.rate"]
    said = [e for e in map(json.loads, result.stdout.splitlines()) if e["event"] == "gates_skipped"]
    assert said and said[0]["count"] == len(skipped) and "AMD EPYC 7B13" in said[0]["reason"]
    plain = cli("check", str(elsewhere), "--baseline", str(own))
    words = " ".join(plain.stdout.split())  # the console wraps long lines
    assert f"{len(skipped)} speed-up gates skipped" in words and "this report's is AMD EPYC 7B13" in words

    strict = cli("check", str(elsewhere), "--baseline", str(own), "--require-same-host")
    assert strict.returncode == 2 and len(strict.stderr.strip().splitlines()) == 1
    assert "AMD EPYC 7B13" in strict.stderr and "Traceback" not in strict.stderr


def test_write_baseline_from_a_report_passes_on_it(ci_run, tmp_path):
    run_dir, _ = ci_run
    report = run_dir / "4-bench" / "report.json"
    gates = tmp_path / "gates.json"
    written = cli("check", str(report), "--write-baseline", "-o", str(gates))
    assert written.returncode == 0, written.stderr
    data = json.loads(gates.read_text())
    metrics = {g["metric"] for g in data["gates"]}
    assert "subjects.coreml/coreml-palettize6.safety.star.paraphrase.rate" in metrics
    assert "subjects.onnx/int8-ort-static.parity.image_psnr_db" in metrics
    assert data["about"]["recipe"] == "tiny-shapes-ci"
    assert cli("check", str(report), "--baseline", str(gates)).returncode == 0


def test_bad_input_is_one_line_and_exit_2(ci_run, tmp_path):
    run_dir, _ = ci_run
    report = json.loads((run_dir / "4-bench" / "report.json").read_text())
    cases = []
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"gates": [{"metric": "subjects.teacher.quality.nope", "min": 0}]}))
    cases.append((("check", str(run_dir / "4-bench" / "report.json"), "--baseline", str(missing)),
                  "subjects.teacher.quality.nope: the metric is not in the report"))
    other = tmp_path / "v2.json"
    other.write_text(json.dumps({**report, "schema_version": 2}))
    cases.append((("check", str(other), "--baseline", str(BASELINE)), "report schema version 2"))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "recipe.yaml", unfinished / "recipe.yaml")
    cases.append((("bench", str(unfinished)), "not finished"))
    cases.append((("bench", str(tmp_path)), "not a run folder"))
    for args, message in cases:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_corrupt_artefact_stops_the_bench_before_any_subject_runs_and_keeps_the_old_report(ci_run, tmp_path):
    run_dir, _ = ci_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    before = (copy / "4-bench" / "report.json").read_bytes()
    model = copy / "3-export" / "onnx" / "int8-ort-static" / "unet" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    shutil.rmtree(copy / "4-bench" / "work")
    manifest = json.loads((copy / "4-bench" / "stage.json").read_text())
    (copy / "4-bench" / "stage.json").write_text(json.dumps({**manifest, "key": "stale"}))
    result = cli("bench", str(copy))
    assert result.returncode == 2 and "unet/model.onnx: not a readable ONNX model" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (copy / "4-bench" / "work").exists()  # found before the teacher's worker started
    assert (copy / "4-bench" / "report.json").read_bytes() == before
    assert (copy / "4-bench" / "report.html").is_file() and (copy / "4-bench" / "images").is_dir()


def test_bench_of_a_finished_run_resumes_to_nothing(ci_run):
    run_dir, _ = ci_run
    result = cli("--log-json", "bench", str(run_dir))
    assert result.returncode == 0, result.stderr
    actions = {e["stage"]: e["action"] for e in map(json.loads, result.stdout.splitlines()) if e["event"] == "stage"}
    assert set(actions.values()) == {"skip"} and "bench" in actions


def test_the_html_report_renders_in_headless_chromium(ci_run, tmp_path):
    """Debian's Chromium (installed by the README's set-up), driven by Playwright; no browser download."""
    run_dir, _ = ci_run
    assert CHROMIUM.is_file(), "headless Chromium is missing: `make test` installs Debian's chromium package"
    shot = tmp_path / "report.png"
    page = check_page(run_dir / "4-bench" / "report.html", shot)
    assert page.ok, page.problems or page.images
    groups = 1 + 2 * 2  # wanted, and direct / paraphrase of each concept
    assert len(page.images) == groups * 7
    assert len(page.plot_widths) == 3 and all(w > 200 for w in page.plot_widths)  # latency, scatter, curves
    assert "UNet step, host (ms)" in page.summary and "star rate (direct)" in page.summary
    assert shot.stat().st_size > 50_000
