"""``edgesafe check``: a bench report and a baseline in, a list of gate results (and a CI exit code) out;
``write_baseline`` makes a baseline from a report with its recipe's tolerances.

A baseline is JSON: ``{"gates": [{"metric": "a.b.c", ...}, ...]}`` (and an optional ``about``). A metric
is a dotted path into the report (``subjects.onnx/fp32.latency.speedup_vs_teacher.end_to_end``). Each
gate sets any of

- ``min`` / ``max``: absolute bounds;
- ``baseline`` with ``max_regression``: the value may be worse than ``baseline`` by at most that
  fraction of it, "worse" meaning lower unless ``higher_is_better`` is false;
- ``same_host``: the figure depends on the machine (a speed-up of onnxruntime over PyTorch is not the
  same on an AVX-512 Xeon and on an AVX2 EPYC), so the gate holds only where the report's host (CPU,
  threads, vector extensions) is the baseline's ``host``; elsewhere it is skipped and said so, or, with
  ``require_same_host``, the check stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import EdgesafeError
from ..io import read_json


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = Field(min_length=1)
    min: float | None = None
    max: float | None = None
    baseline: float | None = None
    max_regression: float | None = Field(default=None, ge=0)
    higher_is_better: bool = True
    same_host: bool = False

    @model_validator(mode="after")
    def _has_bound(self) -> Gate:
        if self.min is None and self.max is None and self.max_regression is None:
            raise ValueError("a gate needs 'min', 'max' or 'max_regression'")
        if (self.baseline is None) != (self.max_regression is None):
            raise ValueError("'baseline' and 'max_regression' go together")
        return self


class Baseline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    about: dict[str, Any] = Field(default_factory=dict)
    """Where the gates came from (report, recipe, versions): information only."""
    host: dict[str, Any] | None = None
    """The machine the baseline's report was measured on (:func:`host_of`); ``same_host`` gates need it."""
    gates: list[Gate] = Field(min_length=1)

    @model_validator(mode="after")
    def _host_for_host_gates(self) -> Baseline:
        if self.host is None and any(g.same_host for g in self.gates):
            raise ValueError("'same_host' gates need the baseline's 'host'")
        return self


@dataclass(frozen=True)
class GateResult:
    metric: str
    value: float | None
    passed: bool
    rule: str
    skipped: str | None = None
    """Why a gate was not judged (a ``same_host`` gate on a report from another host); ``passed`` is then
    true."""


HOST_KEYS = ("cpu", "threads", "isa")


def host_of(report: dict) -> dict[str, Any]:
    """What makes a latency ratio comparable: the CPU's name, the threads used and its vector extensions."""
    env = report["environment"]
    return {key: env.get(key) for key in HOST_KEYS}


def describe_host(host: dict[str, Any]) -> str:
    isa = host.get("isa")
    return f"{host.get('cpu')}, {host.get('threads')} threads" + (f", {' '.join(isa)}" if isa else "")


def lookup(report: Any, dotted: str) -> Any:
    node = report
    for key in dotted.split("."):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def evaluate(report: Any, baseline: Baseline, *, require_same_host: bool = False) -> list[GateResult]:
    """Every gate's result; a metric the report lacks (or that is not a number) is an :class:`EdgesafeError`,
    since a gate that cannot be evaluated says nothing about the model. ``same_host`` gates are skipped
    where the report comes from another host than the baseline's, or stop the check with
    ``require_same_host``."""
    other_host = None
    if baseline.host is not None and any(g.same_host for g in baseline.gates):
        here = host_of(report)
        if here != baseline.host:
            other_host = (f"the baseline's host is {describe_host(baseline.host)}; "
                          f"this report's is {describe_host(here)}")
            if require_same_host:
                raise EdgesafeError(f"--require-same-host: {other_host}")
    results = []
    for gate in baseline.gates:
        value = lookup(report, gate.metric)
        if not isinstance(value, int | float) or isinstance(value, bool):
            found = "is not in the report" if value is None else f"is not a number ({type(value).__name__})"
            raise EdgesafeError(f"baseline gate {gate.metric}: the metric {found}")
        rules, ok = [], True
        if gate.min is not None:
            rules.append(f">= {gate.min:g}")
            ok &= value >= gate.min
        if gate.max is not None:
            rules.append(f"<= {gate.max:g}")
            ok &= value <= gate.max
        if gate.baseline is not None and gate.max_regression is not None:
            slack = abs(gate.baseline) * gate.max_regression
            if gate.higher_is_better:
                limit = gate.baseline - slack
                rules.append(f">= {limit:g} (baseline {gate.baseline:g} - {gate.max_regression:.0%})")
                ok &= value >= limit
            else:
                limit = gate.baseline + slack
                rules.append(f"<= {limit:g} (baseline {gate.baseline:g} + {gate.max_regression:.0%})")
                ok &= value <= limit
        skipped = other_host if gate.same_host else None
        results.append(GateResult(gate.metric, float(value), bool(ok) or skipped is not None, ", ".join(rules),
                                  skipped))
    return results


def read_report(path: Path) -> dict:
    """A bench report file, validated against the report schema of this version."""
    from .report import validate

    report = read_json(path, "report")
    validate(report, source=str(path))
    return report


def write_baseline(report_path: Path, out: Path) -> int:
    """Write gates made from a report (see :func:`edgesafe.bench.report.baseline_from_report`); return how many."""
    from ..io import write_json
    from .report import baseline_from_report

    baseline = baseline_from_report(read_report(report_path))
    Baseline.model_validate(baseline)
    write_json(out, baseline)
    return len(baseline["gates"])


def check(report_path: Path, baseline_path: Path, *, require_same_host: bool = False) -> list[GateResult]:
    """Evaluate every gate of the baseline file against the report file."""
    report = read_report(report_path)
    raw = read_json(baseline_path, "baseline")
    try:
        baseline = Baseline.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise EdgesafeError(f"{baseline_path}: {where}: {err['msg']}") from None
    return evaluate(report, baseline, require_same_host=require_same_host)
