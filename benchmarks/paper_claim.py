"""Bilevel fine-tuning against two-stage on tiny-shapes, compared fairly: a sweep of every method's
erase-strength knob under both unlearning objectives and several training seeds, Pareto fronts of the
unwanted-concept rate against quality with paired bootstrap intervals, and the shipped recipe's student.

    python benchmarks/paper_claim.py [--only METHOD ...] [--seeds 3] [--limit N] [--jobs N]   # run (resumable)
    python benchmarks/paper_claim.py --report                                                 # write the results

The sweep runs in two phases, each resumable per cell. The probe fine-tunes the recipe's pruned student (pruned
once) at every point of each method's knob grid (seed 0, the recipe's lower-level steps) and reads held-out losses
only (``Trainer.held_out_losses``: the distillation loss, and each concept's unlearning loss against its
concept prompts' distillation loss, on data training never draws); from them it chooses, per method and
objective, the settings on that method's held-out trade-off that kd does not beat (``choose``), and only those are
scored with images, on every training seed (seed 0 reuses the probe's checkpoint). A two-stage cell's distillation
phase is its seed's kd run step for step, so it continues from that run's final checkpoint and runs only its erase
steps; its record counts both runs' wall time and gradient evaluations. A scored cell is evaluated
on 8 noise seeds over the bench's full wanted-prompt distribution (96 prompts covering every template and
synonym) and over 16 direct and 16 paraphrase prompts per concept from the world's prompt generator (more and
more varied than the recipe's own).

Every training record and scored cell is a small JSON file under ``--cells`` (per-image hits kept for the
bootstrap; ``chosen.json`` holds the probe's choice), committed beside the results so that the sweep grows
across machines and sessions. The pruned student, the training folders and the reference features live under
``--work`` (scratch, made again when missing). ``--report`` reads whatever cells exist and writes
paper_claim.json and pareto.png. A scored cell records the hash of the world's evaluator that read it and of the
pruned student it started from; when either changes the cell is scored again, from its final checkpoint where
the scratch folder still holds it (trained again where it does not). Cells run one after another in each of
``--jobs`` processes (several share one GPU well: the model is tiny), each claiming a cell before it starts it;
wall time, gradient evaluations (samples through a training forward of the student or phi), the commit and the
hardware are recorded per cell. On a GPU the cells train and generate there.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from harness import ROOT, provenance  # noqa: E402

from edgesafe.data import wanted_prompts  # noqa: E402
from edgesafe.finetune.trainer import Trainer, stage_reads  # noqa: E402
from edgesafe.io import load_tensors, save_tensors, write_json  # noqa: E402
from edgesafe.measure.images import frechet_distance, generate
from edgesafe.models.loading import load_evaluator, load_pipeline  # noqa: E402
from edgesafe.models.structure import read_structure  # noqa: E402
from edgesafe.pipeline import PRUNE, TEACHER  # noqa: E402
from edgesafe.recipe import recipe_from_dict  # noqa: E402
from edgesafe.runs import RunDir, run_stages  # noqa: E402
from edgesafe.training import Checkpoints  # noqa: E402
from edgesafe.zoo.tiny_shapes import world  # noqa: E402
from edgesafe.zoo.tiny_shapes.metrics import real_images  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny-shapes.yaml"
RESULTS = Path(__file__).parent / "results"
EVAL_SEEDS = list(range(1000, 1008))
CONCEPT_PROMPTS = 16
REAL_SEED = 24680
HELD_OUT_BATCHES = 16
"""Held-out batches behind every trained cell's losses (``Trainer.held_out_losses``)."""
CHOSEN = 3
"""Settings per (method, objective) that the probe passes on to the image sweep."""
AUTHORS_LOWER = {"finetune.lower.denoise": 1.0, "finetune.lower.output_kd": 2.0, "finetune.lower.feature_kd": 0.1,
                 "finetune.lower.min_snr_gamma": 5.0}
BOTH = ("esd", "ablation")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# method -> (fixed settings, objectives, its knob's probe grid: label -> settings); upper_lr is the recipe's lr
# unless a setting names it (the authors' variant: 5x, their ratio). The probe trains every grid point once and
# passes CHOSEN of them per objective on to the image sweep (choose()).
def two_stage_grid() -> dict[str, dict]:
    return {f"erase{n}-lr{lr:g}": {"finetune.erase_steps": n, "finetune.upper_lr": lr}
            for n, lr in [*((n, 1e-3) for n in (8, 15, 30, 60, 120)), (30, 5e-4), (30, 4e-3)]}


