"""The ``edgesafe`` command line: thin, it parses, calls the library and prints with rich.

Every user error is an :class:`EdgesafeError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import EdgesafeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Compress text-to-image diffusion models for edge devices, safely.",
)
recipes_app = typer.Typer(no_args_is_help=True, help="List, validate and show recipes.")
devices_app = typer.Typer(no_args_is_help=True, help="List and show device profiles.")
zoo_app = typer.Typer(no_args_is_help=True, help="The embedded models: list and (re)build them.")
app.add_typer(recipes_app, name="recipes")
app.add_typer(devices_app, name="devices")
app.add_typer(zoo_app, name="zoo")

RECIPE_DIR = Path("recipes")


PLAIN_PROGRESS_EVERY = 30.0
"""Seconds between progress lines without a terminal (CI logs) and between --log-json progress events."""


class Output:
    """Where the CLI's words go: rich text, nothing but errors (``--quiet``) or JSON lines (``--log-json``).
    While a run works, whatever else writes to stderr (libraries' logging, warnings and progress bars, native
    code) goes to the run's ``log.txt`` instead (:meth:`logging_to`)."""

    def __init__(self) -> None:
        self.quiet = False
        self.json = False
        self.console = Console()
        self.err = Console(stderr=True, soft_wrap=True)
        self.log: Path | None = None

    @contextmanager
    def logging_to(self, path: Path):
        """Send file descriptor 2 (everything third-party writes to stderr, child processes included) to ``path``,
        keeping edgesafe's own errors on the terminal's stderr; an error names the log."""
        import logging

        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stderr.flush()
        terminal = os.dup(2)
        self.err = Console(file=os.fdopen(os.dup(terminal), "w"), soft_wrap=True,
                           force_terminal=self.err.is_terminal or None)
        handler = logging.StreamHandler(sys.stderr)  # the root logger's records, now into the log
        logging.getLogger().addHandler(handler)
        with path.open("a") as log:
            log.write(f"--- edgesafe {__version__}: {' '.join(sys.argv[1:])}\n")
            log.flush()
            os.dup2(log.fileno(), 2)
            self.log = path
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(terminal, 2)
                os.close(terminal)
                logging.getLogger().removeHandler(handler)

    def say(self, message: Any) -> None:
        if not (self.quiet or self.json):
            self.console.print(message)

    def event(self, kind: str, **data: Any) -> None:
        if self.json:
            print(json.dumps({"event": kind, **data}, default=str), flush=True)

    def error(self, message: str) -> None:
        if self.log is not None:
            message += f" (log: {self.log})"
        if self.json:
            print(json.dumps({"event": "error", "message": message}), flush=True)
        self.err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)

    @contextmanager
    def progress(self):
        """A callback ``(task, done, total)``: one rich bar per task on a terminal; without one (CI logs), a plain
        line per task every :data:`PLAIN_PROGRESS_EVERY` seconds and at its end; with ``--log-json``, progress
        events as often; nothing with ``--quiet``."""
        if self.quiet:
            yield lambda *_: None
            return
        if self.json or not self.console.is_terminal and os.environ.get("EDGESAFE_PROGRESS") != "1":
            yield self._occasional()
            return
        bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=self.console, transient=False)
        tasks: dict[str, Any] = {}

        def update(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total)
            bars.update(tasks[task], completed=done, total=total)

        with bars:
            yield update

    def _occasional(self):
        import time

        start: dict[str, float] = {}
        last: dict[str, float] = {}

        def update(task: str, done: int, total: int) -> None:
            now = time.monotonic()
            start.setdefault(task, now)
            if done < total and now - last.get(task, -PLAIN_PROGRESS_EVERY) < PLAIN_PROGRESS_EVERY:
                return
            last[task] = now
            elapsed = round(now - start[task], 1)
            self.event("progress", task=task, done=done, total=total, elapsed_seconds=elapsed)
            self.say(f"{task}: {done}/{total} ({elapsed:.0f} s)")

        return update


out = Output()


def _version(value: bool) -> None:
    if value:
        print(f"edgesafe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    log_json: Annotated[bool, typer.Option("--log-json", help="Print events as JSON lines (for CI).")] = False,
) -> None:
    out.quiet, out.json = quiet, log_json


