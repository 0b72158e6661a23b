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
        Stage("a", "1-a", settings=lambda r: {"budget": r.budget.ratio}, run=runner("a")),
        Stage("b", "2-b", settings=lambda r: {"steps": r.finetune.steps}, run=runner("b")),
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

    stage = Stage("r", "4-r", settings=lambda r: {"steps": r.finetune.steps}, run=report, keep=("report.json",))
    run = RunDir(tmp_path)
    run_stages(recipe, run, [stage])
    with pytest.raises(RuntimeError):
        run_stages(recipe.model_copy(update={"finetune": recipe.finetune.model_copy(update={"steps": 2})}),
                   run, [stage], resume=True)
    assert (tmp_path / "4-r" / "report.json").read_text() == "600"  # kept through the failed redo
    assert not (tmp_path / "4-r" / "scratch.txt").exists()  # the stale rest is cleared
