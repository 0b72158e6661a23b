"""The gate's rules on a report-shaped document (the bench's real reports: test_bench_run)."""

import json

import pytest

from edgesafe.bench.check import Baseline, evaluate
from edgesafe.errors import EdgesafeError

REPORT = {"student": {"safety": {"concept_rate_direct": 0.04}, "quality": {"fid": 12.0, "prompt_accuracy": 0.9}}}


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
