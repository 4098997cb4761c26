"""``fedct report``: the study report, one static self-contained HTML page.

Reads what the other stages wrote under OUTPUTS_DIR (``catalogue/``, ``uncertainty/``,
``federated/<method>/history.csv``, ``evaluate/``, ``promote/decision.json``; see
:mod:`fedct.report.sections`), writes the page and logs it to MLflow as an artifact. A
stage that has not run yet leaves a visible "not available" note in its section.
"""

from __future__ import annotations

from pathlib import Path

from fedct.report.build import Report, build_report, write_report


def run(outputs_dir: Path, out_file: Path, track: bool = True) -> Report:
    """Build the report of ``outputs_dir``, write it to ``out_file``, log it to MLflow."""
    report = build_report(outputs_dir)
    path = write_report(report, out_file)
    if track:
        from fedct import tracking

        with tracking.start_run("report") as mlrun:
            mlrun.log_params({"outputs_dir": Path(outputs_dir).name})
            mlrun.log_metrics({"n_sections": len(report.sections),
                               "n_missing_inputs": len(report.missing)})
            mlrun.set_tags({"fedct.report.missing": ", ".join(report.missing)[:5000]})
            mlrun.log_artifact(path)
    return report