METHODS: dict[str, tuple[dict, tuple[str, ...], dict[str, dict]]] = {
    "ddpm": ({"finetune.solver": "kd", "finetune.lower.output_kd": 0.0, "finetune.lower.feature_kd": 0.0},
             ("none",), {"-": {}}),
    "kd": ({"finetune.solver": "kd"}, ("none",), {"-": {}}),
    "two-stage": ({"finetune.solver": "two-stage"}, BOTH, two_stage_grid()),
    "two-stage-esd": ({"finetune.solver": "two-stage", "finetune.erase_against": "distilled",
                       "finetune.upper_latents": "model-samples"}, ("esd",), two_stage_grid()),
    "bilevel-alternating": ({"finetune.solver": "bilevel-alternating"}, BOTH, {  # both of its erase knobs
        **{f"every{n}": {"finetune.upper_every": n} for n in (1, 2, 5, 10, 20)},
        **{f"every5-ulr{lr:g}": {"finetune.upper_every": 5, "finetune.upper_lr": lr} for lr in (5e-4, 8e-3)}}),
    "authors": ({"finetune.solver": "bilevel-alternating", "finetune.upper_latents": "concept-images",
                 **AUTHORS_LOWER}, ("esd",), {f"every{n}": {"finetune.upper_every": n} for n in (2, 5, 10, 20, 40)}),
    "bilevel-penalty": ({"finetune.solver": "bilevel-penalty"}, BOTH, {
        f"lambda{lam}": {"finetune.penalty_lambda": lam} for lam in (0.1, 0.3, 1.0, 3.0, 10.0)}),
    "constrained": ({"finetune.solver": "constrained"}, BOTH, {  # the held-out erasure ratios the probe spans
        f"ratio{r}": {"finetune.erase_ratio": r} for r in (0.6, 0.7, 0.8, 1.0, 1.5, 2.0, 3.0)}),
    "default": ({}, ("recipe",), {"-": {}}),
}
BILEVEL = ("bilevel-alternating", "authors", "bilevel-penalty", "constrained")
TWO_STAGE = ("two-stage", "two-stage-esd")


def cell_recipe(method: str, objective: str, setting: str, seed: int, steps: int | None = None):
    """The recipe of one cell: the shipped tiny-shapes recipe with the method's settings, every concept on
    ``objective`` (ESD guides away from the concept; ablation maps it onto its anchor)."""
    data = yaml.safe_load(RECIPE.read_text())
    fixed, _, settings = METHODS[method]
    if method != "default":  # the method's own lower-level weights; the recipe's for the default cell
        data["finetune"].pop("lower", None)
        kept = ("steps", "batch_size", "lr", "lr_schedule", "lr_warmup_steps", "checkpoint_every")
        for key in [k for k in data["finetune"] if k not in kept]:
            data["finetune"].pop(key)
        data["finetune"]["upper_lr"] = data["finetune"]["lr"]
    if objective in BOTH:
        data["concepts"] = [{**c, "objective": objective} for c in data["concepts"]]
    if method == "authors":
        data["finetune"]["upper_lr"] = 5 * data["finetune"]["lr"]  # the authors' ratio
    overrides = {**fixed, **settings[setting], "seed": seed, "finetune.checkpoint_every": 10**6,
                 **({"finetune.steps": steps} if steps else {})}
    return recipe_from_dict(data, source=str(RECIPE), overrides=overrides)


Cell = tuple[str, str, str, int]  # (method, objective, setting, seed)
KD: Cell = ("kd", "none", "-", 0)
"""The probe's reference: distillation alone."""


def grid(only: list[str] | None) -> list[Cell]:
    """The probe: every method's every objective and grid setting, once (seed 0)."""
    return [(m, o, s, 0) for m, (_, objectives, settings) in METHODS.items()
            if not only or m in only for o in objectives for s in settings]


def cell_path(cells_dir: Path, cell: Cell) -> Path:
    """A cell with its images scored."""
    method, objective, setting, seed = cell
    return cells_dir / method / objective / setting / f"seed{seed}.json"


def trained_path(cells_dir: Path, cell: Cell) -> Path:
    """A cell's training record: wall time, gradient evaluations and held-out losses, no images."""
    method, objective, setting, seed = cell
    return cells_dir / "trained" / method / objective / setting / f"seed{seed}.json"


