"""fedct models in MLflow: logged as pyfunc (loader module, no pickle) with
model.safetensors + model_card.json, registered with their digests, found again by alias,
version, run or folder; a missing or altered one is a one-line FedctError."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedct import tracking
from fedct.errors import FedctError
from fedct.model.io import load_model
from fedct.model.unet import dropout_modules
from tests.inference.conftest import make_model

NAME = "fedct-seg"


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the SQLite store puts run artifacts under ./mlruns


@pytest.fixture
def registered(tmp_path: Path) -> tuple[Path, tracking.LoggedModel, str]:
    """A tiny model logged, registered as NAME and aliased ``champion``; and its run id."""
    from mlflow import MlflowClient

    folder = make_model(tmp_path / "A", failure={"signal": "entropy", "threshold": 0.5})
    with tracking.start_run("promote") as run:
        logged = tracking.log_fedct_model(run, folder, registered_name=NAME)
        run_id = run.run_id
    MlflowClient().set_registered_model_alias(NAME, "champion", logged.version)
    return folder, logged, run_id


def _same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes()
               for f in (tracking.MODEL_FILE, tracking.MODEL_CARD_FILE))


def test_logged_model_comes_back_as_the_same_files_by_alias_version_and_run(
        registered, tmp_path: Path) -> None:
    folder, logged, run_id = registered
    assert logged.model_uri == f"models:/{NAME}/1" and logged.version == "1"
    for i, uri in enumerate((f"models:/{NAME}@champion", f"models:/{NAME}/1",
                             f"runs:/{run_id}/model")):
        got = tracking.download_model(uri, tmp_path / f"dl{i}")
        assert got.is_relative_to(tmp_path / f"dl{i}")
        assert _same_files(folder, got), uri
    model, card = load_model(got / tracking.MODEL_FILE)
    assert card["site"] == "A" and any(m.p == 0.5 for m in dropout_modules(model))


def test_the_same_weights_add_no_version_other_weights_do(registered, tmp_path: Path) -> None:
    folder, _, _ = registered
    with tracking.start_run("train") as run:
        again = tracking.log_fedct_model(run, folder, registered_name=NAME)
        unregistered = tracking.log_fedct_model(run, folder, artifact_path="plain")
    assert (again.version, again.model_uri) == ("1", f"models:/{NAME}/1")
    assert tracking.list_versions(NAME) == ["1"]
    assert unregistered.version is None
    assert _same_files(folder, tracking.download_model(unregistered.model_uri, tmp_path / "u"))
    other = make_model(tmp_path / "other", seed=4)
    with tracking.start_run("train") as run:
        assert tracking.log_fedct_model(run, other, registered_name=NAME).version == "2"
    assert tracking.list_versions(NAME) == ["1", "2"]
    # Back to the first weights: they differ from the latest version's, a new version.
    with tracking.start_run("train") as run:
        assert tracking.log_fedct_model(run, folder, registered_name=NAME).version == "3"
    tags = tracking.version_tags(NAME, "3")
    assert tags[tracking.WEIGHTS_TAG] == hashlib.sha256(
        (folder / tracking.MODEL_FILE).read_bytes()).hexdigest()


def test_pyfunc_loads_with_mc_dropout(registered) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking._set_tracking_uri())
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert len(dropout_modules(model.get_raw_model())) > 0
    x = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    probs = model.predict(x, params=None)
    assert probs.shape == (10, 3, 8, 8, 8)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # Dropout samples: the T samples differ (a dropout-free export would repeat one).
    assert float(torch.as_tensor(probs).var(dim=0).max()) > 1e-6
    # Nothing pickled was logged: the MLmodel names the loader module and the data.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1",
                                                     dst_path=str(Path.cwd() / "raw")))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pt", ".pickle")]
    assert "loader_module: fedct.model.pyfunc" in (local / "MLmodel").read_text()


@pytest.mark.parametrize("uri", ["models:/nope@champion", f"models:/{NAME}@nope",
                                 f"models:/{NAME}/7"])
def test_a_missing_model_or_alias_is_one_line_naming_the_uri(registered, uri: str,
                                                              tmp_path: Path) -> None:
    with pytest.raises(FedctError) as err:
        tracking.download_model(uri, tmp_path / "dl")
    assert str(err.value).startswith(f"{uri}: no such model") and "\n" not in str(err.value)
    # An alias names a version only after a promotion that won; the error says what to do.
    assert ("name a version, models:/<name>/<version>" in str(err.value)) == ("@" in uri)


def test_no_store_in_the_working_directory_is_an_error_not_a_new_empty_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FedctError, match=r"models:/fedct-seg/1: no MLflow store in .*"
                                         r"\(no mlflow.db\): run this where the pipeline "
                                         r"ran, or set MLFLOW_TRACKING_URI"):
        tracking.download_model("models:/fedct-seg/1", tmp_path / "dl")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_missing_alias_in_a_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    # MLflow 3.17 keeps the file store behind an opt-in (maintenance mode).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "filestore").as_uri())
    with pytest.raises(FedctError, match=r"^models:/nope@champion: no such model.*nope"):
        tracking.download_model("models:/nope@champion", tmp_path / "dl")


def test_an_mlflow_model_without_fedct_files_is_refused(tmp_path: Path) -> None:
    with tracking.start_run("train") as run:
        run.log_text("x", "model/notes.txt")  # a run artifact, not a fedct model
        run_id = run.run_id
    with pytest.raises(FedctError, match="no model.safetensors with model_card.json"):
        tracking.download_model(f"runs:/{run_id}/model", tmp_path / "dl")


def test_local_folders(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "B")
    assert tracking.download_model(str(folder), tmp_path / "unused") == folder
    assert tracking.download_model(str(folder / tracking.MODEL_FILE), tmp_path / "unused") == folder
    assert not (tmp_path / "unused").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedctError, match="empty: no model.safetensors"):
        tracking.download_model(str(tmp_path / "empty"), tmp_path / "dl")
    with pytest.raises(FedctError, match="missing: no such model folder"):
        tracking.download_model(str(tmp_path / "missing"), tmp_path / "dl")
    # A folder of models is not a model: no guessing which one was meant.
    with pytest.raises(FedctError, match=r": no model.safetensors with model_card.json"):
        tracking.download_model(str(tmp_path), tmp_path / "dl")


def test_a_malformed_uri_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FedctError, match=r"^models:/: cannot get the model from MLflow"):
        tracking.download_model("models:/", tmp_path / "dl")


def test_log_refuses_a_folder_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(b"x")
    with tracking.start_run("promote") as run, pytest.raises(
            FedctError, match=r"half: not a fedct model folder \(no model_card.json\)"):
        tracking.log_fedct_model(run, tmp_path / "half")


def test_a_dataset_with_integer_columns_is_logged_without_mlflow_s_schema_hint(
        tmp_path: Path) -> None:
    import warnings

    import mlflow
    import pandas as pd

    cases = pd.DataFrame({"series_key": ["k1", "k2"], "n_slices": [40, 64]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracking.start_run("cohort") as run:
            run.log_dataset(cases, name="cohort", source="cohort.csv", context="training")
            run_id = run.run_id
    assert not [w for w in caught if "Inferred schema" in str(w.message)]
    inputs = mlflow.get_run(run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["cohort"]


# --- attacks on the registry's side ------------------------------------------------------

def _stored(name: str) -> list[Path]:
    """The copies of ``name`` in the artifact store (./mlruns) of the registered model."""
    return [p for p in (Path.cwd() / "mlruns").rglob(name)]


def test_an_overwritten_stored_artifact_is_refused_by_the_registry_digest(
        registered, tmp_path: Path) -> None:
    folder, _, _ = registered
    other = make_model(tmp_path / "other", seed=9)
    for stored in _stored(tracking.MODEL_FILE):
        stored.write_bytes((other / tracking.MODEL_FILE).read_bytes())
    for stored in _stored(tracking.MODEL_CARD_FILE):  # a consistent card does not help
        stored.write_bytes((other / tracking.MODEL_CARD_FILE).read_bytes())
    with pytest.raises(FedctError) as err:
        tracking.download_model(f"models:/{NAME}@champion", tmp_path / "dl")
    assert "recorded at registration: the stored model was altered" in str(err.value)
    assert str(err.value).startswith(f"models:/{NAME}@champion: {tracking.MODEL_FILE}")


def test_a_version_without_recorded_digests_is_refused(tmp_path: Path) -> None:
    import mlflow

    folder = make_model(tmp_path / "A")
    with tracking.start_run("train") as run:
        logged = tracking.log_fedct_model(run, folder)
    mlflow.register_model(logged.model_uri, "outside")  # by hand: no digests
    with pytest.raises(FedctError, match="records no fedct.weights_sha256"):
        tracking.download_model("models:/outside/1", tmp_path / "dl")


def test_pyfunc_honours_its_params_schema(registered) -> None:
    """``mc_samples``, ``device`` and ``seed`` reach predict through MLflow's params
    schema (without one MLflow drops them with a warning); a wrong type is refused."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking._set_tracking_uri())
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    params = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert params == {"mc_samples": 10, "device": "cpu", "seed": 0}
    x = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    assert model.predict(x, params={"mc_samples": 3}).shape == (3, 3, 8, 8, 8)
    same = model.predict(x, params={"mc_samples": 2, "seed": 5, "device": "cpu"})
    np.testing.assert_array_equal(same, model.predict(x, params={"mc_samples": 2, "seed": 5}))
    assert not np.array_equal(same, model.predict(x, params={"mc_samples": 2, "seed": 6}))
    with pytest.raises(MlflowException):
        model.predict(x, params={"mc_samples": "many"})
    with pytest.raises(FedctError, match="mc_samples 0"):
        model.predict(x, params={"mc_samples": 0})