def _overrides(pairs: list[str] | None) -> dict[str, Any]:
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EdgesafeError(f"--set {pair!r}: expected KEY=VALUE, e.g. finetune.steps=100")
        result[key] = yaml.safe_load(value)
    return result


RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: KEY=VALUE (YAML value).")]


def _load(recipe: Path, model: Path | None, sets: list[str] | None):
    from .recipe import load_recipe

    overrides = _overrides(sets)
    if model is not None:
        overrides["model.source"] = str(model)
    return load_recipe(recipe, overrides=overrides)


ModelOpt = Annotated[Path | None, typer.Option(help="Teacher folder; replaces the recipe's model.source.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (default runs/<recipe name>).")]
ResumeOpt = Annotated[bool, typer.Option(help="Skip matching stages; continue interrupted ones.")]


def _run(recipe: Path, model: Path | None, out_dir: Path | None, resume: bool, sets: list[str] | None,
         until: str | None = None) -> None:
    """Run the stages (up to ``until``) of a recipe into its run folder."""
    from .models.loading import resolve_source
    from .runs import RunDir

    r = _load(recipe, model, sets)
    resolve_source(r.model.source)  # fail before anything is written
    _run_stages(r, RunDir(out_dir or Path("runs") / r.name), resume=resume, until=until)


def _run_stages(r, run, *, resume: bool, until: str | None = None) -> None:
    from .pipeline import EXPORT, STAGES
    from .runs import ACTIONS, run_stages

    stages = STAGES if until is None else STAGES[: [s.name for s in STAGES].index(until) + 1]
    if EXPORT in stages:
        from .export.targets import missing_extras

        if missing := missing_extras(r):  # before hours of fine-tuning, not after
            raise EdgesafeError(f"export: {'; '.join(missing)}")
    with out.logging_to(run.root / "log.txt"), out.progress() as progress:
        outcomes = run_stages(r, run, stages, resume=resume, progress=progress,
                              on_stage=lambda s, action: out.say(f"[bold]{s.name}[/]: {action} ({ACTIONS[action]})"))
    table = Table(title=f"{r.name} -> {run.root} (log: {run.root / 'log.txt'})")
    for col in ("stage", "what it made", "where"):
        table.add_column(col, overflow="fold")
    for o in outcomes:
        out.event("stage", stage=o.name, action=o.action, figures=o.manifest.get("figures"))
        figures = o.manifest.get("figures", {})
        stage = next(s for s in STAGES if s.name == o.name)
        table.add_row(o.name, stage.summary(figures), str(run.root / stage.folder))
    out.say(table)
    if outcomes[-1].name == "bench":
        _print_summary(Path(outcomes[-1].manifest["figures"]["report"]))
    out.event("done", run=str(run.root))


def _print_summary(report_path: Path) -> None:
    """The report's summary table (teacher against the edge model) and where the HTML is."""
    from .bench.html import summary_rows
    from .io import read_json

    report = read_json(report_path, "report")
    table = Table(title=f"{report['run']['recipe']['name']}: teacher vs {report['edge_subject']}")
    for col in ("figure", "teacher", report["edge_subject"]):
        table.add_column(col)
    for row in summary_rows(report):
        table.add_row(*row)
    out.say(table)
    for gate in report["gates"]:
        if not gate["passed"]:
            out.say(f"[red]gate failed[/]: {gate['metric']} = {gate['value']:.4g} ({gate['rule']})")
    out.say(f"report: {report_path.with_suffix('.html')}")


@app.command()
def compress(
    recipe: RecipeOpt,
    model: ModelOpt = None,
    out_dir: OutOpt = None,
    resume: ResumeOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit.")] = False,
    sets: SetOpt = None,
) -> None:
    """Run every stage of a recipe into a run folder."""
    from .pipeline import STAGES
    from .runs import RunDir, plan

    if not dry_run:
        _run(recipe, model, out_dir, resume, sets)
        return
    r = _load(recipe, model, sets)
    run = RunDir(out_dir or Path("runs") / r.name)
    table = Table(title=f"plan for {r.name} -> {run.root}")
    for col in ("stage", "folder", "action", "what"):
        table.add_column(col)
    actions = plan(r, run, STAGES, resume=resume)
    for stage, action in actions:
        table.add_row(stage.name, stage.folder, action, stage.description)
    out.say(table)
    out.event("plan", recipe=r.name, run=str(run.root), stages=[{"stage": s.name, "action": a} for s, a in actions])


