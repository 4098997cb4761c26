"""The scan runner: a Dask cluster gives the same catalogue as the process pool."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from fedct.catalogue.scan import secret_exposure
from fedct.stages import catalogue as stage
from tests.catalogue.archive import PARAMS


def test_dask_cluster_gives_the_same_catalogue(archive, catalogued, tmp_path: Path) -> None:
    from distributed import LocalCluster

    root, _ = archive
    _, series, rejects = catalogued
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        params = dataclasses.replace(PARAMS, scheduler=cluster.scheduler_address)
        result = stage.run(params, root, tmp_path / "out", track=False, progress=False)
    assert result.scan.n_parsed == result.metrics["n_files"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "series.parquet"), series)
    pd.testing.assert_frame_equal(pd.read_parquet(result.local_rejects_path), rejects)


@pytest.mark.parametrize(("address", "warned"), [
    ("tls://10.0.0.5:8786", False), ("inproc://10.0.0.5/123/1", False),
    ("tcp://127.0.0.1:8786", False), ("tcp://localhost:8786", False),
    ("tcp://[::1]:8786", False), ("tcp://10.0.0.5:8786", True),
    ("10.0.0.5:8786", True), ("ucx://node7:13337", True)])
def test_a_secret_sent_unencrypted_off_this_machine_is_warned_about(address: str,
                                                                    warned: bool) -> None:
    why = secret_exposure(address)
    assert (why is not None) == warned
    if warned:
        assert address in why and "tls://" in why
