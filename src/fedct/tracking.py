"""MLflow tracking: the only module of fedct that imports mlflow.

Embedded default: MLflow 3's own default store (SQLite ``mlflow.db`` in the working
directory, artifacts under ``./mlruns``), no server needed. ``MLFLOW_TRACKING_URI``
selects a server (e.g. ``http://mlflow.hpc.example:5000`` or
``postgresql://user@host/mlflow``). Every command opens exactly one explicit run,
tagged with the stage name and the git commit; nothing is autologged.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

EXPERIMENT = "fedct"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _git_dirty() -> bool:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(out.stdout.strip())


def _mlflow():  # imported lazily so that `import fedct` stays cheap
    import mlflow

    return mlflow


def configure() -> None:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the embedded SQLite default."""
    mlflow = _mlflow()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(f"sqlite:///{Path('mlflow.db').resolve()}")
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    if mlflow.get_experiment_by_name(experiment) is None:
        # Artifacts next to the database, as MLflow's own default does.
        location = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            location = Path("mlruns").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)


class Run:
    """Thin handle over the active MLflow run; stages log through it only."""

    def __init__(self, run: Any) -> None:
        self._run = run

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow = _mlflow()
        # MLflow caps a param value at 6000 chars; lists become their repr.
        clean = {k: (str(v)[:6000] if v is not None else "None") for k, v in params.items()}
        items = list(clean.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow = _mlflow()
        finite = {k: float(v) for k, v in metrics.items() if v is not None and v == v}
        if finite:
            mlflow.log_metrics(finite, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _mlflow().log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        _mlflow().log_artifacts(str(path), artifact_path=artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        _mlflow().log_figure(figure, name)

    def log_text(self, text: str, name: str) -> None:
        _mlflow().log_text(text, name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        _mlflow().set_tags(dict(tags))

    def log_dataset(self, df: Any, name: str, source: str, context: str) -> None:
        """Record a pandas table as a run input (``mlflow.log_input``)."""
        mlflow = _mlflow()
        dataset = mlflow.data.from_pandas(df, source=source, name=name)
        mlflow.log_input(dataset, context=context)

    def log_torch_model(
        self, model: Any, name: str, registered_name: str | None = None
    ) -> Any:
        """Log a torch module in pickle form.

        MLflow 3 defaults to a torch.export program, which drops Dropout layers and
        freezes the input shape: MC dropout would be impossible. The pickled module keeps
        both.
        """
        mlflow = _mlflow()
        return mlflow.pytorch.log_model(
            model,
            name=name,
            export_model=False,
            serialization_format="pickle",
            registered_model_name=registered_name,
            pip_requirements=["torch", "monai", "fedct"],
        )


@contextlib.contextmanager
def start_run(stage: str, run_name: str | None = None, tags: Mapping[str, str] | None = None
              ) -> Iterator[Run]:
    """Open one explicit MLflow run for a pipeline stage."""
    configure()
    mlflow = _mlflow()
    all_tags = {
        "fedct.stage": stage,
        "mlflow.source.git.commit": _git_commit(),
        "fedct.git_dirty": str(_git_dirty()).lower(),
    }
    all_tags.update(tags or {})
    with mlflow.start_run(run_name=run_name or stage, tags=all_tags) as run:
        yield Run(run)


def load_torch_model(uri: str) -> Any:
    """Load a logged torch model (e.g. ``models:/fedct-pooled@champion``)."""
    configure()
    return _mlflow().pytorch.load_model(uri)
