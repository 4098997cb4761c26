"""``fedct report``: the study report, one static self-contained HTML page.

Reads what the other stages wrote under OUTPUTS_DIR (``catalogue/``, ``uncertainty/``,
``federated/<method>/history.csv``, ``evaluate/``, ``promote/decision.json``; see
:mod:`fedct.report.sections`), writes the page and logs it to MLflow as an artifact. A
stage that has not run yet leaves a visible "not available" note in its section. With
``results_dir``, also the results that travel with git (:mod:`fedct.report.results`).
"""

from __future__ import annotations

from pathlib import Path

from fedct.report.build import Report, build_report, write_report
from fedct.report.results import write_results


def run(outputs_dir: Path, out_file: Path, track: bool = True,
        results_dir: Path | None = None) -> Report:
    """Build the report of ``outputs_dir``, write it to ``out_file`` (and the results to
    ``results_dir``), log them to MLflow."""
    report = build_report(outputs_dir)
    path = write_report(report, out_file)
    results = write_results(Path(outputs_dir), results_dir) if results_dir else []
    if track:
        from fedct import tracking

        with tracking.start_run("report") as mlrun:
            mlrun.log_params({"outputs_dir": Path(outputs_dir).name})
            mlrun.log_metrics({"n_sections": len(report.sections),
                               "n_missing_inputs": len(report.missing)})
            mlrun.set_tags({"fedct.report.missing": ", ".join(report.missing)[:5000]})
            mlrun.log_artifact(path)
            for f in results:
                mlrun.log_artifact(f, "results" if f.suffix == ".json" else "results/plots")
    return report
