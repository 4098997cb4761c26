"""Series: usable series and reasons, the acquisition columns, nothing lost, site rules,
and each series' files in slice order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedct import dicom
from fedct.catalogue import series as ser
from fedct.config import CatalogueParams
from fedct.errors import FedctError
from fedct.stages import catalogue as stage
from tests.catalogue.archive import series_key


def test_usable_series_and_reasons(archive, catalogued) -> None:
    _, expected = archive
    _, series, _ = catalogued
    by_key = series.set_index("series_key")
    assert len(series) == len(expected["series"])
    for uid, (usable, reason) in expected["series"].items():
        row = by_key.loc[series_key(uid)]
        assert bool(row["usable"]) is usable, (reason, row["reason"])
        if usable:
            assert row["reason"] == ""
        else:
            assert row["reason"].split("; ")[0] == reason, row["reason"]
    assert {"site", "vendor", "model", "kernel", "n_slices", "usable", "reason"} <= set(
        series.columns)


def test_series_columns_hold_the_acquisition(archive, catalogued) -> None:
    _, series, _ = catalogued
    usable = series[series["usable"]].set_index("site")
    siemens = series[series["vendor"] == "SIEMENS"].iloc[0]
    assert siemens["kernel"] == "Br64\\3" and siemens["kernel_class"] == "sharp"
    assert siemens["site"] == "C" and siemens["model"] == "SOMATOM Force"
    assert set(usable["vendor"]) == {"CANON", "SIEMENS"}  # TOSHIBA/CANON_MEC normalised
    axial = series[(series["site"] == "A") & series["usable"]].iloc[0]
    assert axial["n_slices"] == 34 and axial["n_files"] == 34
    assert axial["n_duplicates"] == 3  # the re-sent copies count once
    assert axial["slice_spacing"] == pytest.approx(1.0)
    assert axial["pixel_spacing_row"] == pytest.approx(0.7)
    assert (axial["rows"], axial["cols"]) == (8, 8)
    assert axial["orientation"] == "axial" and axial["image_type"] == "original"
    assert axial["study_ym"] == "2019-03" and axial["kvp"] == 120
    assert axial["thickness_class"] == "thin" and axial["z_extent"] == pytest.approx(33)
    rle = series[(series["site"] == "B") & (series["n_files"] == 34)].iloc[0]
    assert rle["compressed"] and rle["transfer_syntax"] == "1.2.840.10008.1.2.5"
    assert rle["usable"]
    enhanced = series[(series["site"] == "B") & (series["n_files"] == 1)].iloc[0]
    assert enhanced["n_slices"] == 34 and enhanced["usable"]
    assert enhanced["sop_class"] == dicom.ENHANCED_CT_IMAGE_STORAGE
    # One patient key per fake patient: B's two studies belong to one patient.
    assert series.groupby("site")["patient_key"].nunique().to_dict() == {"A": 1, "B": 1,
                                                                         "C": 1}
    assert (series["key_id"] == "demo").all()


def test_every_file_is_catalogued_or_rejected(archive, catalogued) -> None:
    _, expected = archive
    result, series, rejects = catalogued
    m = result.metrics
    assert m["n_files"] == expected["n_files"]
    assert m["n_catalogued_files"] + m["n_rejects"] == m["n_files"]
    assert series["n_files"].sum() == m["n_catalogued_files"]
    got = dict(zip(rejects["path"], rejects["reason"], strict=True))
    assert got == expected["rejects"]
    assert rejects["detail"].str.len().gt(0).all()
    dup = rejects[rejects["reason"] == dicom.DUPLICATE].iloc[0]
    assert dup["detail"].startswith("same SOP instance as A/ST01/SE002/")


def test_series_files_are_each_series_files_in_slice_order() -> None:
    files = pd.DataFrame({
        "relpath": ["s1/b.dcm", "s1/a.dcm", "s1/copy.dcm", "s2/x.dcm", "s1/c.dcm"],
        "sop_key": ["1", "2", "1", "3", "4"],
        "series_key": ["S1", "S1", "S1", "S2", "S1"],
        "pos_n": [2.0, 1.0, 2.0, np.nan, 3.0],
    })
    out = ser.series_files(files)
    assert out.columns.tolist() == ["series_key", "slice", "relpath", "relpath_bytes"]
    # The re-sent copy of SOP 1 counts once (first path kept); files follow pos_n.
    # relpath_bytes: None, every name here is UTF-8.
    assert out.values.tolist() == [["S1", 0, "s1/a.dcm", None], ["S1", 1, "s1/b.dcm", None],
                                   ["S1", 2, "s1/c.dcm", None], ["S2", 0, "s2/x.dcm", None]]
    assert ser.series_files(files.iloc[:0]).columns.tolist() == ["series_key", "slice",
                                                                 "relpath", "relpath_bytes"]


def test_site_rules(tmp_path: Path) -> None:
    files = pd.DataFrame({"relpath": ["A/s/x.dcm", "B/s/y.dcm", "z.dcm", "B/s/w.dcm"],
                          "institution": ["Hospital A", "Hôpital B", None, " Hospital A "]})
    assert ser.site_of(files, "folder").tolist() == ["A", "B", "UNKNOWN", "B"]
    assert ser.site_of(files, "folder", level=1).tolist() == ["s", "s", "UNKNOWN", "s"]
    assert ser.site_of(files, "institution").tolist() == [
        "Hospital A", "Hôpital B", "UNKNOWN", "Hospital A"]
    mapping_csv = tmp_path / "sites.csv"
    mapping_csv.write_text("key,site\nHospital A,SITE1\nB,SITE2\n")
    mapping = ser.load_site_mapping(mapping_csv)
    assert ser.site_of(files, "mapping", mapping=mapping).tolist() == [
        "SITE1", "SITE2", "UNKNOWN", "SITE1"]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,where\n")
    with pytest.raises(FedctError, match="key,site"):
        ser.load_site_mapping(bad)
    with pytest.raises(FedctError, match="cannot read"):
        ser.load_site_mapping(tmp_path / "missing.csv")
    with pytest.raises(FedctError, match="unknown site_rule"):
        ser.site_of(files, "scanner")
    with pytest.raises(FedctError, match="site_mapping"):
        stage.run(CatalogueParams(site_rule="mapping"), tmp_path, tmp_path / "o", track=False)
