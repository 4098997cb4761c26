"""The train stage: the pooled model's matched epochs, and checkpoints that never outlive
their run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedct.config import TrainParams
from fedct.stages import train as stage
from fedct.stages.train import pooled_params
from fedct.training.loop import fingerprint


def test_pooled_sees_each_case_as_often_as_a_local_model() -> None:
    cases = pd.DataFrame({"site": ["A", "A", "B", "D", "D"]})
    params = pooled_params(TrainParams(steps=100), cases)
    assert params.steps == 300  # 3 sites: 3x the local cap
    assert params.channels == TrainParams().channels  # nothing else changes
    # A schedule shorter than the cap scales with it.
    scheduled = pooled_params(TrainParams(steps=100, schedule_steps=60), cases)
    assert (scheduled.steps, scheduled.schedule_steps) == (300, 180)


def _tiny_cohort(root: Path) -> Path:
    """Site A: 2 training and 1 validation case, prepared as the cohort stage writes them."""
    rng = np.random.default_rng(0)
    (root / "cases").mkdir(parents=True)
    rows = []
    for i, split in enumerate(["train", "train", "val"]):
        label = np.zeros((1, 16, 16, 8), dtype=np.uint8)
        label[0, 4:12, 4:12, 2:6] = 1
        image = (0.2 + 0.5 * label + rng.normal(0, 0.03, label.shape)).astype(np.float32)
        np.savez(root / "cases" / f"k{i}.npz", image=image, label=label)
        rows.append({"series_key": f"k{i}", "study_key": f"st{i}", "patient_key": f"p{i}",
                     "site": "A", "split": split, "role": "train", "labelled": True,
                     "has_label": True})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    (root / "spec.json").write_text(json.dumps({"spacing_mm": [2.0, 2.0, 2.0],
                                                "roi_size": [16, 16, 8], "hu_min": -200.0,
                                                "hu_max": 1000.0}))
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "muscle"}))
    return root


TINY = TrainParams(sites=("A",), steps=4, channels=(4, 8), strides=(2,), patch_size=(16, 16, 8),
                   max_shift=(0, 0, 0), batch_size=2, val_checks=2, patience=0, device="cpu")


def test_a_finished_run_leaves_no_checkpoint_for_a_rerun_to_restore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC reruns ``train`` when code or cases change under the same params: the weights of
    the earlier run must not come back from its checkpoint."""
    monkeypatch.chdir(tmp_path)
    cohort = _tiny_cohort(tmp_path / "cohort")
    ckpts = tmp_path / "ckpt"
    calls: list[Path | None] = []
    real = stage.train_model

    def spy(*args, **kwargs):
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "train_model", spy)
    stage.run(TINY, "A", cohort, tmp_path / "out", ckpts)
    assert calls == [ckpts / "A" / "checkpoint.pt"]
    assert not (ckpts / "A" / "checkpoint.pt").exists()
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert list(history["step"]) == [2, 4]  # trained, not restored


def test_the_fingerprint_sees_case_contents_not_only_their_size(tmp_path: Path) -> None:
    cohort = _tiny_cohort(tmp_path / "cohort")
    files = sorted((cohort / "cases").glob("*.npz"))
    before = fingerprint(TINY, "A", files)
    with np.load(files[0]) as z:
        image, label = z["image"].copy(), z["label"]
    image[0, 0, 0, 0] += 0.5  # same shape, same file size, other data
    np.savez(files[0], image=image, label=label)
    assert files[0].stat().st_size == (cohort / "cases" / "k1.npz").stat().st_size
    assert fingerprint(TINY, "A", files) != before
    assert fingerprint(TINY, "B", files) != fingerprint(TINY, "A", files)
    now = fingerprint(TINY, "A", files)
    assert fingerprint(dataclasses.replace(TINY, steps=5), "A", files) != now
    # How many models train at once is no property of a model: its checkpoint still fits.
    assert fingerprint(dataclasses.replace(TINY, workers=7), "A", files) == now