@app.command()
def prune(recipe: RecipeOpt, model: ModelOpt = None, out_dir: OutOpt = None, resume: ResumeOpt = False,
          sets: SetOpt = None) -> None:
    """Prune the teacher's UNet to the recipe's budget (runs the stages before it as needed)."""
    _run(recipe, model, out_dir, resume, sets, until="prune")


@app.command()
def finetune(recipe: RecipeOpt, model: ModelOpt = None, out_dir: OutOpt = None, resume: ResumeOpt = False,
             sets: SetOpt = None) -> None:
    """Fine-tune the pruned UNet: distillation + concept unlearning (runs earlier stages as needed)."""
    _run(recipe, model, out_dir, resume, sets, until="finetune")


@app.command(name="export")
def export_(recipe: RecipeOpt, model: ModelOpt = None, out_dir: OutOpt = None, resume: ResumeOpt = False,
            sets: SetOpt = None) -> None:
    """Export the student to ONNX / Core ML, quantize and check parity (runs earlier stages as needed)."""
    _run(recipe, model, out_dir, resume, sets, until="export")


@app.command()
def bench(
    run_dir: Annotated[Path | None, typer.Argument(help="A run folder whose export is finished.")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe YAML file.")] = None,
    model: ModelOpt = None,
    out_dir: OutOpt = None,
    resume: ResumeOpt = False,
    sets: SetOpt = None,
) -> None:
    """Benchmark every artefact against the teacher: `bench RUN_DIR`, or `bench --recipe R` (runs the stages
    before it as needed)."""
    from .pipeline import STAGES
    from .recipe import load_recipe
    from .runs import RunDir, plan

    if (run_dir is None) == (recipe is None):
        raise EdgesafeError("give a run folder (edgesafe bench RUN_DIR) or a recipe (edgesafe bench --recipe R)")
    if recipe is not None:
        _run(recipe, model, out_dir, resume, sets, until="bench")
        return
    run = RunDir(run_dir)
    if not (run.root / "recipe.yaml").is_file():
        raise EdgesafeError(f"{run_dir}: not a run folder (no recipe.yaml)")
    r = load_recipe(run.root / "recipe.yaml", overrides=_overrides(sets))
    stale = [s.name for s, action in plan(r, run, STAGES, resume=True) if action != "skip" and s.name != "bench"]
    if stale:
        raise EdgesafeError(f"{run_dir}: the {stale[0]} stage is not finished or its inputs changed; run "
                            f"`edgesafe compress --recipe {run.root / 'recipe.yaml'} --out {run_dir} --resume`")
    _run_stages(r, run, resume=True)


@app.command()
def check(
    report: Annotated[Path, typer.Argument(help="A bench report (4-bench/report.json).")],
    baseline: Annotated[Path | None, typer.Option(help="Baseline JSON with gates.")] = None,
    write_baseline: Annotated[bool, typer.Option("--write-baseline", help=(
        "Write gates from the report with its recipe's tolerances (check section) instead of checking."))] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where --write-baseline writes.")] = None,
    require_same_host: Annotated[bool, typer.Option("--require-same-host", help=(
        "Stop (exit 2) when the report comes from another host than the baseline, instead of skipping the "
        "speed-up gates."))] = False,
) -> None:
    """Gate a report against a baseline: exit 0 if every gate passes, 1 if any fails, 2 on bad input.
    Speed-up gates hold on the baseline's host (CPU, threads, vector extensions) and are skipped elsewhere."""
    from .bench.check import check as run_check
    from .bench.check import write_baseline as write_gates

    if write_baseline:
        if output is None or baseline is not None:
            raise EdgesafeError("--write-baseline needs -o GATES.json (and no --baseline)")
        gates = write_gates(report, output)
        out.say(f"wrote {gates} gates from {report} -> {output}")
        out.event("baseline", path=str(output), gates=gates)
        return
    if baseline is None:
        raise EdgesafeError("give --baseline GATES.json, or --write-baseline -o GATES.json")
    results = run_check(report, baseline, require_same_host=require_same_host)
    table = Table(title=f"{report} vs {baseline}")
    for col in ("metric", "value", "rule", "result"):
        table.add_column(col, overflow="fold")
    for res in results:
        verdict = "[yellow]skip[/]" if res.skipped else "[green]pass[/]" if res.passed else "[red]FAIL[/]"
        table.add_row(res.metric, f"{res.value:.6g}", res.rule, verdict)
        out.event("gate", metric=res.metric, value=res.value, rule=res.rule, passed=res.passed,
                  skipped=res.skipped)
    out.say(table)
    skipped = [r for r in results if r.skipped]
    if skipped:
        out.say(f"{len(skipped)} speed-up gates skipped: {skipped[0].skipped} (write a baseline on this host "
                "to gate speed; --require-same-host makes this an error)")
        out.event("gates_skipped", count=len(skipped), reason=skipped[0].skipped)
    failed = [r for r in results if not r.passed]
    if failed:
        out.error(f"{len(failed)} of {len(results)} gates failed: " + ", ".join(r.metric for r in failed))
        raise typer.Exit(1)
    judged = len(results) - len(skipped)
    out.say(f"all {judged} gates passed" + (f" ({len(skipped)} skipped)" if skipped else ""))


@recipes_app.command("list")
def recipes_list(folder: Annotated[Path, typer.Option(help="Folder of recipes.")] = RECIPE_DIR) -> None:
    """List the recipes in a folder."""
    from .recipe import load_recipe

    table = Table()
    for col in ("file", "name", "device", "budget", "concepts"):
        table.add_column(col)
    for path in sorted(folder.glob("*.yaml")):
        r = load_recipe(path)
        target = r.budget.ms_per_step and f"{r.budget.ms_per_step:g} ms/step" or f"{r.budget.ratio:g} x"
        table.add_row(str(path), r.name, r.device, f"{r.budget.metric} {target}", ", ".join(c.name for c in r.concepts))
        out.event("recipe", file=str(path), name=r.name, device=r.device)
    out.say(table)


@recipes_app.command("validate")
def recipes_validate(files: Annotated[list[Path], typer.Argument(help="Recipe files.")]) -> None:
    """Validate recipe files; all are checked, and any invalid one makes the exit code 2."""
    from .recipe import load_recipe

    errors = []
    for path in files:
        try:
            load_recipe(path)
            out.say(f"[green]ok[/] {path}")
            out.event("valid", file=str(path))
        except EdgesafeError as exc:
            errors.append(str(exc))
            out.error(str(exc))
    if errors:
        raise typer.Exit(2)


@recipes_app.command("show")
def recipes_show(recipe: Annotated[Path, typer.Argument(help="Recipe file.")], sets: SetOpt = None) -> None:
    """Print a recipe resolved, with every default filled in."""
    r = _load(recipe, None, sets)
    if out.json:
        out.event("recipe", recipe=r.to_dict())
    elif not out.quiet:
        print(r.to_yaml(), end="")


@devices_app.command("list")
def devices_list() -> None:
    """List device profiles with the provenance of their latency estimates."""
    from .devices import load_profiles

    table = Table()
    for col in ("name", "device", "runtime", "units", "precision", "round to", "latency from"):
        table.add_column(col, overflow="fold")
    for p in load_profiles().values():
        table.add_row(p.name, p.title, p.runtime, p.compute_units, p.precision, str(p.channel_multiple), p.provenance())
        out.event("device", name=p.name, title=p.title, provenance=p.provenance())
    out.say(table)


@devices_app.command("show")
def devices_show(name: Annotated[str, typer.Argument(help="Profile name.")]) -> None:
    """Print one device profile."""
    from .devices import get_profile

    profile = get_profile(name)
    if out.json:
        out.event("device", profile=profile.model_dump(mode="json"))
    elif not out.quiet:
        print(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False), end="")


