"""Synthetic multi-site CT archive: hip-to-knee phantom acquired by simulated scanners."""

from __future__ import annotations

from pathlib import Path

from fedct.config import SynthParams, to_dict


def run(params: SynthParams, archive: Path, labels: Path, truth: Path,
        workers: int | None = None) -> dict:
    """Generate the archive (DICOM), labels (NIfTI) and ground truth; log to MLflow."""
    from fedct import tracking
    from fedct.synth.archive import generate, montage

    with tracking.start_run("synth", tags={"fedct.profile": params.profile}) as run_:
        run_.log_params(to_dict(params))
        summary = generate(archive, labels, truth, params.profile, params.seed, workers)
        run_.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        png = montage(archive, truth, truth / "montage.png")
        run_.log_artifact(png)
        # Only the condition table: series.csv carries raw Study/Series UIDs and
        # phi.csv the fake identifiers; both stay on disk for tests and evaluation.
        run_.log_artifact(truth / "conditions.csv")
    return summary
