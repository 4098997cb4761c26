"""MLflow tracking: the only module of fedct that imports mlflow.

Embedded default: MLflow 3's own default store (SQLite ``mlflow.db`` in the working
directory, artifacts under ``./mlruns``), no server needed. ``MLFLOW_TRACKING_URI``
selects a server (e.g. ``http://mlflow.hpc.example:5000`` or
``postgresql://user@host/mlflow``). Every command opens exactly one explicit run,
tagged with the stage name and the git commit; nothing is autologged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedct import logged_model, procs, provenance
from fedct.errors import FedctError

EXPERIMENT = "fedct"
DEFAULT_STORE = "mlflow.db"  # the embedded SQLite store, in the working directory


def _mlflow():  # imported lazily so that `import fedct` stays cheap
    import mlflow

    return mlflow


def configure() -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the embedded SQLite default (by absolute
    path); returns that URI."""
    # Set every time from the environment: a URI set earlier in the process (another
    # store, a server that has stopped) must not outlive a change of MLFLOW_TRACKING_URI.
    mlflow = _mlflow()
    uri = _set_tracking_uri()
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    if mlflow.get_experiment_by_name(experiment) is None:
        # Artifacts next to the database, as MLflow's own default does.
        location = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            location = Path("mlruns").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    return uri


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
        with warnings.catch_warnings():
            # MLflow's hint on integer columns concerns a model's input schema; this table
            # only records which cases a run used (printed once per model otherwise).
            warnings.filterwarnings("ignore", message=r"Hint: Inferred schema contains integer")
            dataset = mlflow.data.from_pandas(df, source=source, name=name)
            mlflow.log_input(dataset, context=context)


class _Stops:
    """SIGTERM and SIGINT raise KeyboardInterrupt, except while ``deferred`` (a run is
    being opened or closed): then the signal is kept in ``pending`` for later."""

    def __init__(self) -> None:
        self.deferred = True
        self.pending: int | None = None

    def handle(self, signum, frame) -> None:
        if self.deferred:
            self.pending = self.pending or signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def resume(self) -> None:
        """Stop deferring; a signal that came meanwhile is raised now."""
        self.deferred = False
        if self.pending is not None:
            raise KeyboardInterrupt(f"signal {self.pending}")


@contextlib.contextmanager
def _stops() -> Iterator[_Stops]:
    """Install ``_Stops`` for SIGTERM (a scheduler, ``kill``) and SIGINT (Ctrl-C) in the main
    thread (signal handlers live there; elsewhere the caller's handling stays)."""
    stops = _Stops()
    with procs.handling(stops.handle, (signal.SIGTERM, signal.SIGINT)) as installed:
        stops.deferred = installed
        yield stops


def _end_run(run: Any, status: str) -> None:
    mlflow = _mlflow()
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run.info.run_id:
        try:
            mlflow.end_run(status)  # pops the run off MLflow's stack first
            return
        except Exception:  # noqa: BLE001 - the store call failed: mark the run afresh below
            pass
    mlflow.MlflowClient().set_terminated(run.info.run_id, status)


@contextlib.contextmanager
def start_run(stage: str, run_name: str | None = None, tags: Mapping[str, str] | None = None,
              nested: bool = False) -> Iterator[Run]:
    """Open one explicit MLflow run for a pipeline stage (``nested``: a child of the
    active run, e.g. one per federated method or per site).

    The run ends FINISHED when the block does, KILLED on SIGTERM, SIGINT (Ctrl-C) or a
    KeyboardInterrupt, FAILED on any other exception (which propagates). A signal that
    comes while the run is being opened or closed is raised once that is done, so no run
    is left RUNNING; only SIGKILL, which no process can catch, leaves one so.
    """
    configure()
    mlflow = _mlflow()
    all_tags = {
        "fedct.stage": stage,
        "mlflow.source.git.commit": provenance.git_commit(),
        "fedct.git_dirty": str(provenance.git_dirty()).lower(),
    }
    all_tags.update(tags or {})
    with _stops() as stops:
        run = mlflow.start_run(run_name=run_name or stage, tags=all_tags, nested=nested)
        status = "FAILED"
        try:
            stops.resume()
            yield Run(run)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            stops.deferred = True
            _end_run(run, status)
        stops.resume()  # a signal during the closing of a finished run: stop now


