"""What `dvc push` sends: no archive path, no patient value (a site's view of its remote).

A scratch DVC repository set up as README describes for a real archive: the repository's
dvc.yaml without the synth stage, the tiny synthetic archive in data/archive (not tracked
by DVC or git: the site's data stays where it is), its study folders renamed after their
patients as many exports name them (``A/SYNTHSATO_KENJI_19371215/SE002/IM00001.dcm``, or
by PatientID). `dvc repro` runs the real catalogue and cohort stages; `dvc push` (and
`dvc push --run-cache`) fill a local remote, whose every file is searched, decompressed
and decoded, for every archive folder path, every name-bearing folder, every reject's
path and every patient value. Then: a second `dvc repro` runs nothing, and a fresh clone
(archive in place, outputs pulled) reruns the catalogue for the file lists that stayed
at the site, where the cohort alone would stop with a clear message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

from tests.phi import assert_no_identifiers

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str], ok: bool = True
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if ok:
        assert proc.returncode == 0, (f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-5000:]}")
    return proc


def _export_by_patient(src: Path, dst: Path) -> set[str]:
    """Copy the archive, each study folder renamed after its patient: family_given_birth
    at sites A, C, E, G, I (the issue's example), the PatientID elsewhere. Returns the
    new folder names."""
    shutil.copytree(src, dst)
    names = set()
    for i, site in enumerate(sorted(p for p in dst.iterdir() if p.is_dir())):
        for study in sorted(site.glob("ST*")):
            ds = pydicom.dcmread(next(study.rglob("IM*.dcm")), stop_before_pixels=True)
            family, given = str(ds.PatientName).split("^")[:2]
            name = (f"{family}_{given}_{ds.PatientBirthDate}" if i % 2 == 0
                    else str(ds.PatientID))
            study.rename(site / name)
            names.add(name)
    return names


@pytest.mark.slow
def test_dvc_push_sends_no_archive_path_and_no_patient_value(tiny_archive, tmp_path: Path
                                                              ) -> None:
    work, remote = tmp_path / "site", tmp_path / "remote"
    work.mkdir()
    study_names = _export_by_patient(tiny_archive["archive"], work / "data" / "archive")
    shutil.copytree(tiny_archive["labels"], work / "data" / "labels")
    archive = work / "data" / "archive"
    phi = pd.read_csv(tiny_archive["truth"] / "phi.csv", dtype=str)
    assert len(study_names) == len(phi) and study_names & set(phi["patient_id"])
    assert any(n.startswith("SYNTH") and n.endswith(tuple(phi["birth_date"]))
               for n in study_names)

    # The repository as a site runs it on its own archive: no synth stage.
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    del pipeline["stages"]["synth"]
    (work / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["cohort"].update(spacing_mm=[12.0, 12.0, 12.0], roi_size=[40, 40, 16])
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".dvcignore", work)
    shutil.copy(REPO / ".gitignore", work)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x"}
    env.pop("MLFLOW_ARTIFACTS_DESTINATION", None)
    env.pop("FEDCT_PSEUDONYM_KEY", None)
    dvc = [str(BIN / "dvc")]
    _run(["git", "init", "-q"], work, env)
    _run(dvc + ["init", "-q"], work, env)
    _run(dvc + ["config", "core.autostage", "true"], work, env)  # as the project's
    _run(dvc + ["remote", "add", "-d", "local", str(remote)], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "study"], work, env)

    # What to look for: every folder of the archive below the sites (a path of any file
    # there contains its folder's), the few files directly in a site folder, the folder
    # names that spell a patient, and every patient value.
    rel = [p.relative_to(archive).as_posix() for p in archive.rglob("*")]
    needles = {r for r in rel if r.count("/") >= 1 and ((archive / r).is_dir()
                                                        or r.count("/") == 1)}
    needles |= study_names
    needles |= set(phi[["name", "patient_id", "accession", "birth_date"]].to_numpy().ravel())
    assert {"A/INCOMING", *(p.parent.relative_to(archive).as_posix()
                            for p in archive.glob("A/*/SE002"))} <= needles

    repro = _run(dvc + ["repro", "cohort"], work, env).stdout
    assert "Running stage 'catalogue'" in repro and "Running stage 'cohort'" in repro
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "repro"], work, env)
    _run(dvc + ["push"], work, env)
    _run(dvc + ["push", "--run-cache"], work, env)
    sent = [p for p in remote.rglob("*") if p.is_file()]
    # Everything DVC caches went: the catalogue's tables and reports, the cohort's cases.
    assert len(sent) > len(list((work / "outputs/cohort/cases").glob("*.npz")))
    assert_no_identifiers(sent, needles)

    # The file lists are where the cohort read them, with the patients' folders in them.
    files = pd.read_parquet(work / "outputs/catalogue_paths/series_files.parquet")
    local_rejects = pd.read_parquet(work / "outputs/catalogue_paths/rejects.parquet")
    assert files["relpath"].str.contains("SYNTH").any()
    assert local_rejects["path"].str.startswith("A/INCOMING/").any()
    # Git carries none of it: the uncached outputs are ignored, not left for `git add`.
    tracked = _run(["git", "ls-files"], work, env).stdout.split()
    assert "dvc.lock" in tracked
    assert not [f for f in tracked if f.startswith(("outputs/", "data/"))], tracked
    for uncached in ("outputs/catalogue_paths/series_files.parquet",
                     "outputs/catalogue_index/manifest.json"):
        assert _run(["git", "check-ignore", "-q", uncached], work, env, ok=False
                    ).returncode == 0, uncached
    # The same search finds a leak in the remote's byte format (a copy of the file lists
    # stored as DVC stores them: by hash, no suffix).
    leak = tmp_path / "leak" / "ab" / "cdef0123"
    leak.parent.mkdir(parents=True)
    shutil.copy(work / "outputs/catalogue_paths/series_files.parquet", leak)
    with pytest.raises(AssertionError, match="found in"):
        assert_no_identifiers([leak], needles)

    # Nothing changed: a second repro runs nothing, status is clean.
    again = _run(dvc + ["repro", "cohort"], work, env).stdout
    assert "Running stage" not in again, again
    status = _run(dvc + ["status", "cohort"], work, env).stdout
    assert "changed" not in status and "deleted" not in status, status

    # A fresh clone at the site: git and `dvc pull` bring all but the file lists.
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    shutil.copytree(archive, clone / "data" / "archive")
    shutil.copytree(work / "data" / "labels", clone / "data" / "labels")
    env_clone = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"}
    _run(dvc + ["pull", "--with-deps", "cohort"], clone, env_clone)
    assert (clone / "outputs/catalogue/series.parquet").is_file()
    assert not (clone / "outputs/catalogue_paths").exists()
    status = _run(dvc + ["status", "cohort"], clone, env_clone).stdout
    assert "catalogue" in status and "deleted" in status, status
    # The cohort alone says what is missing and what to do.
    alone = _run([str(BIN / "fedct"), "cohort", "outputs/catalogue", "outputs/cohort_x",
                  "--archive", "data/archive", "--labels", "data/labels",
                  "--paths-dir", "outputs/catalogue_paths"], clone, env_clone, ok=False)
    assert alone.returncode == 1
    assert "series_files.parquet: missing" in alone.stderr and "rerun `fedct catalogue`" \
        in alone.stderr, alone.stderr
    # `dvc repro` reruns the catalogue; its outputs are the same bytes as those pulled,
    # so the cohort is not rerun and dvc.lock keeps every hash the cohort depends on.
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    cloned = _run(dvc + ["repro", "cohort"], clone, env_clone).stdout
    assert "Running stage 'catalogue'" in cloned
    assert "Running stage 'cohort'" not in cloned, cloned
    relock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert relock["stages"]["cohort"] == lock["stages"]["cohort"]
    assert (clone / "outputs/catalogue_paths/series_files.parquet").read_bytes() == (
        work / "outputs/catalogue_paths/series_files.parquet").read_bytes()
