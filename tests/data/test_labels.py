"""The label set comes from a labels file, in either accepted spelling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedct.data.labels import DEFAULT_CODE, LabelSet, read_labels, write_labels
from fedct.errors import FedctError


def test_value_to_name_and_nnunet_spellings_agree(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"0": "background", "2": "femur", "1": "vastus"}))
    (tmp_path / "b.json").write_text(json.dumps(
        {"labels": {"background": 0, "vastus": 1, "femur": 2}}))
    a, b = read_labels(tmp_path / "a.json"), read_labels(tmp_path / "b.json")
    assert a == b == LabelSet(("background", "vastus", "femur"))
    assert a.n_classes == 3 and a.structures == {1: "vastus", 2: "femur"}


def test_write_then_read_in_a_folder(tmp_path: Path) -> None:
    labels = LabelSet(("background", "x", "y", "z"))
    write_labels(tmp_path, labels)
    assert read_labels(tmp_path) == labels


@pytest.mark.parametrize("content, reason", [
    ({"0": "background", "2": "femur"}, "0..N-1"),
    ({"1": "femur"}, "0..N-1"),
    ({"0": "background", "1": "a", "2": "a"}, "repeat"),
    (["background", "femur"], "mapping"),
    ({"zero": "background"}, "label values"),
])
def test_malformed_label_files_name_the_file(tmp_path: Path, content, reason: str) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(content))
    with pytest.raises(FedctError, match=reason) as err:
        read_labels(path)
    assert str(path) in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FedctError, match="labels file not found"):
        read_labels(tmp_path / "labels.json")


def test_codes_travel_with_the_label_set_and_default_when_absent(tmp_path: Path) -> None:
    femur = ["SCT", "71341001", "Femur"]
    for spelling in ({"0": "background", "1": "vastus", "2": "femur",
                      "codes": {"femur": femur}},
                     {"labels": {"background": 0, "vastus": 1, "femur": 2},
                      "codes": {"femur": femur}}):
        (tmp_path / "l.json").write_text(json.dumps(spelling))
        labels = read_labels(tmp_path / "l.json")
        assert labels.names == ("background", "vastus", "femur")
        assert labels.code(2) == tuple(femur) and labels.code(1) == DEFAULT_CODE
    # Written and read back (the model card carries to_json), codes included.
    write_labels(tmp_path, labels)
    assert read_labels(tmp_path) == labels
    assert LabelSet(("background", "x")).to_json() == {"0": "background", "1": "x"}


@pytest.mark.parametrize("codes, reason", [
    ({"tibia": ["SCT", "12611008", "Tibia"]}, "not in the label set"),
    ({"femur": ["SCT", "71341001"]}, r"\[scheme, value, meaning\]"),
    ({"femur": ["SCT", "", "Femur"]}, "non-empty"),
    ({"femur": ["SCT", "7134\\1001", "Femur"]}, "non-empty"),
    ({"femur": ["SCT", "71341001", "F" * 65]}, "64"),
    (["SCT", "71341001", "Femur"], "must map structure name"),
])
def test_malformed_codes_are_refused_naming_the_file(tmp_path: Path, codes: object,
                                                      reason: str) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"0": "background", "1": "femur", "codes": codes}))
    with pytest.raises(FedctError, match=reason) as info:
        read_labels(path)
    assert str(path) in str(info.value)
