"""The fixed cost of a command: ``fedct --help`` and the catalogue's unchanged rescan import
none of torch, MONAI, MLflow or pandas (each a second or more per process), checked in
fresh interpreters; a scan's worker processes never import pandas."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from tests.catalogue.archive import PARAMS, small_archive
from tests.probes import HEAVY, fedct_modules, heavy_modules

REPO = Path(__file__).parents[1]


def _imported(code: str, cwd: Path) -> list[str]:
    """The HEAVY modules a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} " \
            f"if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True,
                         text=True, check=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "FEDCT_PSEUDONYM_KEY"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO),
                                         env.get("PYTHONPATH", "")])
    return env


def test_help_imports_no_heavy_library(tmp_path: Path) -> None:
    code = ("import sys\nfrom fedct.cli import main\nsys.argv = ['fedct', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass")
    assert _imported(code, tmp_path) == []


def test_an_unchanged_rescan_imports_no_heavy_library(tmp_path: Path) -> None:
    root, out = tmp_path / "archive", tmp_path / "out"
    small_archive(root)
    params = dataclasses.replace(PARAMS, workers=2, min_slices=4)
    run = (f"from pathlib import Path\n"
           f"from fedct.config import CatalogueParams\n"
           f"from fedct.stages import catalogue as stage\n"
           f"params = CatalogueParams(**{dataclasses.asdict(params)!r})\n"
           f"result = stage.run(params, Path({str(root)!r}), Path({str(out)!r}), "
           f"progress=False)\n")
    first = _imported(run + "assert not result.up_to_date", tmp_path)
    assert "mlflow" in first and "pandas" in first  # what an update needs, and logs
    assert params.workers == 2
    again = _imported(run + "assert result.up_to_date and result.scan.n_parsed == 0",
                      tmp_path)
    assert again == []


def test_the_scan_workers_import_no_pandas(tmp_path: Path, monkeypatch) -> None:
    from fedct.catalogue import scan as scan_mod
    from fedct.catalogue.index import FileIndex
    from fedct.catalogue.pseudonym import DEMO_KEY, PseudonymKey

    root = tmp_path / "archive"
    small_archive(root)
    monkeypatch.setattr(scan_mod, "TASK_FILES", 2)  # chunks enough for the pool to start
    key = PseudonymKey(DEMO_KEY, demo=True, source="demo")
    with FileIndex(tmp_path / "index", key.key_id) as index:
        stats = scan_mod.scan(root, index, key, workers=2, progress=False)
    assert stats.n_parsed == stats.n_files > 0
    pool = scan_mod.worker_pool(2)
    loaded = [pool.submit(heavy_modules).result() for _ in range(4)]
    assert all(m == [] for m in loaded), loaded
    assert "fedct.catalogue.rows" in pool.submit(fedct_modules).result()