def erasure(held: dict, objective: str) -> float:
    """Mean over the concepts of the held-out unlearning loss under ``objective`` against the concept prompts'
    distillation loss (``Trainer.held_out_losses``): below 1 once the student predicts the objective's target
    rather than the teacher."""
    names = [k.split(".", 1)[1] for k in held if k.startswith("concept_kd.")]
    return statistics.fmean(held[f"unlearn.{n}.{objective}"] / max(held[f"concept_kd.{n}"], 1e-12) for n in names)


def choose(points: dict[str, tuple[float, float]], reference: tuple[float, float], k: int = CHOSEN) -> list[str]:
    """Up to ``k`` settings spread along one method's held-out trade-off, (erasure, distillation loss) per
    setting, lower is better for both: of the settings that neither another setting nor kd (``reference``)
    beats on both, the strongest eraser, the weakest and those evenly between; where kd beats them all, the
    ``k`` strongest erasers, so that the front shows what the method can reach."""
    everyone = [*points.values(), reference]

    def beaten(v: tuple[float, float]) -> bool:
        return any(q[0] <= v[0] and q[1] <= v[1] and q != v for q in everyone)

    front = sorted((v, s) for s, v in points.items() if not beaten(v))
    if not front:
        front = sorted((v, s) for s, v in points.items())[:k]
    if len(front) > k:
        front = [front[round(i * (len(front) - 1) / max(1, k - 1))] for i in range(k)]
    return [setting for _, setting in front]


def chosen_settings(cells_dir: Path, only: list[str] | None) -> dict:
    """Per method and objective, the probe's grid points (held-out erasure and distillation loss) and the
    settings passed on to the image sweep."""
    records = {c: json.loads(trained_path(cells_dir, c).read_text()) for c in grid(only)}
    kd = json.loads(trained_path(cells_dir, KD).read_text())
    out: dict[str, dict] = {}
    for (method, objective, setting, _), record in records.items():
        entry = out.setdefault(method, {}).setdefault(objective, {"points": {}})
        held = record["held_out"]
        entry["points"][setting] = {"distill": held["output_kd"], "train_seconds": record["train_seconds"],
                                    **({"erasure": erasure(held, objective)} if objective in BOTH else {})}
    for objectives in out.values():
        for objective, entry in objectives.items():
            pts = entry["points"]
            if objective not in BOTH:
                entry["chosen"] = list(pts)
                continue
            entry["kd"] = {"erasure": erasure(kd["held_out"], objective), "distill": kd["held_out"]["output_kd"]}
            entry["chosen"] = choose({s: (v["erasure"], v["distill"]) for s, v in pts.items()},
                                     (entry["kd"]["erasure"], entry["kd"]["distill"]))
    return out


