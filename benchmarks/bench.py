"""Measure the bench stage; write benchmarks/results/bench.json.

- The default recipe (recipes/tiny-shapes.yaml) as a user runs it: `edgesafe export --resume` brings the
  run up to its export (not measured: earlier stages are the other benchmarks'), then the bench stage is
  redone from nothing by `edgesafe bench RUN` in a child process: its wall time and the peak resident
  memory of its process tree (each subject runs in its own process). Its report's figures follow: the
  subjects, the widest concept-rate interval, erasure after every stage, the summary table.
- The gate: the CI recipe (benchmarks/baselines/tiny-shapes-ci.yaml) compressed and benched, and
  `edgesafe check` run on its report against the committed baseline.
- The default report's HTML opened in headless Chromium (every image loaded, the plots drawn).

    python benchmarks/bench.py [--work DIR] [--out benchmarks/results/bench.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from harness import ROOT, provenance, run_cli

from edgesafe.bench.browser import check_page
from edgesafe.bench.html import summary_rows
from edgesafe.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-benchmark")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench.json")
    args = parser.parse_args()
    logs = args.work / "logs"

    run = args.work / "tiny-shapes"
    before = run_cli("export", "--recipe", "recipes/tiny-shapes.yaml", "--out", str(run), "--resume",
                     log=logs / "compress.log")
    assert before.returncode == 0, before.output_tail
    shutil.rmtree(run / "4-bench", ignore_errors=True)
    bench = run_cli("bench", str(run), log=logs / "bench.log")
    assert bench.returncode == 0, bench.output_tail
    report = json.loads((run / "4-bench" / "report.json").read_text())

    ci = args.work / "tiny-shapes-ci"
    ci_run = run_cli("compress", "--recipe", "benchmarks/baselines/tiny-shapes-ci.yaml", "--out", str(ci), "--resume",
                     log=logs / "ci.log")
    assert ci_run.returncode == 0, ci_run.output_tail
    gate = run_cli("check", str(ci / "4-bench" / "report.json"), "--baseline",
                   "benchmarks/baselines/tiny-shapes.json", log=logs / "check.log")

    page = check_page(run / "4-bench" / "report.html", args.work / "report.png")

    rates = [f for s in report["subjects"].values() for per_set in s["safety"].values() for f in per_set.values()
             if "rate" in f]
    erasure = report["erasure"]["rates"]
    by_stage = {s: {c: sets["direct"][s] for c, sets in erasure.items() if s in sets.get("direct", {})}
                for s in report["erasure"]["subjects"]}
    by_stage_paraphrase = {s: {c: sets["paraphrase"][s] for c, sets in erasure.items()
                               if s in sets.get("paraphrase", {})} for s in report["erasure"]["subjects"]}
    write_json(args.out, {
        "what": __doc__.split("\n\n")[1].strip(),
        "provenance": provenance(),
        "bench_seconds": bench.seconds,
        "bench_peak_rss_gib": bench.peak_rss_gib,
        "bench_seconds_in_report": report["bench"]["seconds"],
        "bench_target_seconds": 300,
        "subjects": list(report["subjects"]),
        "images_per_subject": {
            "wanted": len(report["prompt_sets"]["wanted"]["prompts"]) * len(report["seeds"]["wanted"]),
            "per_concept_and_set": {c: {k: f["n"] for k, f in per_set.items() if "n" in f}
                                    for c, per_set in report["subjects"]["teacher"]["safety"].items()}},
        "concept_rate_ci_width_max": round(max(f["ci_high"] - f["ci_low"] for f in rates), 4),
        "erasure_by_stage": by_stage,
        "erasure_by_stage_paraphrase": by_stage_paraphrase,
        "erasure_flags": report["erasure"]["flags"],
        "gate_passes_on_baseline": gate.returncode == 0,
        "gate_output_tail": gate.output_tail[-1500:],
        "html_checked_in_chromium": page.ok and len(page.plot_widths) == 3,
        "html_images": len(page.images),
        "summary": {name: {"teacher": t, report["edge_subject"]: e} for name, t, e in summary_rows(report)},
        "recipe_gates": report["gates"],
        "subject_figures": {name: {k: s[k] for k in ("size", "latency", "memory", "quality", "safety")}
                            for name, s in report["subjects"].items()},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