@devices_app.command("calibrate")
def devices_calibrate(name: Annotated[str, typer.Argument(help="Profile name.")]) -> None:
    """Recount the MACs of a profile's reference architecture and show the resulting throughput."""
    from .devices import PublishedCalibration, get_profile
    from .models.architectures import TEXT_LENGTH, build_unet
    from .models.stats import count_macs

    profile = get_profile(name)
    cal = getattr(profile.estimator, "calibration", None)
    if not isinstance(cal, PublishedCalibration):
        raise EdgesafeError(f"device {name!r} has no published reference figure to calibrate from")
    unet = build_unet(cal.reference_model, device="meta")
    macs = count_macs(unet, batch=cal.reference_batch, text_length=TEXT_LENGTH[cal.reference_model])
    out.say(f"{cal.reference_model} at batch {cal.reference_batch}: {macs} MACs (profile says {cal.reference_macs})")
    out.say(f"throughput: {macs / (cal.published_ms_per_step / 1000) / 1e9:.1f} GMAC/s")
    out.event("calibration", device=name, reference_macs=macs, profile_macs=cal.reference_macs)


@zoo_app.command("list")
def zoo_list() -> None:
    """List the embedded models and whether they are built."""
    from .zoo import WEIGHTS_DIR, ZOO

    for name, entry in ZOO.items():
        built = (WEIGHTS_DIR / name).is_dir()
        out.say(f"zoo:{name}  {'built' if built else 'not built'}  {entry.description}")
        out.event("zoo", name=name, built=built)


