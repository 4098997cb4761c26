"""The git tags of every run: a working tree counts as dirty for code, not for dvc.lock."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedct import provenance


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd,
                   check=True, capture_output=True)


def test_dvc_lock_rewritten_by_dvc_repro_does_not_make_the_tree_dirty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _git("init", "-q", cwd=tmp_path)
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    _git("add", ".", cwd=tmp_path)
    _git("commit", "-qm", "init", cwd=tmp_path)
    monkeypatch.chdir(tmp_path / "src")  # from a subfolder too
    assert provenance.git_dirty() is False
    (tmp_path / "dvc.lock").write_text("stages: {synth: {}}\n")  # what every stage does
    assert provenance.git_dirty() is False
    (tmp_path / "src" / "code.py").write_text("x = 2\n")  # a code change is dirty
    assert provenance.git_dirty() is True
