"""The report: every section from full outputs, notes on partial ones, errors on bad ones."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fedct.errors import FedctError
from fedct.report.build import build_report, write_report
from tests.report.fakes import (
    METHODS,
    NO_ROUNDS,
    PARTS,
    REASON,
    cases_table,
    write_promote,
)
from tests.report.parse import SECTION_IDS, parse

# Figures each section draws or embeds when every input is there.
FIGURES = {"vendor-site": 0, "shift-candidates": 1, "shift-matrices": 2,
           "uncertainty-dice": 2, "federated-rounds": 1, "held-out": 1, "promotion": 0}
# The files each section reads, as its notes name them.
INPUTS = {
    "catalogue": {"vendor-site": ["catalogue/exam_counts.csv", "catalogue/usable_by_site.csv"],
                  "shift-candidates": ["catalogue/shift_sites.csv",
                                       "catalogue/shift_combos.csv",
                                       "catalogue/shift_heatmap.png"]},
    "uncertainty": {"shift-matrices": ["uncertainty/shift_dice.csv",
                                       "uncertainty/shift_uncertainty.csv",
                                       "uncertainty/site_ranking.csv"],
                    "uncertainty-dice": ["uncertainty/threshold.json",
                                         "uncertainty/signals.csv",
                                         "uncertainty/risk_coverage.png"]},
    "federated": {"federated-rounds": ["federated/<method>/history.csv"]},
    "evaluate": {"held-out": ["evaluate/summary.csv", "evaluate/paired.csv"]},
    "promote": {"promotion": ["promote/decision.json"]},
}


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "outputs"))


def test_full_outputs_give_every_section_with_its_figures_and_tables(
        full_outputs: Path) -> None:
    report = build_report(full_outputs)
    doc = parse(report.html)
    assert list(doc.sections) == list(SECTION_IDS)
    assert report.missing == ()
    for sid, section in doc.sections.items():
        assert section.missing == [], (sid, section.missing)
        assert len(section.images) == FIGURES[sid], sid
        for png in section.images:
            with Image.open(io.BytesIO(png)) as im:
                im.load()
                assert im.format == "PNG" and im.width > 100 and im.height > 100, sid
        assert section.table_rows and all(n > 0 for n in section.table_rows), sid
    s = doc.sections
    # Values from the inputs land in their sections.
    assert "SIEMENS" in s["vendor-site"].text and "PHILIPS" in s["shift-candidates"].text
    assert "Mean entropy" in s["shift-matrices"].text
    assert "1 pairs with an infinite entropy" in s["uncertainty-dice"].text
    assert all(m in s["federated-rounds"].text for m in METHODS)
    assert s["federated-rounds"].table_rows == [len(METHODS)]
    assert "self_train" in s["held-out"].text and "tent" in s["held-out"].text
    assert "dice_pelvis" not in s["held-out"].text  # per structure: in the CSV only
    assert "PROMOTED" in s["promotion"].text and REASON in s["promotion"].text
    assert "difference.lo" in s["promotion"].text  # nested numbers, flattened


def test_the_page_is_static_and_self_contained(full_outputs: Path) -> None:
    report = build_report(full_outputs)
    doc = parse(report.html)
    assert "script" not in doc.tags and "iframe" not in doc.tags and "link" not in doc.tags
    assert all(s.startswith(("data:image/png;base64,", "#")) for s in doc.srcs), doc.srcs
    assert "http://" not in report.html and "https://" not in report.html
    assert "url(" not in report.html  # no CSS fetch either
    # Neither the machine's paths nor per-case keys enter the page.
    assert str(full_outputs) not in report.html
    keys = cases_table(__import__("numpy").random.default_rng(0))["series_key"]
    assert not any(k in report.html for k in keys)


def test_same_inputs_give_the_same_bytes(full_outputs: Path, tmp_path: Path) -> None:
    a = write_report(build_report(full_outputs), tmp_path / "a" / "report.html")
    b = write_report(build_report(full_outputs), tmp_path / "b.html")
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_empty_outputs_folder_gives_a_note_in_every_section(tmp_path: Path) -> None:
    report = build_report(tmp_path)
    doc = parse(report.html)
    assert list(doc.sections) == list(SECTION_IDS)
    for part in PARTS:
        for sid, files in INPUTS[part].items():
            notes = doc.sections[sid].missing
            assert notes == [f"not available: {f} missing" for f in files], (sid, notes)
            assert doc.sections[sid].images == [] and doc.sections[sid].table_rows == []
    assert len(report.missing) == sum(len(f) for p in INPUTS.values() for f in p.values())


@pytest.mark.parametrize("absent", PARTS)
def test_a_stage_not_run_yet_blanks_only_its_sections(absent: str, tmp_path: Path,
                                                      full_outputs: Path) -> None:
    root = _copy(full_outputs, tmp_path)
    shutil.rmtree(root / absent)
    doc = parse(build_report(root).html)
    for part, sections in INPUTS.items():
        for sid, files in sections.items():
            expected = [f"not available: {f} missing" for f in files] if part == absent else []
            assert doc.sections[sid].missing == expected, (sid, part)
            assert (doc.sections[sid].images == []) == (part == absent or FIGURES[sid] == 0)


def test_methods_without_rounds_are_listed_not_missing(full_outputs: Path) -> None:
    s = parse(build_report(full_outputs).html).sections["federated-rounds"]
    assert s.missing == [] and len(s.images) == 1 and s.table_rows == [len(METHODS)]
    assert "Methods without rounds (no history.csv): " + ", ".join(NO_ROUNDS) in s.text


def test_a_federated_folder_with_no_history_yet_is_a_note(tmp_path: Path) -> None:
    (tmp_path / "federated" / "one_shot").mkdir(parents=True)
    s = parse(build_report(tmp_path).html).sections["federated-rounds"]
    assert s.missing == ["not available: federated/<method>/history.csv missing"]
    assert s.images == []


def test_a_refusal_says_the_champion_stays(tmp_path: Path, full_outputs: Path) -> None:
    root = _copy(full_outputs, tmp_path)
    write_promote(root / "promote", promote=False)
    text = parse(build_report(root).html).sections["promotion"].text
    assert "REFUSED" in text and "champion stays" in text and "PROMOTED" not in text
    assert REASON in text


def test_other_names_of_the_interval_columns_are_read(tmp_path: Path,
                                                      full_outputs: Path) -> None:
    import pandas as pd

    root = _copy(full_outputs, tmp_path)
    path = root / "evaluate" / "summary.csv"
    pd.read_csv(path).rename(columns={"dice": "mean", "dice_lo": "lo",
                                      "dice_hi": "hi"}).to_csv(path, index=False)
    s = parse(build_report(root).html).sections["held-out"]
    assert len(s.images) == 1 and s.missing == []


def _break_history(root: Path) -> Path:
    p = root / "federated" / METHODS[0] / "history.csv"
    p.write_text("round,dice\n1,0.5\n")
    return p


def _break_decision(root: Path) -> Path:
    p = root / "promote" / "decision.json"
    p.write_text(json.dumps({"promote": "yes", "reasons": []}))
    return p


def _break_summary(root: Path) -> Path:
    p = root / "evaluate" / "summary.csv"
    p.write_text("model,site,dice\nA,C,0.5\n")
    return p


def _break_png(root: Path) -> Path:
    p = root / "uncertainty" / "risk_coverage.png"
    p.write_bytes(b"GIF89a not a png")
    return p


def _break_matrix(root: Path) -> Path:
    p = root / "uncertainty" / "shift_dice.csv"
    p.write_text("model,A,B\nA,0.8,high\n")
    return p


def _break_json(root: Path) -> Path:
    p = root / "uncertainty" / "threshold.json"
    p.write_text("{not json")
    return p


@pytest.mark.parametrize("breaker, reason", [
    (_break_history, "no column 'val_dice'"), (_break_decision, "'promote' must be"),
    (_break_summary, "interval bounds"), (_break_png, "not a PNG image"),
    (_break_matrix, "column 'B' is not numeric"), (_break_json, "not readable JSON")])
def test_a_malformed_input_is_an_error_naming_the_file(breaker, reason: str, tmp_path: Path,
                                                       full_outputs: Path) -> None:
    root = _copy(full_outputs, tmp_path)
    path = breaker(root)
    with pytest.raises(FedctError) as err:
        build_report(root)
    assert str(path) in str(err.value) and reason in str(err.value)


def test_outputs_that_are_not_a_folder_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(FedctError, match="not a directory"):
        build_report(tmp_path / "nowhere")


def test_fakes_cover_every_part() -> None:
    # The parametrised tests above rely on PARTS naming every input folder.
    from fedct.report.sections import INPUT_DIRS

    assert set(PARTS) == set(INPUT_DIRS) == set(INPUTS)


def test_a_method_that_continues_fedavg_is_drawn_after_its_rounds() -> None:
    from fedct.report.sections import continued_rounds

    fedavg = pd.DataFrame({"round": [1, 2, 3, 4], "val_dice": [0.2, 0.5, 0.7, 0.8]})
    self_train = pd.DataFrame({"round": [1], "val_dice": [0.82]})
    out = continued_rounds({"fedavg": fedavg, "self_train": self_train, "fedprox": fedavg},
                           {"self_train": "fedavg", "fedprox": None})
    assert list(out["self_train"]["round"]) == [5]
    assert list(out["fedavg"]["round"]) == list(out["fedprox"]["round"]) == [1, 2, 3, 4]
    # A start without rounds of its own (TENT's FedAvg absent here) moves nothing.
    assert list(continued_rounds({"self_train": self_train}, {"self_train": "fedavg"})[
        "self_train"]["round"]) == [1]
