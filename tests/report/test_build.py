"""The report: every section from full outputs, notes on partial ones, errors on bad ones."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fedct.errors import FedctError
from fedct.report.build import build_report, write_report
from fedct.report.html import MAX_ROWS
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
FIGURES = {"summary": 0, "vendor-site": 0, "shift-candidates": 1, "shift-matrices": 2,
           "uncertainty-dice": 2, "federated-rounds": 1, "held-out": 1, "promotion": 0}
# The files each section reads, in the order its notes name them, with their stage.
INPUTS = {
    "summary": [("promote", "promote/decision.json"),
                ("uncertainty", "uncertainty/metrics.json")],
    "vendor-site": [("catalogue", "catalogue/exam_counts.csv"),
                    ("catalogue", "catalogue/usable_by_site.csv")],
    "shift-candidates": [("catalogue", "catalogue/shift_sites.csv"),
                         ("catalogue", "catalogue/shift_combos.csv"),
                         ("catalogue", "catalogue/shift_heatmap.png")],
    "shift-matrices": [("uncertainty", "uncertainty/shift_dice.csv"),
                       ("uncertainty", "uncertainty/shift_uncertainty.csv"),
                       ("uncertainty", "uncertainty/site_ranking.csv")],
    "uncertainty-dice": [("uncertainty", "uncertainty/threshold.json"),
                         ("uncertainty", "uncertainty/signals.csv"),
                         ("uncertainty", "uncertainty/risk_coverage.png")],
    "federated-rounds": [("federated", "federated/<method>/history.csv")],
    "held-out": [("evaluate", "evaluate/summary.csv"), ("evaluate", "evaluate/paired.csv")],
    "promotion": [("promote", "promote/decision.json")],
}


def _notes(sid: str, parts: tuple[str, ...]) -> list[str]:
    return [f"not available: {f} missing" for part, f in INPUTS[sid] if part in parts]


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
        if sid != "summary":  # the summary is sentences, no table
            assert section.table_rows and all(n > 0 for n in section.table_rows), sid
        assert all(n <= MAX_ROWS for n in section.table_rows), sid
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
    # No raw JSON in any cell: the per-site numbers are a table of their own.
    assert not any("{" in c or "[" in c for sec in s.values() for c in sec.cells)
    assert s["promotion"].table_rows[-1] == 2  # one row per held-out site


def test_the_page_is_static_and_self_contained(full_outputs: Path) -> None:
    report = build_report(full_outputs)
    doc = parse(report.html)
    assert "script" not in doc.tags and "iframe" not in doc.tags and "link" not in doc.tags
    # Figures are inline; links go to the page's sections or to the full CSVs beside it.
    assert all(s.startswith(("data:image/png;base64,", "#"))
               or re.fullmatch(r"\.\./(catalogue|uncertainty|evaluate)/\w+\.csv", s)
               for s in doc.srcs), doc.srcs
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
    for sid, section in doc.sections.items():
        assert section.missing == _notes(sid, PARTS), sid
        assert section.images == [] and section.table_rows == []
    assert set(report.missing) == {f for files in INPUTS.values() for _, f in files}


@pytest.mark.parametrize("absent", PARTS)
def test_a_stage_not_run_yet_blanks_only_its_sections(absent: str, tmp_path: Path,
                                                      full_outputs: Path) -> None:
    root = _copy(full_outputs, tmp_path)
    shutil.rmtree(root / absent)
    doc = parse(build_report(root).html)
    for sid, files in INPUTS.items():
        assert doc.sections[sid].missing == _notes(sid, (absent,)), (sid, absent)
        reads_it = any(part == absent for part, _ in files)
        assert (doc.sections[sid].images == []) == (reads_it or FIGURES[sid] == 0)


def test_methods_without_rounds_are_listed_not_missing(full_outputs: Path) -> None:
    s = parse(build_report(full_outputs).html).sections["federated-rounds"]
    assert s.missing == [] and len(s.images) == 1 and s.table_rows == [len(METHODS)]
    assert "Methods without rounds (no history.csv): " + ", ".join(NO_ROUNDS) in s.text


def test_a_federated_folder_with_no_history_yet_is_a_note(tmp_path: Path) -> None:
    (tmp_path / "federated" / "one_shot").mkdir(parents=True)
    s = parse(build_report(tmp_path).html).sections["federated-rounds"]
    assert s.missing == ["not available: federated/<method>/history.csv missing"]
    assert s.images == []


def test_the_first_section_holds_the_decision_and_the_headline_numbers(
        full_outputs: Path) -> None:
    doc = parse(build_report(full_outputs).html)
    first, summary = next(iter(doc.sections)), doc.sections["summary"]
    assert first == "summary"
    text = " ".join(summary.text.split())
    assert "PROMOTED: candidate fedavg, version 3, alias champion" in text
    # The gate's interval of candidate minus best local, and the means it compares.
    assert ("fedavg minus A, mean case Dice +0.030 [+0.012, +0.050] (95 % "
            "cluster-bootstrap interval; means 0.650 against 0.620)") in text
    # The failure-detection result: AUROC with its interval and the flag's operating point.
    assert ("entropy tells segmentations with Dice below 0.700 from the others on test "
            "pairs with AUROC 0.900 [0.800, 0.970] (95 % interval); a case is flagged at "
            "entropy >= 0.25 (sensitivity 0.83, specificity 0.90)") in text


@pytest.mark.parametrize("champion, with_key, says", [
    (None, True, "REFUSED: candidate fedavg, version 3, alias champion; no champion yet"),
    ("2", True, "REFUSED: candidate fedavg, version 3, alias champion; the champion stays "
                "version 2"),
    (None, False, "the registry's champion, if any, is unchanged"),
])
def test_a_refusal_says_who_the_champion_is(tmp_path: Path, full_outputs: Path,
                                            champion: str | None, with_key: bool,
                                            says: str) -> None:
    root = _copy(full_outputs, tmp_path)
    write_promote(root / "promote", promote=False, champion=champion, with_champion=with_key)
    doc = parse(build_report(root).html)
    for sid in ("summary", "promotion"):
        text = doc.sections[sid].text
        assert says in text and "PROMOTED" not in text, sid
    assert REASON in doc.sections["promotion"].text
    assert ("champion stays" in doc.sections["summary"].text) == (champion is not None)


def test_long_tables_are_cut_and_link_their_csv(tmp_path: Path, full_outputs: Path) -> None:
    root = _copy(full_outputs, tmp_path)
    paired = pd.read_csv(root / "evaluate" / "paired.csv")
    # As many rows as the demo's paired table (108): every reference and site.
    long = pd.concat([paired, *(paired.assign(site=f"S{i}") for i in range(8))],
                     ignore_index=True)
    long.to_csv(root / "evaluate" / "paired.csv", index=False)
    combos = root / "catalogue" / "shift_sites.csv"
    sites = pd.read_csv(combos)
    pd.concat([sites] * 10, ignore_index=True).to_csv(combos, index=False)
    doc = parse(build_report(root).html)
    held = doc.sections["held-out"]
    # The paired table shows the main comparison only (vs best local, every site); the
    # summary table the rows over every held-out site; both link their CSV.
    assert held.table_rows == [len(METHODS) + len(NO_ROUNDS) + 3, len(METHODS)]
    assert held.links == ["../evaluate/summary.csv", "../evaluate/paired.csv"]
    shift = doc.sections["shift-candidates"]
    assert shift.table_rows[0] == MAX_ROWS
    assert f"first {MAX_ROWS} of {len(sites) * 10} rows" in shift.text
    assert "../catalogue/shift_sites.csv" in shift.links


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

    assert set(PARTS) == set(INPUT_DIRS) == {p for f in INPUTS.values() for p, _ in f}


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