def _weights(model_dir: Path) -> dict:
    from fedct.model.io import load_model

    model, _ = load_model(model_dir / "model.safetensors")
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_models_trained_in_parallel_equal_those_trained_one_by_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two worker processes change the speed only: each model (local and pooled) equals
    the one a single process trains with the same number of threads."""
    import torch

    monkeypatch.chdir(tmp_path)
    cohort = _tiny_cohort(tmp_path / "cohort")
    params = dataclasses.replace(TINY, sites=("A", "pooled"), workers=2)
    threads = max(1, torch.get_num_threads() // 2)
    results = stage.run_sites(params, params.sites, cohort, tmp_path / "par", tmp_path / "ck")
    assert set(results) == {"A", "pooled"}
    assert not list((tmp_path / "ck").rglob("checkpoint.pt"))  # all finished: none kept
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stage.run_sites(dataclasses.replace(params, workers=1), params.sites, cohort,
                        tmp_path / "seq")
    finally:
        torch.set_num_threads(before)
    for site in ("A", "pooled"):
        par, seq = _weights(tmp_path / "par" / site), _weights(tmp_path / "seq" / site)
        assert par.keys() == seq.keys()
        assert all(torch.equal(par[k], seq[k]) for k in par), site
        card = json.loads((tmp_path / "par" / site / "model_card.json").read_text())
        assert card["site"] == site
        # The card says what the rounding depended on: each worker's share of the threads.
        assert card["runtime"]["threads"] == threads
        assert card["runtime"]["device"] == "cpu" and card["runtime"]["cpu"]
        seq_card = json.loads((tmp_path / "seq" / site / "model_card.json").read_text())
        assert seq_card["runtime"] == card["runtime"]
    history = pd.read_csv(tmp_path / "par" / "pooled" / "history.csv")
    assert list(history["step"]) == [2, 4]  # pooled on one site: 4 steps x 1 site


def test_a_bug_in_one_model_lets_the_others_finish_then_surfaces_with_its_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cohort = _tiny_cohort(tmp_path / "cohort")
    real = stage.run

    def buggy(params, site, *args, **kwargs):
        if site == "pooled":  # trained first (the longest)
            raise RuntimeError("boom")
        return real(params, site, *args, **kwargs)

    monkeypatch.setattr(stage, "run", buggy)
    params = dataclasses.replace(TINY, sites=("A", "pooled"), workers=1)
    with pytest.raises(RuntimeError, match="boom"):
        stage.run_sites(params, params.sites, cohort, tmp_path / "m", tmp_path / "ck")
    assert (tmp_path / "m" / "A" / "model.safetensors").exists()  # trained after the bug
    assert (tmp_path / "ck" / "A" / "checkpoint.pt").exists()  # kept for the rerun


@pytest.mark.slow
def test_a_failed_site_keeps_the_finished_models_and_a_rerun_restores_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedct.errors import FedctError

    monkeypatch.chdir(tmp_path)
    cohort = _tiny_cohort(tmp_path / "cohort")
    params = dataclasses.replace(TINY, sites=("A", "Z"), workers=2)
    ckpts = tmp_path / "ck"
    with pytest.raises(FedctError) as err:
        stage.run_sites(params, params.sites, cohort, tmp_path / "m", ckpts)
    message = str(err.value)
    assert "site 'Z'" in message and "site Z failed" in message, message
    assert "failed: train:" not in message and "\n" not in message, message
    assert "finished and kept: A" in message, message
    assert (tmp_path / "m" / "A" / "model.safetensors").exists()
    assert (ckpts / "A" / "checkpoint.pt").exists()  # the rerun's to restore
    first = _weights(tmp_path / "m" / "A")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr("fedct.training.loop.train_step", no_training)
    # In this process (one worker), so that the patched step would be seen.
    stage.run_sites(dataclasses.replace(params, workers=1), ["A"], cohort, tmp_path / "m2",
                    ckpts)
    again = _weights(tmp_path / "m2" / "A")
    import torch

    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not (ckpts / "A" / "checkpoint.pt").exists()
    assert list(pd.read_csv(tmp_path / "m2" / "A" / "history.csv")["step"]) == [2, 4]


def test_no_sites_is_an_error(tmp_path: Path) -> None:
    from fedct.errors import FedctError

    with pytest.raises(FedctError, match="no sites"):
        stage.run_sites(TINY, [], tmp_path, tmp_path / "m")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "parent_killed"])
def test_a_stopped_run_leaves_no_worker_process(tmp_path: Path, how: str) -> None:
    """SIGTERM stops the workers by PID; a parent killed outright (no ``finally``) leaves
    workers that notice and end themselves."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    cohort = _tiny_cohort(tmp_path / "cohort")
    script = (
        "import dataclasses, sys\n"
        "from fedct.config import TrainParams\n"
        "from fedct.stages.train import run_sites\n"
        "p = TrainParams(sites=('A', 'pooled'), steps=100000, channels=(4, 8), strides=(2,),"
        " patch_size=(16, 16, 8), max_shift=(0, 0, 0), val_checks=1, patience=0,"
        " device='cpu', workers=2)\n"
        f"run_sites(p, p.sites, {str(cohort)!r}, {str(tmp_path / 'm')!r})\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'run.db'}"}
    log = (tmp_path / "stderr.txt").open("wb")  # a file: a pipe nobody reads would fill
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 240
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.5)
            workers = [c for c in parent.children()
                       if "spawn_main" in " ".join(c.cmdline())]
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert len(workers) == 2, "the workers did not start"
        # Stopped while both train (their progress bars are out), not while they import.
        err = tmp_path / "stderr.txt"
        while time.monotonic() < deadline and not all(
                f"train {s}: steps" in err.read_text(errors="replace") for s in ("A", "pooled")):
            time.sleep(0.5)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            proc.kill()
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"workers left running: {[w.pid for w in alive]}"
        # Each model's MLflow run ended KILLED, none is left RUNNING for ever.
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run.db'}")
        runs = client.search_runs([client.get_experiment_by_name("fedct").experiment_id])
        assert sorted((r.info.run_name, r.info.status) for r in runs) == [
            ("train-A", "KILLED"), ("train-pooled", "KILLED")], err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        for c in psutil.Process().children(recursive=True):
            if c.pid != os.getpid():
                with __import__("contextlib").suppress(psutil.Error):
                    c.kill()


