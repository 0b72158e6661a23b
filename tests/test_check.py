"""The gate's rules on a report-shaped document (the bench's real reports: test_bench_run)."""

import json

import pytest

from edgesafe.bench.check import Baseline, evaluate
from edgesafe.errors import EdgesafeError

REPORT = {"student": {"safety": {"concept_rate_direct": 0.04}, "quality": {"fid": 12.0, "prompt_accuracy": 0.9}},
          "environment": {"cpu": "Intel(R) Xeon(R) Processor", "threads": 2, "isa": ["avx2", "avx512f"]}}


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_gates_pass_and_fail():
    gates = Baseline.model_validate({"gates": [
        {"metric": "student.safety.concept_rate_direct", "max": 0.05},
        {"metric": "student.quality.prompt_accuracy", "baseline": 0.92, "max_regression": 0.05},
        {"metric": "student.quality.fid", "baseline": 10.0, "max_regression": 0.1, "higher_is_better": False},
    ]})
    results = evaluate(REPORT, gates)
    assert [r.passed for r in results] == [True, True, False]
    assert results[2].value == 12.0 and "<= 11" in results[2].rule


def test_same_host_gates_hold_on_the_baselines_host_only():
    gates = {"gates": [{"metric": "student.quality.prompt_accuracy", "min": 0.95, "same_host": True},
                       {"metric": "student.safety.concept_rate_direct", "max": 0.01}]}
    here = dict(REPORT["environment"])
    same = evaluate(REPORT, Baseline.model_validate({**gates, "host": here}))
    assert [(r.passed, r.skipped) for r in same] == [(False, None), (False, None)]
    other = Baseline.model_validate({**gates, "host": {**here, "isa": ["avx2"]}})
    skipped, judged = evaluate(REPORT, other)
    assert skipped.passed and "2 threads, avx2 avx512f" in skipped.skipped and "baseline's host" in skipped.skipped
    assert not judged.passed and judged.skipped is None
    with pytest.raises(EdgesafeError, match="--require-same-host: the baseline's host is Intel"):
        evaluate(REPORT, other, require_same_host=True)


def test_a_metric_the_report_lacks_is_an_error_not_a_result():
    with pytest.raises(EdgesafeError, match="student.quality.missing: the metric is not in the report"):
        evaluate(REPORT, Baseline.model_validate({"gates": [{"metric": "student.quality.missing", "min": 0}]}))
    with pytest.raises(EdgesafeError, match="is not a number"):
        evaluate(REPORT, Baseline.model_validate({"gates": [{"metric": "student.quality", "min": 0}]}))


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ({"gates": []}, "gates"),
        ({"gates": [{"metric": "x"}]}, "needs 'min', 'max' or 'max_regression'"),
        ({"gates": [{"metric": "x", "max_regression": 0.1}]}, "go together"),
        ({"gatez": []}, "Field required"),
        ({"gates": [{"metric": "x", "min": 1, "same_host": True}]}, "need the baseline's 'host'"),
    ],
)
def test_bad_baselines(baseline, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        Baseline.model_validate(baseline)


def test_unreadable_and_foreign_reports(tmp_path):
    from edgesafe.bench.check import check

    gates = write(tmp_path / "b.json", {"gates": [{"metric": "x", "max": 1}]})
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(EdgesafeError, match="report is not readable JSON"):
        check(tmp_path / "r.json", gates)
    with pytest.raises(EdgesafeError, match="no such report"):
        check(tmp_path / "none.json", gates)
    with pytest.raises(EdgesafeError, match="not an edgesafe bench report"):
        check(write(tmp_path / "other.json", REPORT), gates)