# --- model registry: evidence, champion alias, refusals (aliases only, never stages) ---------

EVIDENCE_TAG = "fedct.evidence"
DECISION_TAG = "fedct.decision"


def evidence_hash(evidence: Mapping[str, str]) -> str:
    """sha256 of the canonical JSON of ``evidence`` (sorted keys, no whitespace)."""
    canon = json.dumps({str(k): str(v) for k, v in evidence.items()}, sort_keys=True,
                       separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def _registry() -> Any:
    configure()
    return _mlflow().MlflowClient()


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _check_name(name: str) -> None:
    if "'" in name:  # it goes into a search filter string
        raise ValueError(f"registered model name {name!r} contains a quote")


def _search_versions(client: Any, name: str) -> list[Any]:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        versions += list(page)
        token = page.token
        if not token:
            return sorted(versions, key=lambda v: int(v.version))


def list_versions(name: str) -> list[str]:
    """Versions of registered model ``name``, ascending; [] when it does not exist."""
    _check_name(name)
    return [str(v.version) for v in _search_versions(_registry(), name)]


def version_tags(name: str, version: str) -> dict[str, str]:
    """Tags of one model version (evidence, decision, reasons)."""
    client = _registry()
    return dict(client.get_model_version(name, str(version)).tags)


def register_with_evidence(model_uri: str, name: str, evidence: Mapping[str, str],
                           model_dir: Path | None = None) -> str:
    """Register ``model_uri`` as a version of ``name`` carrying ``evidence``; idempotent.

    ``evidence`` maps short keys (git commit, the digests of the files the decision read,
    the gate's settings) to strings. Each becomes a version tag ``fedct.evidence.<key>``,
    and ``fedct.evidence`` holds ``evidence_hash``. If a version of ``name`` already
    carries that hash it is returned and nothing is created, so a rerun on the same
    evidence adds no version (whatever run the model was logged in). ``model_dir``: the
    logged fedct model folder, whose weights' and card's SHA-256 the version records
    (``fedct.weights_sha256``, ``fedct.card_sha256``) for ``download_model`` to check.
    """
    _check_name(name)
    bad = [k for k in evidence if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", str(k))]
    if bad:
        raise ValueError(f"evidence keys must be letters, digits, '_.-/': {bad}")
    client = _registry()
    digest = evidence_hash(evidence)
    for version in _search_versions(client, name):
        if version.tags.get(EVIDENCE_TAG) == digest:
            return str(version.version)
    tags = {EVIDENCE_TAG: digest, **{f"{EVIDENCE_TAG}.{k}": str(v)[:5000]
                                     for k, v in evidence.items()}}
    if model_dir is not None:
        tags.update(_digest_tags(*_model_files(Path(model_dir))))
    return str(_mlflow().register_model(model_uri, name, tags=tags).version)


def get_alias(name: str, alias: str = "champion") -> str | None:
    """The version ``alias`` points at, or None (no such alias or no such model)."""
    client = _registry()
    try:
        model = client.get_registered_model(name)
    except Exception as exc:  # MlflowException, over REST or SQL alike
        if _not_found(exc):
            return None
        raise
    # A missing alias is INVALID_PARAMETER_VALUE in get_model_version_by_alias, like many
    # other errors; the model's alias map says it plainly.
    version = dict(model.aliases).get(alias)
    return None if version is None else str(version)


def set_champion(name: str, version: str, alias: str = "champion",
                 reasons: list[str] | tuple[str, ...] = ()) -> None:
    """Point ``alias`` at ``version`` and tag the version ``fedct.decision=promoted``."""
    client = _registry()
    client.set_model_version_tag(name, str(version), DECISION_TAG, "promoted")
    client.set_model_version_tag(name, str(version), f"{DECISION_TAG}.reasons",
                                 "\n".join(reasons)[:5000])
    client.set_registered_model_alias(name, alias, str(version))


def record_refusal(name: str, version: str, reasons: list[str] | tuple[str, ...]) -> None:
    """Tag ``version`` ``fedct.decision=refused`` with the gate's reasons; aliases stay.

    The current champion (if any) keeps its alias: a refused candidate never moves it.
    """
    client = _registry()
    client.set_model_version_tag(name, str(version), DECISION_TAG, "refused")
    client.set_model_version_tag(name, str(version), f"{DECISION_TAG}.reasons",
                                 "\n".join(reasons)[:5000])


# --- fedct models as MLflow models (predict's side of the registry) -------------------------
#
# A fedct model is a folder holding ``model.safetensors`` (weights + architecture) and
# ``model_card.json`` (fedct.model.io.save_model). It is logged as an ``mlflow.pyfunc``
# model with a *loader module* (``fedct.model.pyfunc``, imported from the installed fedct;
# its params and requirements: ``fedct.logged_model``) and these two files as its data:
# nothing of it is pickled, so loading it unpickles nothing. A consumer gets the files
# back (``download_model``) and rebuilds the network through ``fedct.model.io.load_model``
# with its dropout layers intact for MC sampling.
# A registered version records the SHA-256 of both files (``fedct.weights_sha256``,
# ``fedct.card_sha256``); ``download_model`` refuses files that differ from them.

MODEL_FILE = "model.safetensors"  # = fedct.model.io.WEIGHTS_FILE (not imported: no torch)
MODEL_CARD_FILE = "model_card.json"  # = fedct.model.io.CARD_FILE
WEIGHTS_TAG = "fedct.weights_sha256"
CARD_TAG = "fedct.card_sha256"


@dataclasses.dataclass(frozen=True)
class LoggedModel:
    """Where ``log_fedct_model`` put a model: ``models:/name/version`` when registered,
    else MLflow's own model URI; ``version`` is None when not registered."""

    model_uri: str
    version: str | None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_files(model_dir: Path) -> tuple[bytes, bytes]:
    """The bytes of ``model.safetensors`` and ``model_card.json`` of a model folder."""
    pt, card = model_dir / MODEL_FILE, model_dir / MODEL_CARD_FILE
    missing = [p.name for p in (pt, card) if not p.is_file()]
    if missing:
        legacy = " (a pickled model.pt: `fedct convert-model`)" if (
            model_dir / "model.pt").is_file() else ""
        raise FedctError(f"{model_dir}: not a fedct model folder (no {', '.join(missing)})"
                         + legacy)
    return pt.read_bytes(), card.read_bytes()


def _digest_tags(weights: bytes, card: bytes) -> dict[str, str]:
    return {WEIGHTS_TAG: _sha256(weights), CARD_TAG: _sha256(card)}


def _fedct_files(folder: Path) -> tuple[Path, Path] | None:
    """``(model.safetensors, model_card.json)`` in a downloaded MLflow model (they sit in
    its ``data/``); None when either is missing."""
    for pt in sorted(Path(folder).rglob(MODEL_FILE)):
        card = pt.parent / MODEL_CARD_FILE
        if card.is_file():
            return pt, card
    return None


def _signature(defaults: Mapping[str, int | str]) -> Any:
    """A signature with only a params schema (``fedct.logged_model.default_params``):
    MLflow passes params to ``predict`` only when the signature declares them. No input
    schema: a tensor of any (X, Y, Z) shape."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    kinds = {int: "long", str: "string"}
    return ModelSignature(params=ParamSchema([ParamSpec(k, kinds[type(v)], v)
                                              for k, v in defaults.items()]))


def log_fedct_model(run: Run, model_dir: Path, artifact_path: str = "model",
                    registered_name: str | None = None) -> LoggedModel:
    """Log the fedct model in ``model_dir`` to ``run`` (the active run) as a pyfunc model.

    Its data are ``model.safetensors`` and ``model_card.json`` as
    ``fedct.model.io.save_model`` wrote them (the bytes whose digests are recorded). With
    ``registered_name`` it is also registered, as a new version only when its weights'
    SHA-256 differs from that of the latest version (a rerun that trains the same weights
    adds none; that version is returned).
    """
    mlflow = _mlflow()
    from mlflow import pyfunc

    model_dir = Path(model_dir)
    weights, card = _model_files(model_dir)
    active = mlflow.active_run()
    if active is None or active.info.run_id != run.run_id:
        raise ValueError(f"log_fedct_model: run {run.run_id} is not the active MLflow run")
    with tempfile.TemporaryDirectory(prefix="fedct-log-") as tmp:
        data = Path(tmp) / "model"
        data.mkdir()
        (data / MODEL_FILE).write_bytes(weights)
        (data / MODEL_CARD_FILE).write_bytes(card)
        info = pyfunc.log_model(name=artifact_path, loader_module=logged_model.LOADER_MODULE,
                                data_path=str(data), signature=_signature(
                                    logged_model.default_params(json.loads(card))),
                                pip_requirements=logged_model.requirements(data))
    if not registered_name:
        return LoggedModel(info.model_uri, None)
    _check_name(registered_name)
    tags = _digest_tags(weights, card)
    versions = _search_versions(_registry(), registered_name)
    if versions and versions[-1].tags.get(WEIGHTS_TAG) == tags[WEIGHTS_TAG]:
        version = str(versions[-1].version)  # the same weights: no new version
    else:
        version = str(mlflow.register_model(info.model_uri, registered_name,
                                            tags=tags).version)
    run.set_tags({"fedct.registered_version": f"{registered_name}/{version}"})
    return LoggedModel(f"models:/{registered_name}/{version}", version)


def _set_tracking_uri() -> str:
    """The tracking URI of ``configure`` without creating an experiment (a read)."""
    mlflow = _mlflow()
    uri = (os.environ.get("MLFLOW_TRACKING_URI")
           or f"sqlite:///{Path(DEFAULT_STORE).resolve()}")
    if uri.startswith("sqlite:///"):
        check_store_schema(uri.removeprefix("sqlite:///"))
    mlflow.set_tracking_uri(uri)
    # The registry lives in the tracking store (MLflow writes MLFLOW_REGISTRY_URI back into
    # the environment when it is set, so that variable cannot be trusted here).
    mlflow.set_registry_uri(uri)
    return mlflow.get_tracking_uri()


def _mlflow_error(uri: str, exc: Any, tracking_uri: str) -> FedctError:
    reason = (exc.message or str(exc)).strip().splitlines()[0][:200]
    # MLflow 3.17 answers a missing alias with INVALID_PARAMETER_VALUE, the rest of
    # "not found" with RESOURCE_DOES_NOT_EXIST.
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in reason:
        hint = ("; a refused promotion sets no alias: name a version, "
                "models:/<name>/<version>" if "@" in uri else "")
        return FedctError(f"{uri}: no such model, version or alias in the MLflow "
                          f"registry at {tracking_uri} ({reason}{hint})")
    return FedctError(f"{uri}: cannot get the model from MLflow at {tracking_uri} "
                      f"({reason})")


def _registered_version(uri: str, tracking_uri: str) -> Any | None:
    """The registry's ModelVersion that ``models:/name/version`` or ``models:/name@alias``
    names; None for other URIs (a run's or a logged model's: no registry record)."""
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([^/@]+))/?", uri)
    if match is None:
        return None
    name, number, alias = match.groups()
    client = _mlflow().MlflowClient()
    try:
        if number is not None:
            return client.get_model_version(name, number)
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise _mlflow_error(uri, exc, tracking_uri) from exc


def _check_registered(uri: str, version: Any, pt: Path, card: Path) -> None:
    """The downloaded files must be the ones whose digests the version recorded."""
    tags = dict(version.tags)
    where = f"version {version.version} of {version.name}"
    for path, tag in ((pt, WEIGHTS_TAG), (card, CARD_TAG)):
        recorded = tags.get(tag)
        if recorded is None:
            raise FedctError(f"{uri}: {where} records no {tag} (registered outside fedct or "
                             "by an older one); register the model again with this fedct")
        got = _sha256(path.read_bytes())
        if got != recorded:
            raise FedctError(f"{uri}: {path.name} of {where} has SHA-256 {got[:16]}..., not "
                             f"the {recorded[:16]}... recorded at registration: the stored "
                             "model was altered; refusing to load it")


def download_model(uri: str, dst: Path) -> Path:
    """The local folder holding ``model.safetensors`` + ``model_card.json`` of a fedct model.

    ``uri``: ``models:/name@alias``, ``models:/name/version``, ``runs:/<run>/<path>`` or
    any other MLflow artifact URI (downloaded into ``dst``), or a local folder (returned
    as it is, nothing copied). A registered version is downloaded by its number (an alias
    is resolved once) and its files must have the SHA-256 the registry recorded. A
    missing model, version or alias, or altered files, is a FedctError naming the URI.
    """
    local = Path(uri)
    if ":/" not in uri or local.exists():
        if local.is_file() and local.name in (MODEL_FILE, "model.pt"):
            local = local.parent
        if not local.is_dir():
            raise FedctError(f"{uri}: no such model folder (or use models:/name@alias)")
        if not ((local / MODEL_FILE).is_file() and (local / MODEL_CARD_FILE).is_file()):
            legacy = (" (a pickled model.pt of an earlier fedct: `fedct convert-model`)"
                      if (local / "model.pt").is_file() else "")
            raise FedctError(f"{uri}: no {MODEL_FILE} with {MODEL_CARD_FILE} beside it"
                             + legacy)
        return local
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    if not os.environ.get("MLFLOW_TRACKING_URI") and not Path(DEFAULT_STORE).exists():
        # MLflow would create an empty store here and then find no model in it.
        raise FedctError(f"{uri}: no MLflow store in {Path.cwd()} (no {DEFAULT_STORE}): run "
                         "this where the pipeline ran, or set MLFLOW_TRACKING_URI")
    tracking_uri = _set_tracking_uri()
    version = _registered_version(uri, tracking_uri)
    # The version's own URI: an alias that moves during the download cannot mix versions.
    source = uri if version is None else f"models:/{version.name}/{version.version}"
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    # Two small files: MLflow's progress bar on stderr is noise beside the one result line.
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst))
    except MlflowException as exc:
        raise _mlflow_error(uri, exc, tracking_uri) from exc
    except OSError as exc:
        raise FedctError(f"{uri}: cannot download the model ({exc})") from exc
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
    found = _fedct_files(Path(path))
    if found is None:
        raise FedctError(f"{uri}: the MLflow model has no {MODEL_FILE} with "
                         f"{MODEL_CARD_FILE} (not logged by this fedct's "
                         "tracking.log_fedct_model)")
    if version is not None:
        _check_registered(uri, version, *found)
    return found[0].parent


def registry_entry(uri: str, alias: str = "champion") -> dict[str, str | None] | None:
    """What the registry says of a ``models:/name/version`` or ``models:/name@alias`` URI:
    ``name``, ``version``, the version ``alias`` points at (``champion``, None when none
    does) and the promotion ``decision`` tag (``promoted``/``refused``/None). None for any
    other URI (a run's artifacts, a folder): such a model is no registry version.
    """
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", uri)
    if match is None:
        return None
    name, version, by_alias = match.groups()
    client = _registry()
    found = (client.get_model_version_by_alias(name, by_alias) if by_alias
             else client.get_model_version(name, version))
    return {"name": name, "version": str(found.version),
            "champion": get_alias(name, alias),
            "decision": dict(found.tags).get(DECISION_TAG)}


def check_store_schema(store: str | Path) -> None:
    """Refuse an SQLite store whose schema this MLflow does not know.

    MLflow upgrades a store's schema when it opens it, and an older MLflow then refuses
    the store with an "out-of-date schema" error that advises an upgrade it cannot do.
    This reads the store's alembic revision and looks for it among the installed MLflow's
    migration scripts (read as text: importing them takes seconds): a revision none of
    them defines is a FedctError saying how to recover. A missing file (a fresh store)
    passes; an older known revision is left to MLflow, whose advice (``mlflow db
    upgrade``) is then right.
    """
    import importlib.metadata
    import importlib.util
    import sqlite3

    store = Path(store)
    if not store.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro",
                                                uri=True)) as db:
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error as exc:
        if "no such table" in str(exc):
            return  # no MLflow tables yet: MLflow creates them
        raise FedctError(f"{store}: not a readable MLflow store ({exc})") from exc
    spec = importlib.util.find_spec("mlflow")
    assert spec is not None and spec.origin is not None
    scripts = Path(spec.origin).parent / "store" / "db_migrations" / "versions"
    define = re.compile(r"^revision\s*(?::\s*str\s*)?=\s*[\"']([0-9A-Za-z_]+)[\"']", re.M)
    known = {m for f in scripts.glob("*.py") for m in define.findall(f.read_text())}
    unknown = sorted(r for (r,) in rows if r not in known)
    if unknown:
        version = importlib.metadata.version("mlflow")
        raise FedctError(
            f"{store}: schema revision {', '.join(unknown)} is unknown to the installed "
            f"MLflow {version}: a newer MLflow migrated this store. Back it up and open it "
            "with that MLflow, or move it and mlruns/ aside for a fresh store")
