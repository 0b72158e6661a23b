import json

import pytest

from edgesafe.bench.check import check
from edgesafe.errors import EdgesafeError


def write(path, data):
    path.write_text(json.dumps(data))
    return path


REPORT = {"student": {"safety": {"concept_rate_direct": 0.04}, "quality": {"fid": 12.0, "prompt_accuracy": 0.9}}}


def test_gates_pass_and_fail(tmp_path):
    report = write(tmp_path / "r.json", REPORT)
    gates = {"gates": [
        {"metric": "student.safety.concept_rate_direct", "max": 0.05},
        {"metric": "student.quality.prompt_accuracy", "baseline": 0.92, "max_regression": 0.05},
        {"metric": "student.quality.fid", "baseline": 10.0, "max_regression": 0.1, "higher_is_better": False},
        {"metric": "student.quality.missing", "min": 0},
    ]}
    results = check(report, write(tmp_path / "b.json", gates))
    assert [r.passed for r in results] == [True, True, False, False]
    assert results[2].value == 12.0 and "<= 11" in results[2].rule
    assert results[3].rule == "metric missing from the report"


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ({"gates": []}, "gates"),
        ({"gates": [{"metric": "x"}]}, "needs 'min', 'max' or 'max_regression'"),
        ({"gates": [{"metric": "x", "max_regression": 0.1}]}, "go together"),
        ({"gatez": []}, "gates: Field required"),
    ],
)
def test_bad_baselines(tmp_path, baseline, message):
    report = write(tmp_path / "r.json", REPORT)
    with pytest.raises(EdgesafeError, match=message):
        check(report, write(tmp_path / "b.json", baseline))


def test_unreadable_files(tmp_path):
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(EdgesafeError, match="report is not valid JSON"):
        check(tmp_path / "r.json", tmp_path / "b.json")
    with pytest.raises(EdgesafeError, match="no such report file"):
        check(tmp_path / "none.json", tmp_path / "b.json")
