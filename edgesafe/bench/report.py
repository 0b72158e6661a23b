"""The bench report: one JSON document (schema ``edgesafe-bench-report``, :data:`SCHEMA_VERSION`, described
by ``report.schema.json`` beside this file) with every subject's size, latency, memory, quality and
safety, the erasure-after-every-stage table and the recipe's gates.

Subjects, prompt sets, detectors and devices are keyed by name, so a later source of figures (an
on-device runner's report under ``subjects.<name>.latency.devices.<device>``, an adversarial prompt set)
adds keys rather than changing the shape.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import EdgesafeError

SCHEMA_NAME = "edgesafe-bench-report"
SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")


@cache
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate(report: Any, *, source: str = "report") -> None:
    """Raise :class:`EdgesafeError` (one line) unless ``report`` is a bench report of this schema version."""
    import jsonschema

    if not isinstance(report, dict) or report.get("schema") != SCHEMA_NAME:
        raise EdgesafeError(f"{source}: not an edgesafe bench report (no \"schema\": \"{SCHEMA_NAME}\")")
    if report.get("schema_version") != SCHEMA_VERSION:
        raise EdgesafeError(f"{source}: report schema version {report.get('schema_version')!r}; this edgesafe "
                            f"reads version {SCHEMA_VERSION} (rerun `edgesafe bench` to rewrite it)")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(report))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise EdgesafeError(f"{source}: {where}: {error.message}")


def edge_subject(subjects: list[str], runtime: str) -> str:
    """The artefact the recipe's device runs: the last (most compressed) export variant of its runtime,
    else the fine-tuned student."""
    prefix = {"coreml": "coreml/", "onnxruntime": "onnx/", "openvino": "openvino/"}.get(runtime, "onnx/")
    exported = [s for s in subjects if s.startswith(prefix)]
    return exported[-1] if exported else "finetuned"


def erasure(recipe, safety: dict[str, dict], order: list[str], stage_of: dict[str, str]) -> dict:
    """Per concept and prompt set, each subject's rate; subjects made after fine-tuning whose rate exceeds the
    fine-tuned student's by more than ``bench.erasure_tolerance`` are flagged."""
    tolerance = recipe.bench.erasure_tolerance
    rates: dict[str, dict[str, dict[str, float]]] = {}
    flags = []
    for concept in recipe.concepts:
        for set_name in recipe.bench.prompt_sets:
            row = {s: safety[s][concept.name][set_name]["rate"] for s in order
                   if "rate" in safety[s][concept.name][set_name]}
            if not row:
                continue
            rates.setdefault(concept.name, {})[set_name] = row
            reference = row.get("finetuned")
            for s, value in row.items():
                if reference is not None and stage_of[s] == "export" and value > reference + tolerance:
                    flags.append({"subject": s, "concept": concept.name, "set": set_name, "rate": value,
                                  "finetuned_rate": reference})
    return {"reference": "finetuned", "tolerance": tolerance, "subjects": order, "rates": rates, "flags": flags,
            "flag_count": len(flags)}


def recipe_gates(recipe, report: dict) -> list[dict]:
    """The recipe's own pass/fail criteria on the edge subject: every concept rate under the ceiling, prompt
    accuracy within the allowed drop from the teacher's, no stage letting a concept back in, and its weights
    within the device profile's memory budget."""
    from ..devices import get_profile
    from .check import Baseline, Gate, evaluate

    check, edge = recipe.check, report["edge_subject"]
    subject = report["subjects"][edge]
    gates = [Gate(metric="erasure.flag_count", max=0),
             Gate(metric=f"subjects.{edge}.size.bytes", max=get_profile(recipe.device).memory_budget_mb * 2**20)]
    for concept, per_set in subject["safety"].items():
        gates += [Gate(metric=f"subjects.{edge}.safety.{concept}.{s}.rate", max=check.max_concept_rate)
                  for s, figures in per_set.items() if "rate" in figures]
    teacher_acc = report["subjects"]["teacher"]["quality"].get("tiny-shapes", {}).get("prompt_accuracy")
    if teacher_acc is not None and "prompt_accuracy" in subject["quality"].get("tiny-shapes", {}):
        gates.append(Gate(metric=f"subjects.{edge}.quality.tiny-shapes.prompt_accuracy",
                          min=round(teacher_acc - check.max_prompt_accuracy_drop, 4)))
    return [{"metric": r.metric, "value": r.value, "rule": r.rule, "passed": r.passed}
            for r in evaluate(report, Baseline(gates=gates))]


def baseline_from_report(report: dict) -> dict:
    """Regression gates for CI from a report, with the tolerances of the recipe it was made with: each
    subject's speed-up over the teacher (of the UNet step and end to end: what compression changes; the
    text encoder and VAE alone take too little time to gate on a shared host), concept rates, quality and
    export parity. The speed-up gates hold on the report's host only (see :mod:`edgesafe.bench.check`)."""
    from ..recipe import Recipe
    from .check import host_of

    recipe = Recipe.model_validate(report["run"]["recipe"])
    check = recipe.check
    gates: list[dict[str, Any]] = []
    for name, subject in report["subjects"].items():
        base = f"subjects.{name}"
        for part, value in subject["latency"].get("speedup_vs_teacher", {}).items():
            if name != "teacher" and part in ("unet_step", "end_to_end"):
                gates.append({"metric": f"{base}.latency.speedup_vs_teacher.{part}", "baseline": value,
                              "max_regression": check.max_speed_regression, "same_host": True})
        for concept, per_set in subject["safety"].items():
            for set_name, figures in per_set.items():
                if "rate" in figures:
                    ceiling = max(check.max_concept_rate, figures["rate"] + check.concept_rate_slack)
                    gates.append({"metric": f"{base}.safety.{concept}.{set_name}.rate", "max": round(ceiling, 4)})
        quality = subject["quality"]
        shapes = quality.get("tiny-shapes", {})
        if "prompt_accuracy" in shapes:
            gates.append({"metric": f"{base}.quality.tiny-shapes.prompt_accuracy",
                          "min": round(shapes["prompt_accuracy"] - check.max_prompt_accuracy_drop, 4)})
        for scorer, key in (("tiny-shapes", "fid_vs_real"), ("clip", "clip_fid_vs_real")):
            if key in quality.get(scorer, {}):
                gates.append({"metric": f"{base}.quality.{scorer}.{key}", "baseline": quality[scorer][key],
                              "max_regression": check.max_fid_increase, "higher_is_better": False})
        if "psnr_db_vs_teacher" in quality.get("fidelity", {}):
            gates.append({"metric": f"{base}.quality.fidelity.psnr_db_vs_teacher",
                          "min": round(quality["fidelity"]["psnr_db_vs_teacher"] - check.max_psnr_drop_db, 3)})
        parity = subject.get("parity", {})
        if "image_psnr_db" in parity and parity.get("tolerance_psnr_db") is not None:
            gates.append({"metric": f"{base}.parity.image_psnr_db", "min": parity["tolerance_psnr_db"]})
    gates.append({"metric": "erasure.flag_count", "max": 0})
    return {"about": {"written_from": report["run"]["folder"], "recipe": recipe.name,
                      "schema_version": report["schema_version"], "edgesafe": report["environment"]["edgesafe"]},
            "host": host_of(report), "gates": gates}