class Evaluation:
    """Images of a student on the fixed evaluation prompts, scored by the world's evaluator."""

    def __init__(self, recipe, evaluator):
        self.evaluator = evaluator
        digest = hashlib.sha256()
        for name, tensor in sorted(evaluator.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        self.evaluator_id = digest.hexdigest()[:12]
        """The hash of the evaluator's weights, recorded with every figure it reads."""
        self.wanted = wanted_prompts(recipe)
        self.concepts = {}
        for name in world.UNWANTED:
            for kind, paraphrase in (("direct", False), ("paraphrase", True)):
                prompts = [p.text for p in world.concept_prompts(name, paraphrase=paraphrase)]
                step = max(1, len(prompts) // CONCEPT_PROMPTS)
                self.concepts[(name, kind)] = prompts[::step][:CONCEPT_PROMPTS]

    def __call__(self, pipe) -> dict:
        images = generate(pipe, self.wanted, seeds=EVAL_SEEDS)
        names, features = self.evaluator.classify(images)
        asked = [world.parse_prompt(p) for p in self.wanted for _ in EVAL_SEEDS]
        hits = [all(getattr(a, h) in (None, names[h][i]) for h in world.HEADS) for i, a in enumerate(asked)]
        out = {"evaluator": self.evaluator_id, "wanted_hits": [int(h) for h in hits], "features": features}
        for (name, kind), prompts in self.concepts.items():
            concept = world.UNWANTED[name]
            cnames, _ = self.evaluator.classify(generate(pipe, prompts, seeds=EVAL_SEEDS))
            out[f"{name}.{kind}"] = [int(v == concept.value) for v in cnames[concept.head]]
        return out


class GradientCounter:
    """Samples through a training forward (grad enabled) of the given modules."""

    def __init__(self):
        self.samples = 0

    def attach(self, module: torch.nn.Module) -> None:
        def hook(_module, args, _kwargs=None):
            if torch.is_grad_enabled():
                self.samples += int(args[0].shape[0])

        module.register_forward_pre_hook(hook)


def train_folder(work: Path, cell: tuple[str, str, str, int]) -> Path:
    return work / "train" / "-".join(map(str, cell))


def scored(figures: dict, refs: dict) -> dict:
    """An evaluation's figures with its features turned into Frechet distances against the references."""
    features = figures.pop("features")
    return {"fid_vs_teacher": frechet_distance(features, refs["teacher"]),
            "fid_vs_real": frechet_distance(features, refs["real"]), **figures}


def current(record: dict, recipe, pruned_id: str) -> bool:
    """Whether a training record was made from this pruned student with the fine-tuning settings its solver reads
    (``stage_reads``, the fine-tune stage's own key: a setting of another solver does not make it stale)."""
    settings, made = recipe.finetune.model_dump(mode="json"), record.get("finetune", {})
    read = [p.removeprefix("finetune.") for p in stage_reads(recipe) if p.startswith("finetune.")]
    return record.get("pruned_student") == pruned_id and all(k in made and made[k] == settings[k] for k in read)


def continue_after_distillation(trainer: Trainer, kd_folder: Path) -> None:
    """Put a ``two-stage`` trainer at the end of its distillation phase: the final checkpoint of the kd run with
    the same seed and lower-level settings (what that phase computes, step for step) written as the trainer's
    own, so that ``trainer.run(resume=True)`` runs only the erase steps and ends where the whole run would."""
    _, tensors, state, header = Checkpoints(kd_folder / "checkpoints").load()
    modules = {"student": trainer.student, **({"aligner": trainer.aligner} if trainer.aligner is not None else {})}
    Checkpoints.restore(tensors, state, modules, {"lower_opt": trainer.solver.lower_opt})
    if trainer.solver.distilled is not None:
        trainer.solver.distilled.load_state_dict(trainer.student.state_dict())
    torch.set_rng_state(tensors["rng.torch"])
    trainer.save_checkpoint(int(state["step"]), json.loads(header["curves"]))


def distillation_cell(cell: Cell, steps: int | None = None) -> Cell | None:
    """The kd cell whose run is a two-stage cell's distillation phase (None for other methods): the same seed
    and every fine-tuning setting the same but the erase phase's."""
    if cell[0] not in TWO_STAGE:
        return None
    kd = ("kd", "none", "-", cell[3])
    erase_only = ("solver", "erase_steps", "upper_lr", "erase_against", "upper_latents")
    ours, theirs = ({k: v for k, v in cell_recipe(*c, steps=steps).finetune.model_dump().items()
                     if k not in erase_only} for c in (cell, kd))
    if ours != theirs:
        raise ValueError(f"{'/'.join(map(str, cell))}: its distillation settings are not kd's")
    return kd


def finished(cell: Cell, work: Path, cells_dir: Path, pruned_id: str, steps: int | None = None) -> dict | None:
    """The cell's training record where it was made from this pruned student with the cell's settings and the
    scratch folder still holds its final checkpoint; None otherwise."""
    path = trained_path(cells_dir, cell)
    pointer = train_folder(work, cell) / "checkpoints" / "latest.json"
    if not (path.is_file() and pointer.is_file()):
        return None
    record = json.loads(path.read_text())
    ok = current(record, cell_recipe(*cell, steps=steps), pruned_id) and \
        json.loads(pointer.read_text())["step"] == record["steps"]
    return record if ok else None


def train(cell: Cell, work: Path, cells_dir: Path, teacher, pruned_dir: Path, pruned_id: str,
          steps: int | None = None):
    """The cell's fine-tuned student pipeline and its training record, written to :func:`trained_path`. A
    :func:`finished` cell is loaded, not trained again. A two-stage cell continues from its kd cell's final
    checkpoint (trained first where missing) and records the two runs' wall time and gradient evaluations
    together."""
    student = load_pipeline(pruned_dir).to(DEVICE)
    folder, path = train_folder(work, cell), trained_path(cells_dir, cell)
    recipe = cell_recipe(*cell, steps=steps)
    while (record := finished(cell, work, cells_dir, pruned_id, steps)) is None and not claim(path):
        time.sleep(10)  # another process is training this cell (a kd cell that two-stage cells continue from)
    if record is not None:
        tensors = Checkpoints(folder / "checkpoints").load()[1]
        student.unet.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("student.")})
        return student, record
    kd = None
    if (kd_cell := distillation_cell(cell, steps)) is not None:
        kd = finished(kd_cell, work, cells_dir, pruned_id, steps) or \
            train(kd_cell, work, cells_dir, copy.deepcopy(teacher), pruned_dir, pruned_id, steps)[1]
    method, objective, setting, seed = cell
    t0 = time.perf_counter()
    trainer = Trainer(teacher, student.unet, recipe, folder,
                      kept_channels=read_structure(pruned_dir / "unet")["kept_channels"])
    counter = GradientCounter()
    for module in (trainer.student, *trainer.solver.modules().values()):
        counter.attach(module)
    if kd is not None:
        continue_after_distillation(trainer, train_folder(work, kd_cell))
    result = trainer.run(resume=kd is not None, checkpoint_every=10**6)
    seconds = time.perf_counter() - t0
    tail = result.curves[-50:]
    record = {
        "cell": {"method": method, "objective": objective, "setting": setting, "seed": seed},
        **{k: provenance()[k] for k in ("commit", "versions", "hardware")}, "pruned_student": pruned_id,
        "finetune": recipe.finetune.model_dump(mode="json"),
        "train_seconds": round(seconds + (kd["train_seconds"] if kd else 0), 1),
        "gradient_samples": counter.samples + (kd["gradient_samples"] if kd else 0), "steps": result.steps,
        **({"continued_from": {"cell": "/".join(map(str, kd_cell)), "own_seconds": round(seconds, 1),
                               "own_gradient_samples": counter.samples}} if kd else {}),
        "final_losses": {k: statistics.fmean(r[k] for r in tail if k in r)
                         for k in ("lower", "upper") if any(k in r for r in tail)},
        "held_out": trainer.held_out_losses(HELD_OUT_BATCHES),
    }
    write_json(path, record)
    path.with_suffix(".claim").unlink(missing_ok=True)
    student.unet = result.student
    return student, record