@zoo_app.command("build")
def zoo_build(
    name: Annotated[str, typer.Argument(help="Zoo entry to build (with its companions, e.g. its evaluator).")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write (default: the package's zoo).")] = None,
    work: Annotated[Path | None, typer.Option(help=(
        "Checkpoint folder; a rerun resumes from it "
        "(default: ~/.cache/edgesafe/build/, named by seed, schedule and architecture)."))] = None,
    seed: int = 0,
    schedule: Annotated[str, typer.Option(help="full (the shipped weights) or short (a smoke test).")] = "full",
) -> None:
    """Train an embedded model from scratch, resumably, and write it into the zoo."""
    from .zoo import WEIGHTS_DIR, load_builder

    builder = load_builder(name)
    if schedule not in builder.SCHEDULES:
        raise EdgesafeError(f"unknown schedule {schedule!r}; known: {', '.join(builder.SCHEDULES)}")
    work = work or (Path.home() / ".cache" / "edgesafe" / "build" /
                    f"{name}-{seed}-{schedule}-{builder.architecture_id()}")
    with out.progress() as progress:
        info = builder.build(out_dir or WEIGHTS_DIR, work=work, seed=seed, schedule=builder.SCHEDULES[schedule],
                             progress=lambda phase, step, total, loss: progress(phase, step, total))
    out.say(f"built {name} in {info['build_seconds']:.0f} s -> {out_dir or WEIGHTS_DIR}")
    out.event("built", **info)


@zoo_app.command("standin")
def zoo_standin(
    arch: Annotated[str, typer.Argument(help="Published architecture: sd-1.5 or sd-2.1-base.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Pipeline folder to write.")],
    images: Annotated[Path | None, typer.Option(help="Also write a captioned image folder here.")] = None,
    count: Annotated[int, typer.Option(help="How many captioned images.")] = 24,
    size: Annotated[int, typer.Option(help="Their size in pixels.")] = 256,
    seed: int = 0,
) -> None:
    """Write a random-weight pipeline of a published SD architecture (no download), for trying the
    real-size path: every stage runs on it as on the real model, with meaningless images."""
    from .models.standin import write_captioned_images, write_standin

    if count < 1 or size < 8:
        raise EdgesafeError("--count must be at least 1 and --size at least 8")
    write_standin(arch, out_dir, seed=seed)
    out.say(f"wrote a random-weight {arch} pipeline -> {out_dir}")
    if images is not None:
        write_captioned_images(images, count=count, size=size, seed=seed)
        out.say(f"wrote {count} captioned images ({size} px) -> {images}")
    out.event("standin", arch=arch, folder=str(out_dir), images=str(images) if images else None)


def run() -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code instead of raising
    except EdgesafeError as exc:
        out.error(str(exc))
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        out.error("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        out.error("interrupted")
        sys.exit(130)
    except Exception as exc:
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):  # click usage errors
            exc.show()
            sys.exit(exc.exit_code)
        from .io import out_of_space

        if out_of_space(exc):  # a write outside edgesafe's atomic ones (a library's own save)
            where = getattr(exc, "filename", None) or "a write"
            out.error(f"{where}: no space left on the device; free some space and rerun with --resume")
            sys.exit(2)
        raise
    sys.exit(code if isinstance(code, int) else 0)
