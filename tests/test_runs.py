import json

import pytest

from edgesafe.recipe import load_recipe
from edgesafe.runs import MANIFEST, RunDir, Stage, fingerprint, plan, run_stages

from .conftest import ROOT


@pytest.fixture
def recipe():
    return load_recipe(ROOT / "recipes" / "tiny-shapes.yaml")


def make_stages(log: list, fail_at: set[str] | None = None):
    fail_at = fail_at if fail_at is not None else set()

    def runner(name):
        def run(ctx):
            log.append((name, ctx.resume))
            (ctx.folder / "out.txt").write_text(f"{name} {ctx.recipe.finetune.steps}")
            if name in fail_at:
                raise RuntimeError(f"{name} killed")
            return {"steps": ctx.recipe.finetune.steps, "saw": sorted(ctx.previous)}
        return run

    return [
        Stage("a", "1-a", reads=lambda r: ["budget.ratio"], run=runner("a")),
        Stage("b", "2-b", reads=lambda r: ["finetune.steps"], run=runner("b")),
    ]


def test_run_writes_manifests_and_recipe(tmp_path, recipe):
    log = []
    outcomes = run_stages(recipe, RunDir(tmp_path), make_stages(log))
    assert [o.action for o in outcomes] == ["run", "run"]
    m = json.loads((tmp_path / "2-b" / MANIFEST).read_text())
    assert m["status"] == "complete" and m["figures"] == {"steps": 600, "saw": ["a"]}
    assert m["inputs"]["stage:a"] == json.loads((tmp_path / "1-a" / MANIFEST).read_text())["key"]
    assert m["wall_seconds"] >= 0
    assert "finetune:" in (tmp_path / "recipe.yaml").read_text()


def test_resume_skips_matching_and_redoes_stale(tmp_path, recipe):
    log = []
    run = RunDir(tmp_path)
    run_stages(recipe, run, make_stages(log))
    log.clear()
    assert [o.action for o in run_stages(recipe, run, make_stages(log), resume=True)] == ["skip", "skip"]
    assert log == []
    changed = recipe.model_copy(update={"finetune": recipe.finetune.model_copy(update={"steps": 5})})
    assert [a for _, a in plan(changed, run, make_stages(log), resume=True)] == ["skip", "run"]
    assert [o.action for o in run_stages(changed, run, make_stages(log), resume=True)] == ["skip", "run"]
    assert log == [("b", False)]
    # a change upstream makes every later stage stale
    upstream = recipe.model_copy(update={"budget": recipe.budget.model_copy(update={"ratio": 0.3})})
    log.clear()
    run_stages(upstream, run, make_stages(log), resume=True)
    assert log == [("a", False), ("b", False)]


def test_without_resume_everything_reruns(tmp_path, recipe):
    log = []
    run_stages(recipe, RunDir(tmp_path), make_stages(log))
    run_stages(recipe, RunDir(tmp_path), make_stages(log))
    assert len(log) == 4


def test_interrupted_stage_continues_with_its_files(tmp_path, recipe):
    log = []
    run = RunDir(tmp_path)
    with pytest.raises(RuntimeError):
        run_stages(recipe, run, make_stages(log, fail_at={"b"}))
    assert json.loads((tmp_path / "2-b" / MANIFEST).read_text())["status"] == "running"
    assert [a for _, a in plan(recipe, run, make_stages(log), resume=True)] == ["skip", "resume"]
    log.clear()
    outcomes = run_stages(recipe, run, make_stages(log), resume=True)
    assert [o.action for o in outcomes] == ["skip", "resume"]
    assert log == [("b", True)]


def test_stale_stage_folder_is_cleared(tmp_path, recipe):
    run = RunDir(tmp_path)
    run_stages(recipe, run, make_stages([]))
    (tmp_path / "2-b" / "leftover.bin").write_bytes(b"x")
    changed = recipe.model_copy(update={"finetune": recipe.finetune.model_copy(update={"steps": 9})})
    run_stages(changed, run, make_stages([]), resume=True)
    assert not (tmp_path / "2-b" / "leftover.bin").exists()


def test_fingerprint_sees_content_changes(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"a" * 100)
    before = fingerprint(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"b" * 100)
    assert fingerprint(tmp_path) != before


