"""Pseudonymisation: where the key comes from, and what a new key does to the index."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from fedct.catalogue import pseudonym as ps
from fedct.config import CatalogueParams
from fedct.errors import FedctError
from fedct.stages import catalogue as stage
from tests.catalogue.archive import PARAMS, small_archive


def test_pseudonym_key_sources(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ps.KEY_ENV, raising=False)
    no_demo = CatalogueParams(demo_key=False)
    with pytest.raises(ps.PseudonymKeyError, match="FEDCT_PSEUDONYM_KEY"):
        ps.load_key(no_demo)
    missing = dataclasses.replace(no_demo, key_file=str(tmp_path / "nope.key"))
    with pytest.raises(ps.PseudonymKeyError, match="nope.key"):
        ps.load_key(missing)
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    with pytest.raises(ps.PseudonymKeyError, match="at least"):
        ps.load_key(dataclasses.replace(no_demo, key_file=str(short)))
    good = tmp_path / "site.key"
    good.write_text("a-secret-the-site-keeps-0123456789\n")
    key = ps.load_key(dataclasses.replace(no_demo, key_file=str(good)))
    assert not key.demo and key.source == "file" and key.key_id != "demo"
    assert "secret" not in repr(key)
    monkeypatch.setenv(ps.KEY_ENV, "another-secret-from-the-environment")
    env_key = ps.load_key(dataclasses.replace(no_demo, key_file=str(good)))
    assert env_key.source == "env" and env_key.key_id != key.key_id
    assert ps.load_key(CatalogueParams()).source == "env"  # the variable wins over demo


def test_key_errors_are_fedct_errors() -> None:
    assert issubclass(ps.PseudonymKeyError, FedctError)


def test_pseudonyms_are_keyed_and_separated_by_kind() -> None:
    a = ps.pseudonym(ps.DEMO_KEY, "series", "1.2.3")
    assert len(a) == 32 and a == ps.pseudonym(ps.DEMO_KEY, "series", "1.2.3")
    assert a != ps.pseudonym(ps.DEMO_KEY, "study", "1.2.3")
    assert a != ps.pseudonym(b"another-key-of-the-site-0123456789", "series", "1.2.3")


@pytest.mark.parametrize("key_bytes", [16, 63, 64, 65, 200])
def test_pseudonyms_are_hmac_sha256_for_any_key_length(key_bytes: int) -> None:
    """The hasher keeps the padded key's hash states; keys longer than a SHA-256 block
    (64 bytes) are hashed first, as RFC 2104 says: the same digests as ``hmac``."""
    secret = bytes(range(7, 7 + key_bytes))

    def reference(kind: str, value: str) -> str:
        msg = f"{kind}:{value}".encode("utf-8", "surrogateescape")
        return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:32]

    hasher = ps.Hasher(secret)
    values = ["1.2.3", "1.2.3", "", None, "Müller", "x\udcff", "1.2.4"]
    assert hasher("study", "1.2.3") == reference("study", "1.2.3")
    assert hasher("study", "") == reference("study", "")
    expected = [reference("series", v) if v else None for v in values]
    assert hasher.column("series", values) == expected
    assert hasher.column("series", values, distinct=True) == expected


def test_site_key_changes_pseudonyms_and_rebuilds_index(tmp_path: Path, monkeypatch) -> None:
    root, out = tmp_path / "archive", tmp_path / "out"
    small_archive(root)
    params = dataclasses.replace(PARAMS, workers=1, min_slices=4)
    monkeypatch.delenv(ps.KEY_ENV, raising=False)
    demo = stage.run(params, root, out, track=False, progress=False)
    monkeypatch.setenv(ps.KEY_ENV, "a-secret-the-site-keeps-0123456789")
    site = stage.run(params, root, out, track=False, progress=False)
    assert site.scan.n_parsed == 11  # another key: the old index cannot be reused
    assert site.metrics["demo_key"] is False and demo.metrics["demo_key"] is True
    series = pd.read_parquet(out / "series.parquet")
    assert (series["key_id"] == site.metrics["key_id"]).all()
    assert pq.read_schema(out / "series.parquet").metadata[b"fedct.demo_key"] == b"false"
    files = pd.read_parquet(site.series_files_path)
    assert set(files["series_key"]) == set(series["series_key"])  # the new pseudonyms