def test_logged_requirements_pin_versions_and_carry_the_fedct_wheel(registered) -> None:
    """requirements.txt installs: every package pinned, fedct as the wheel logged with the
    model (no package index has fedct), by a path relative to the model folder."""
    import mlflow

    mlflow.set_tracking_uri(tracking._set_tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1",
                                                     dst_path=str(Path.cwd() / "req")))
    reqs = [r for r in (local / "requirements.txt").read_text().splitlines() if r]
    assert "fedct" not in reqs
    named = [r for r in reqs if not r.startswith("./")]
    assert named and all("==" in r for r in named), reqs
    wheels = [r for r in reqs if r.startswith("./")]
    assert len(wheels) == 1 and wheels[0].endswith(".whl"), reqs
    wheel = local / wheels[0]
    assert wheel.is_file() and wheel.name.startswith("fedct-")
    # pip accepts it as fedct at the package's version, without an index.
    import subprocess
    import sys
    from importlib.metadata import version

    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps",
                           "--no-index", "--ignore-installed", "--report", "-", "--quiet",
                           wheels[0]], cwd=local, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert [i["metadata"]["name"] for i in report["install"]] == ["fedct"]
    assert report["install"][0]["metadata"]["version"] == version("fedct")
    # The files that load are still only the weights and the card: no pickle came with it.
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pt", ".pickle")]