def test_a_redone_stage_keeps_what_it_names_until_it_replaces_it(tmp_path, recipe):
    def report(ctx):
        if ctx.recipe.finetune.steps == 2:
            raise RuntimeError("failed before writing")
        (ctx.folder / "report.json").write_text(str(ctx.recipe.finetune.steps))
        (ctx.folder / "scratch.txt").write_text("work")
        return {}

    stage = Stage("r", "4-r", reads=lambda r: ["finetune.steps"], run=report, keep=("report.json",))
    run = RunDir(tmp_path)
    run_stages(recipe, run, [stage])
    with pytest.raises(RuntimeError):
        run_stages(recipe.model_copy(update={"finetune": recipe.finetune.model_copy(update={"steps": 2})}),
                   run, [stage], resume=True)
    assert (tmp_path / "4-r" / "report.json").read_text() == "600"  # kept through the failed redo
    assert not (tmp_path / "4-r" / "scratch.txt").exists()  # the stale rest is cleared


class Reads:
    """A read-only view of a recipe (a section, a concept) that notes the dotted path of every field read; a method
    (``model_dump``, ``to_dict``) reads the whole of its object."""

    def __init__(self, obj, path: str, log: set[str]):
        self._obj, self._path, self._log = obj, path, log

    def __getattr__(self, name: str):
        from pydantic import BaseModel

        value = getattr(self._obj, name)
        if name not in type(self._obj).model_fields:
            self._log.add(self._path)
            return value
        path = f"{self._path}.{name}" if self._path else name
        if isinstance(value, BaseModel):
            return Reads(value, path, self._log)
        if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            self._log.add(path + "[]")
            return [Reads(v, path + "[]", self._log) for v in value]
        self._log.add(path)
        return value


def _covered(read: str, declared: list[str]) -> bool:
    return read == "seed" or any(d == "" or read == d or read.startswith(d + ".") or d.startswith(read + ".")
                                 and read.endswith("[]") for d in declared)


def test_every_stage_declares_every_recipe_field_it_reads(tmp_path):
    """Each stage runs on a recipe that notes what it reads; everything read is among the fields the stage declares
    (and its key is made of), so that a change to any of them redoes it on --resume."""
    from dataclasses import replace

    from edgesafe.pipeline import EXPORT, FINETUNE, PRUNE, TEACHER

    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.yaml", overrides={
        "prune.calibration_batches": 1, "finetune.steps": 2, "finetune.batch_size": 2,
        "finetune.upper_latents": "model-samples", "finetune.upper_every": 1, "sampling.steps": 2,
        "export.targets": ["onnx"], "export.quantize": ["int8-ort-static"],
        "export.parity.int8": {"psnr_db": 5.0}})  # a 2-step student: parity is not what this checks
    seen: dict[str, set[str]] = {}

    def noting(stage):
        def run(ctx):
            ctx.recipe = Reads(ctx.recipe, "", seen.setdefault(stage.name, set()))
            return stage.run(ctx)
        return replace(stage, run=run)

    run_stages(recipe, RunDir(tmp_path / "run"), [noting(s) for s in (TEACHER, PRUNE, FINETUNE, EXPORT)])
    for stage in (TEACHER, PRUNE, FINETUNE, EXPORT):
        declared = stage.reads(recipe)
        assert seen[stage.name], stage.name
        undeclared = sorted(r for r in seen[stage.name] if not _covered(r, declared))
        assert not undeclared, f"{stage.name} reads {undeclared} but its key holds only {declared}"


def test_a_second_process_on_a_run_folder_stops_at_once_naming_the_first(tmp_path, recipe):
    import signal
    import subprocess
    import sys

    from edgesafe.errors import EdgesafeError

    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom edgesafe.runs import RunDir\n"
         f"with RunDir({str(run.root)!r}).lock():\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        log: list = []
        with pytest.raises(EdgesafeError, match=rf"in use by another edgesafe process \(pid {holder.pid}\)"):
            run_stages(recipe, run, make_stages(log))
        assert log == [] and not (run.root / "1-a").exists()  # nothing touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert [o.action for o in run_stages(recipe, run, make_stages(log))] == ["run", "run"]  # a dead holder: free


def test_a_corrupt_manifest_is_named_not_silently_redone(tmp_path, recipe):
    from edgesafe.errors import EdgesafeError

    run = RunDir(tmp_path / "run")
    log: list = []
    run_stages(recipe, run, make_stages(log))
    manifest = run.root / "1-a" / MANIFEST
    manifest.write_text(manifest.read_text()[:20])
    with pytest.raises(EdgesafeError, match=rf"{manifest}: stage manifest .* is not readable JSON"):
        plan(recipe, run, make_stages(log), resume=True)
    assert (run.root / "1-a" / "out.txt").is_file()  # the stage's work is still there