def test_convergence_reports_best_step_cap_and_the_share_of_models_the_cap_stopped(
        tmp_path: Path) -> None:
    per_model = {"A": {"best_step": 300, "steps": 400, "cap": 400, "cap_hit": True},
                 "B": {"best_step": 120, "steps": 200, "cap": 400, "cap_hit": False},
                 "pooled": {"best_step": 900, "steps": 1000, "cap": 1600, "cap_hit": False},
                 "E": {"best_step": 400, "steps": 400, "cap": 400, "cap_hit": True}}
    out = stage.convergence(per_model)
    assert out["cap_hit_fraction"] == pytest.approx(0.5)
    assert out["models"]["pooled"] == per_model["pooled"] and out["n_models"] == 4
    for site, metrics in per_model.items():
        (tmp_path / site).mkdir()
        (tmp_path / site / "metrics.json").write_text(json.dumps(metrics))
    assert stage.write_convergence(tmp_path) == json.loads(
        (tmp_path / stage.CONVERGENCE_FILE).read_text()) == json.loads(json.dumps(out))


def test_a_model_that_runs_to_its_cap_says_so(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cohort = _tiny_cohort(tmp_path / "cohort")
    metrics = stage.run(dataclasses.replace(TINY, patience=0), "A", cohort, tmp_path / "out")
    assert metrics["cap"] == TINY.steps and metrics["cap_hit"] is True
    assert metrics["best_step"] <= metrics["steps"] == TINY.steps