def file_digest(folder: Path) -> str:
    """The hash of a folder's weight files: cells made in other sessions started from the same student."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def claim(path: Path) -> bool:
    """Whether this process may run the cell whose result goes to ``path``: no other live process claimed it
    (claiming a cell this process holds already succeeds)."""
    lock = path.with_suffix(".claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if (owner := int(lock.read_text() or 0)) == os.getpid():
                    return True
                os.kill(owner, 0)
                return False  # its owner is alive
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # a claim left by a process that died
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def sweep(args) -> None:
    work = args.work
    base = cell_recipe("default", "recipe", "-", 0)
    run = RunDir(work / "run")
    if not args.worker:
        run_stages(base, run, [TEACHER, PRUNE], resume=True)
    pruned_dir = run.root / PRUNE.folder
    pruned_id = file_digest(pruned_dir / "unet")
    teacher = load_pipeline(base.model.source).to(DEVICE)
    left = args.limit if args.limit is not None else 10**9  # trainings and scored cells this process may run

    def fresh_record(cell: Cell) -> bool:
        path = trained_path(args.cells, cell)
        return path.is_file() and current(json.loads(path.read_text()), cell_recipe(*cell, steps=args.steps), pruned_id)

    workers = [] if args.worker else [
        subprocess.Popen([sys.executable, __file__, "--worker", *sys.argv[1:]]) for _ in range(args.jobs - 1)]
    probe = [KD, *(c for c in grid(args.only) if c != KD)]
    while left > 0 and (pending := [c for c in probe if not fresh_record(c)]):  # the probe: no images
        ran = False
        for cell in pending:
            if left <= 0 or fresh_record(cell) or not claim(trained_path(args.cells, cell)):
                continue
            t0 = time.perf_counter()
            _, record = train(cell, work, args.cells, copy.deepcopy(teacher), pruned_dir, pruned_id, args.steps)
            left, ran = left - 1, True
            print(f"probe {'/'.join(map(str, cell))}: held-out {json.dumps(record['held_out'])} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if not ran:
            time.sleep(10)  # other processes are training the rest
    if left <= 0:
        for worker in workers:
            worker.wait()
        return
    chosen = chosen_settings(args.cells, args.only)
    if not args.worker:
        write_json(args.cells / "chosen.json", {"provenance": provenance(), "methods": chosen})

    evaluator = load_evaluator(base.model.evaluator).to(DEVICE)
    evaluation = Evaluation(base, evaluator)
    refs_path = work / "references.safetensors"
    teacher_path = args.cells / "teacher.json"

    def stale(path: Path) -> bool:  # read by another evaluator, or trained from another student or settings
        cell = json.loads(path.read_text())
        key = tuple(cell["cell"][k] for k in ("method", "objective", "setting", "seed"))
        return cell.get("evaluator") != evaluation.evaluator_id or not current(
            cell, cell_recipe(*key, steps=args.steps), pruned_id)

    if not args.worker and (not teacher_path.is_file() or json.loads(teacher_path.read_text()).get("evaluator")
                            != evaluation.evaluator_id or not refs_path.is_file()):
        figures = evaluation(teacher)
        _, real = evaluator.classify(real_images(2000, seed=REAL_SEED, exclude=tuple(world.UNWANTED)))
        save_tensors(refs_path, {"teacher": figures.pop("features"), "real": real})
        write_json(teacher_path, {**figures, "provenance": provenance()})
    while not refs_path.is_file():
        time.sleep(10)  # the first process is writing the references
    refs = load_tensors(refs_path)
    scored_cells = [(m, o, s, seed) for seed in range(args.seeds) for m, objectives in chosen.items()
                    for o, entry in objectives.items() for s in entry["chosen"]]  # seed-major: whole fronts first
    todo = [c for c in scored_cells if not cell_path(args.cells, c).is_file() or stale(cell_path(args.cells, c))]
    for n, cell in enumerate(todo):
        path = cell_path(args.cells, cell)
        if left <= 0:
            break
        if (path.is_file() and not stale(path)) or not claim(path):
            continue
        t0 = time.perf_counter()
        student, record = train(cell, work, args.cells, copy.deepcopy(teacher), pruned_dir, pruned_id, args.steps)
        torch.manual_seed(0)
        result = {**record, **scored(evaluation(student), refs)}
        write_json(path, result)
        path.with_suffix(".claim").unlink(missing_ok=True)
        left -= 1
        acc = statistics.fmean(result["wanted_hits"])
        rates = {k: round(statistics.fmean(v), 3) for k, v in result.items() if k.count(".") == 1 and "hits" not in k
                 and isinstance(v, list)}
        print(f"[{n + 1}/{len(todo)}] {'/'.join(map(str, cell))}: accuracy {acc:.3f} {rates} "
              f"fid_t {result['fid_vs_teacher']:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for worker in workers:
        worker.wait()


# --- the analysis ----------------------------------------------------------------------------------

def load_cells(cells_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*/*/*/seed*.json"))]


def concept_keys(cell: dict) -> dict[str, list[str]]:
    keys = [k for k in cell if k.count(".") == 1 and isinstance(cell[k], list)]
    return {kind: [k for k in keys if k.endswith("." + kind)] for kind in ("direct", "paraphrase")}


def point_figures(group: list[dict], index: dict[str, np.ndarray] | None = None) -> dict:
    """Mean over the seeds of one setting; ``index`` resamples images (the same for every point: paired)."""
    def mean(key: str) -> float:
        values = [np.asarray(c[key]) for c in group]
        return float(np.mean([v[index[key]] if index is not None else v for v in values]))

    keys = concept_keys(group[0])
    out = {"prompt_accuracy": mean("wanted_hits")}
    for kind, names in keys.items():
        per = {k.split(".")[0]: mean(k) for k in names}
        out[f"concept_rate_{kind}"] = max(per.values())
        out[f"concept_rates_{kind}"] = per
    return out


def pareto(points: list[dict]) -> list[dict]:
    """Points no other point beats on both concept rate (direct, lower) and prompt accuracy (higher)."""
    return [p for p in points if not any(
        q["concept_rate_direct"] <= p["concept_rate_direct"] and q["prompt_accuracy"] >= p["prompt_accuracy"]
        and (q["concept_rate_direct"], q["prompt_accuracy"]) != (p["concept_rate_direct"], p["prompt_accuracy"])
        for q in points)]


def interpolate(front: list[dict], x_key: str, y_key: str, x: float) -> float | None:
    """``y_key`` on the front at ``x_key`` = x, linearly between the two nearest points (None outside)."""
    pts = sorted((p[x_key], p[y_key]) for p in front)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if pts and pts[0][0] <= x <= pts[-1][0]:
        return pts[0][1]
    return None


def headlines(groups: dict, method_of: dict, index=None) -> dict:
    """Per method (its objective chosen per method as its best): rate at matched quality and quality at 5%."""
    points = {key: {**point_figures(g, index), "key": key} for key, g in groups.items()}
    kd = [p for k, p in points.items() if method_of[k] == "kd"]
    kd_acc = statistics.fmean(p["prompt_accuracy"] for p in kd) if kd else None
    out = {}
    for method in {m for m in method_of.values() if m not in ("kd", "ddpm", "default")}:
        front = pareto([p for k, p in points.items() if method_of[k] == method])
        rate = None if kd_acc is None else interpolate(front, "prompt_accuracy", "concept_rate_direct", kd_acc - 0.02)
        if rate is None and kd_acc is not None and any(p["prompt_accuracy"] >= kd_acc - 0.02 for p in front):
            rate = min(p["concept_rate_direct"] for p in front if p["prompt_accuracy"] >= kd_acc - 0.02)
        quality = interpolate(front, "concept_rate_direct", "prompt_accuracy", 0.05)
        if quality is None and any(p["concept_rate_direct"] <= 0.05 for p in front):
            quality = max(p["prompt_accuracy"] for p in front if p["concept_rate_direct"] <= 0.05)
        out[method] = {"rate_at_matched_quality": rate, "quality_at_rate_5pct": quality}
    return {"kd_prompt_accuracy": kd_acc, "methods": out}


def with_interval(samples: list[float | None], value: float | None) -> dict:
    finite = [s for s in samples if s is not None]
    if value is None or len(finite) < len(samples) / 2:
        return {"value": value, "ci95": None, "bootstrap_defined": len(finite) / max(1, len(samples))}
    return {"value": value, "ci95": [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))],
            "bootstrap_defined": len(finite) / len(samples)}


def report(args) -> None:
    all_cells = load_cells(args.cells)
    if not all_cells:
        sys.exit(f"no finished cells under {args.cells}")
    teacher = json.loads((args.cells / "teacher.json").read_text())
    groups: dict[tuple, list[dict]] = {}
    for c in all_cells:
        k = c["cell"]
        groups.setdefault((k["method"], k["objective"], k["setting"]), []).append(c)
    method_of = {k: k[0] for k in groups}
    # the front of a method is over its settings and objectives: a user picks both
    index_keys = [k for k in all_cells[0] if isinstance(all_cells[0][k], list)]
    rng = np.random.default_rng(0)
    value = headlines(groups, method_of)
    boot = [headlines(groups, method_of, {k: rng.integers(0, len(all_cells[0][k]), len(all_cells[0][k]))
                                          for k in index_keys}) for _ in range(args.bootstrap)]
    figures = ("prompt_accuracy", "concept_rate_direct", "concept_rate_paraphrase", "fid_vs_teacher", "fid_vs_real",
               "train_seconds", "gradient_samples")
    fronts, methods = {}, {}
    for key, group in sorted(groups.items()):
        per_seed = [{**point_figures([c]), **{f: c[f] for f in figures[3:]}} for c in group]
        entry = {f: statistics.fmean(s[f] for s in per_seed) for f in figures}
        entry.update({f"{f}_std": statistics.stdev(s[f] for s in per_seed) if len(per_seed) > 1 else 0.0
                      for f in figures})
        entry.update(setting=key[2], objective=key[1], seeds=len(group),
                     concept_rates_direct=point_figures(group)["concept_rates_direct"],
                     concept_rates_paraphrase=point_figures(group)["concept_rates_paraphrase"])
        fronts.setdefault(key[0], []).append(entry)
    for method, entries in fronts.items():
        best = pareto(entries)
        for e in entries:
            e["on_front"] = e in best
        methods[method] = min(entries, key=lambda e: (e["concept_rate_direct"] > 0.05, -e["prompt_accuracy"]))
    rate = {m: with_interval([b["methods"].get(m, {}).get("rate_at_matched_quality") for b in boot],
                             v["rate_at_matched_quality"]) for m, v in value["methods"].items()}
    quality = {m: with_interval([b["methods"].get(m, {}).get("quality_at_rate_5pct") for b in boot],
                                v["quality_at_rate_5pct"]) for m, v in value["methods"].items()}

    def best_of(names):
        known = [m for m in names if rate.get(m, {}).get("value") is not None]
        return min(known, key=lambda m: rate[m]["value"]) if known else None

    bilevel, two_stage = best_of(BILEVEL), best_of(TWO_STAGE)
    comparison = None
    if bilevel and two_stage:  # paired: every bootstrap resample draws the same images for both
        comparison = {"best_bilevel_minus_two_stage_best": {}}
        for name, figure in (("rate_at_matched_quality", rate), ("quality_at_rate_5pct", quality)):
            a, b = figure[bilevel]["value"], figure[two_stage]["value"]
            diffs = [None if x is None or y is None else x - y for x, y in
                     ((r["methods"][bilevel][name], r["methods"][two_stage][name]) for r in boot)]
            comparison["best_bilevel_minus_two_stage_best"][name] = with_interval(
                diffs, None if a is None or b is None else a - b)
    premise = None
    if "kd" in methods and "ddpm" in methods:
        premise = {"kd_concept_rate_direct": methods["kd"]["concept_rate_direct"],
                   "ddpm_concept_rate_direct": methods["ddpm"]["concept_rate_direct"],
                   "kd_concept_rates": methods["kd"]["concept_rates_direct"],
                   "ddpm_concept_rates": methods["ddpm"]["concept_rates_direct"],
                   "distillation_carries_the_concepts":
                       methods["kd"]["concept_rate_direct"] > methods["ddpm"]["concept_rate_direct"]}
    shipped = yaml.safe_load(RECIPE.read_text())["finetune"]["solver"]
    default = methods.get("default")
    chosen = args.cells / "chosen.json"
    write_json(args.out, {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "provenance": provenance(),
        "methods": methods,
        "fronts": fronts,
        "kd_prompt_accuracy": value["kd_prompt_accuracy"],
        "rate_at_matched_quality": rate,
        "quality_at_rate_5pct": quality,
        "best_bilevel": bilevel,
        "two_stage_best": two_stage,
        "comparison": comparison,
        "default_solver": shipped,
        "premise": premise,
        "probe": json.loads(chosen.read_text()) if chosen.is_file() else None,
        "teacher": {"commit": teacher["provenance"]["commit"],
                    "prompt_accuracy": statistics.fmean(teacher["wanted_hits"]),
                    "concept_rates": {k: statistics.fmean(v) for k, v in teacher.items() if k.count(".") == 1}},
        "default_recipe": None if default is None else {
            "prompt_accuracy": default["prompt_accuracy"], "kd_prompt_accuracy": value["kd_prompt_accuracy"],
            "concept_rate_direct_max": default["concept_rate_direct"],
            "concept_rate_paraphrase_max": default["concept_rate_paraphrase"]},
        "evaluation": {"noise_seeds": len(EVAL_SEEDS), "wanted_prompts": "the bench's 96 coverage prompts",
                       "concept_prompts_per_set": CONCEPT_PROMPTS, "bootstrap_resamples": args.bootstrap,
                       "bootstrap": "paired over evaluation images (every method's cells resampled with the same "
                                    "indices); the spread over training seeds is each figure's _std",
                       "matched_quality": "kd's prompt accuracy minus 2 points, interpolated along each front",
                       "cells": len(all_cells),
                       "cell_commits": sorted({c.get("commit") or "unrecorded" for c in all_cells}),
                       "evaluators": sorted({c.get("evaluator") or "unrecorded" for c in all_cells}),
                       "pruned_students": sorted({c.get("pruned_student") or "unrecorded" for c in all_cells})},
    })
    plot(fronts, args.out.with_name("pareto.png"))


def plot(fronts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, entries in sorted(fronts.items()):
        for ax, y in zip(axes, ("prompt_accuracy", "fid_vs_teacher"), strict=True):
            pts = sorted((e["concept_rate_direct"], e[y]) for e in entries)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o", label=method, ms=4)
    for ax, y in zip(axes, ("prompt accuracy (higher is better)", "FID vs teacher (lower is better)"), strict=True):
        ax.set_xlabel("unwanted-concept rate, direct prompts (max over concepts)")
        ax.set_ylabel(y)
        ax.axvline(0.05, color="grey", lw=0.5, ls="--")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "paper_claim",
                        help="scratch: the pruned student, training folders and reference features")
    parser.add_argument("--cells", type=Path, default=RESULTS / "paper_claim_cells",
                        help="the finished cells (small JSON files, committed)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="lower-level steps instead of the recipe's (a quick check of the code path: use "
                             "other --cells and --work)")
    parser.add_argument("--only", nargs="+", choices=list(METHODS))
    parser.add_argument("--limit", type=int, default=None, help="stop after this many trainings and scored cells")
    parser.add_argument("--report", action="store_true", help="write the results from the finished cells")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS / "paper_claim.json")
    parser.add_argument("--jobs", type=int, default=1, help="processes running cells side by side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 leaves a core free for other work on a 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report(args) if args.report else sweep(args)


if __name__ == "__main__":
    main()
