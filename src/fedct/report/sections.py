"""One function per report section: read that section's pipeline outputs, build its HTML.

Each builder takes the outputs folder (the one holding ``catalogue/``, ``uncertainty/``,
``federated/``, ``evaluate/`` and ``promote/``) and returns a :class:`Section`. An input
that is not there becomes a visible "not available: <file> missing" note in its section,
so the report also documents a partial pipeline; an input that is there but cannot be
read, or lacks a column the section needs, is a :class:`FedctError` naming the file.

The page answers first (``fedct.report.summary``), then the evidence in ``DETAILS``
order, the data's description last. Tables show at most ``html.MAX_ROWS`` rows and link
the full CSV.

The inputs hold site letters, model names and pseudonymised series keys only; the report
shows aggregates (tables of counts and means, figures), never a per-case row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedct.errors import FedctError
from fedct.report import figures
from fedct.report.html import (
    PNG_MAGIC,
    Section,
    bullet_list,
    figure,
    heading,
    missing_note,
    paragraph,
    table,
    text,
)

CATALOGUE, UNCERTAINTY, FEDERATED, EVALUATE, PROMOTE = (
    "catalogue", "uncertainty", "federated", "evaluate", "promote")
#: The stage folders the report reads (DVC deps of the report stage).
INPUT_DIRS = (CATALOGUE, UNCERTAINTY, FEDERATED, EVALUATE, PROMOTE)
TOP_COMBOS = 15
# Column names the evaluate stage may give the estimate and its interval bounds.
ESTIMATE_COLUMNS = ("dice", "mean_dice", "dice_mean", "mean", "estimate")
LO_COLUMNS = ("lo", "dice_lo", "ci_lo", "lower")
HI_COLUMNS = ("hi", "dice_hi", "ci_hi", "upper")
SIGNAL_COLUMNS = ("signal", "kind", "subset", "n", "n_failed", "spearman", "auroc",
                  "auroc_lo", "auroc_hi", "aurc")


@dataclass
class Inputs:
    """Reads files under ``root`` (paths relative to it); remembers which were missing."""

    root: Path
    missing: list[str] = field(default_factory=list)

    def _file(self, rel: str) -> Path | None:
        path = self.root / rel
        if path.is_file():
            return path
        self.missing.append(rel)
        return None

    def csv(self, rel: str, required: Sequence[str] = (), index_col: int | None = None
            ) -> pd.DataFrame | None:
        path = self._file(rel)
        if path is None:
            return None
        try:
            df = pd.read_csv(path, index_col=index_col)
        except (OSError, UnicodeDecodeError, pd.errors.ParserError,
                pd.errors.EmptyDataError) as exc:
            raise FedctError(f"{path}: not a readable CSV table ({exc})") from exc
        absent = [c for c in required if c not in df.columns]
        if absent:
            raise FedctError(f"{path}: no column {', '.join(map(repr, absent))} "
                             f"(has {list(map(str, df.columns))})")
        return df

    def json(self, rel: str, required: Sequence[str] = ()) -> dict[str, Any] | None:
        path = self._file(rel)
        if path is None:
            return None
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FedctError(f"{path}: not readable JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise FedctError(f"{path}: expected a JSON object, found {type(obj).__name__}")
        absent = [k for k in required if k not in obj]
        if absent:
            raise FedctError(f"{path}: no key {', '.join(map(repr, absent))}")
        return obj

    def png(self, rel: str) -> bytes | None:
        path = self._file(rel)
        if path is None:
            return None
        data = path.read_bytes()
        if not data.startswith(PNG_MAGIC):
            raise FedctError(f"{path}: not a PNG image")
        return data

    def numeric(self, rel: str, df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
        """``df`` with ``columns`` as floats; a value that is not a number names the file."""
        out = df.copy()
        for c in columns:
            try:
                out[c] = pd.to_numeric(out[c]).astype(float)
            except (TypeError, ValueError) as exc:
                raise FedctError(f"{self.root / rel}: column {c!r} is not numeric "
                                 f"({exc})") from exc
        return out

    def section(self, sid: str, title: str, parts: Sequence[str]) -> Section:
        return Section(sid, title, tuple(parts), tuple(self.missing))


def _first(columns: Sequence[str], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in columns), None)


def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, dict):  # never raw JSON in a cell: "key value; key value"
        return "; ".join(f"{k} {_scalar(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return (" | " if any(isinstance(x, dict) for x in v) else ", ").join(
            _scalar(x) for x in v)
    return str(v)


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as (dotted key, formatted value) rows, in insertion order."""
    if not isinstance(obj, dict):
        return [(prefix or "value", _scalar(obj))]
    rows: list[tuple[str, str]] = []
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        rows.extend(flatten(v, key) if isinstance(v, dict) and v else [(key, _scalar(v))])
    return rows


# --- 1. vendor x site ---------------------------------------------------------------------


def vendor_site(root: Path) -> Section:
    """Exams per vendor x site (the source study's layout) and usable series per site."""
    r = Inputs(root)
    parts = []
    counts = r.csv(f"{CATALOGUE}/exam_counts.csv", required=("vendor",))
    parts.append(missing_note(f"{CATALOGUE}/exam_counts.csv") if counts is None else
                 table(counts, "Exams (distinct studies) per vendor and site, with totals",
                       source=f"{CATALOGUE}/exam_counts.csv"))
    usable = r.csv(f"{CATALOGUE}/usable_by_site.csv", required=("site",))
    parts.append(missing_note(f"{CATALOGUE}/usable_by_site.csv") if usable is None else
                 table(usable, "Series usable by AI (axial 3D stack of >= 32 slices) per site",
                       source=f"{CATALOGUE}/usable_by_site.csv"))
    return r.section("vendor-site", "Exams by vendor and site", parts)


# --- 2. shift candidates ------------------------------------------------------------------


def shift_candidates(root: Path) -> Section:
    """Sites ranked by how their acquisition mix differs, the most site-specific
    (site, condition) cells, and the catalogue's residual heatmap."""
    r = Inputs(root)
    parts = []
    sites = r.csv(f"{CATALOGUE}/shift_sites.csv", required=("site", "jsd"))
    parts.append(missing_note(f"{CATALOGUE}/shift_sites.csv") if sites is None else table(
        sites, "Sites ranked by Jensen-Shannon divergence of their acquisition mix from "
               "the other sites", source=f"{CATALOGUE}/shift_sites.csv"))
    combos = r.csv(f"{CATALOGUE}/shift_combos.csv", required=("site", "condition", "residual"))
    if combos is None:
        parts.append(missing_note(f"{CATALOGUE}/shift_combos.csv"))
    else:
        parts.append(table(combos.head(TOP_COMBOS),
                           f"Most site-specific acquisition conditions (top "
                           f"{min(TOP_COMBOS, len(combos))} of {len(combos)}, by adjusted "
                           "residual)", source=f"{CATALOGUE}/shift_combos.csv"))
    png = r.png(f"{CATALOGUE}/shift_heatmap.png")
    parts.append(missing_note(f"{CATALOGUE}/shift_heatmap.png") if png is None else figure(
        png, "shift candidates heatmap", "Adjusted residuals of site x acquisition condition "
        "(red: more series than independence predicts; numbers: series)"))
    return r.section("shift-candidates", "Domain-shift candidates (DICOM headers)", parts)


# --- 3. shift matrices --------------------------------------------------------------------


def signal_name(r: Inputs, required: bool = True) -> tuple[str | None, dict[str, Any]]:
    """The frozen label-free signal and its threshold record (threshold.json, else the
    uncertainty metrics); (None, {}) when neither file is there (recorded as missing
    when the section ``required`` it)."""
    for rel in (f"{UNCERTAINTY}/threshold.json", f"{UNCERTAINTY}/metrics.json"):
        if (r.root / rel).is_file():
            obj = r.json(rel, required=("signal",))
            assert obj is not None
            return str(obj["signal"]), obj
    if required:
        r.missing.append(f"{UNCERTAINTY}/threshold.json")
    return None, {}


def shift_matrices(root: Path) -> Section:
    """(model x test site) mean Dice and mean label-free uncertainty, and the label-free
    site ranking."""
    r = Inputs(root)
    parts = []
    # Without the threshold record only the title loses the signal's name.
    signal, _ = signal_name(r, required=False)
    label = signal or "uncertainty"
    for name, title, cmap, fmt in (("shift_dice", "Mean test Dice", "viridis", ".2f"),
                                   ("shift_uncertainty", f"Mean {label}", "magma", ".3g")):
        rel = f"{UNCERTAINTY}/{name}.csv"
        m = r.csv(rel, index_col=0)
        if m is None:
            parts.append(heading(title) + missing_note(rel))
            continue
        m = r.numeric(rel, m, list(m.columns))
        m.index, m.columns = m.index.astype(str), m.columns.astype(str)
        m.index.name = "model"
        parts.append(heading(f"{title}: model (rows) x test site (columns)"))
        parts.append(figure(figures.heatmap(m, title, cmap, fmt), f"{name} heatmap"))
        parts.append(table(m, index=True, source=rel))
    ranking = r.csv(f"{UNCERTAINTY}/site_ranking.csv", required=("site",))
    parts.append(missing_note(f"{UNCERTAINTY}/site_ranking.csv") if ranking is None else table(
        ranking, "Label-free site ranking (models that never saw the site; median signal "
                 "with 95 % interval)", source=f"{UNCERTAINTY}/site_ranking.csv"))
    return r.section("shift-matrices", "Shift matrices (every model on every site)", parts)


# --- 4. uncertainty against Dice -----------------------------------------------------------


def uncertainty_dice(root: Path) -> Section:
    """Scatter of the frozen label-free signal against case Dice (test pairs), the table
    of every signal's failure detection, and the risk-coverage curves."""
    r = Inputs(root)
    parts = []
    signal, record = signal_name(r)
    rel = f"{UNCERTAINTY}/cases.csv"
    if signal is None:
        parts.append(missing_note(f"{UNCERTAINTY}/threshold.json"))
    else:
        cases = r.csv(rel, required=("site", "dice", signal))
        if cases is None:
            parts.append(missing_note(rel))
        else:
            parts.append(_scatter(r, rel, cases, signal, record))
    sig = r.csv(f"{UNCERTAINTY}/signals.csv", required=("signal",))
    if sig is None:
        parts.append(missing_note(f"{UNCERTAINTY}/signals.csv"))
    else:
        if "level" in sig.columns:
            sig = sig[sig["level"] == "case"]
        if "subset" in sig.columns and (sig["subset"] == "all").any():
            sig = sig[sig["subset"] == "all"]
        cols = [c for c in SIGNAL_COLUMNS if c in sig.columns]
        parts.append(table(sig[cols], "Failure detection on test pairs, per case: Spearman "
                                      "with Dice, AUROC [95 % interval], AURC (lower is "
                                      "better)", source=f"{UNCERTAINTY}/signals.csv"))
    png = r.png(f"{UNCERTAINTY}/risk_coverage.png")
    parts.append(missing_note(f"{UNCERTAINTY}/risk_coverage.png") if png is None else figure(
        png, "risk-coverage curves", "Risk-coverage of every signal and baseline on test "
        "pairs (the frozen signal bold)"))
    return r.section("uncertainty-dice", "Uncertainty against Dice", parts)


def _scatter(r: Inputs, rel: str, cases: pd.DataFrame, signal: str,
             record: dict[str, Any]) -> str:
    cases = r.numeric(rel, cases, ["dice", signal])
    if "split" in cases.columns and (cases["split"] == "test").any():
        cases, which = cases[cases["split"] == "test"], "test"
    else:
        which = "evaluated"
    labelled = cases.dropna(subset=["dice"])
    finite = labelled[np.isfinite(labelled[signal])]
    hidden = len(labelled) - len(finite)
    if finite.empty:
        return heading(f"{signal} against Dice") + paragraph(
            f"no labelled {which} pair with a finite {signal} in {rel}")
    threshold = record.get("threshold", record.get("flag_threshold"))
    fail_at = record.get("failure_dice")
    png = figures.uncertainty_scatter(
        finite, signal, float(threshold) if threshold is not None else None,
        float(fail_at) if fail_at is not None else None)
    caption = (f"{len(finite)} labelled {which} (model, case) pairs; dashed: failure Dice"
               + (f" {float(fail_at):.3f}" if fail_at is not None else "")
               + "; dotted: flag threshold"
               + (f" {float(threshold):.3g}" if threshold is not None else ""))
    if hidden:
        caption += (f"; {hidden} pairs with an infinite {signal} (a structure not "
                    "predicted) are not shown")
    return heading(f"{signal} against Dice") + figure(png, "uncertainty against Dice", caption)


# --- 5. federated rounds --------------------------------------------------------------------


def federated_rounds(root: Path) -> Section:
    """Global validation Dice per round, one line per method, with a per-method summary."""
    r = Inputs(root)
    parts = []
    fed = root / FEDERATED
    methods = sorted(p for p in fed.iterdir() if p.is_dir()) if fed.is_dir() else []
    histories: dict[str, pd.DataFrame] = {}
    for m in methods:
        rel = f"{FEDERATED}/{m.name}/history.csv"
        if not (root / rel).is_file():
            continue
        h = r.csv(rel, required=("round", "val_dice"))
        assert h is not None
        h = r.numeric(rel, h, ["round", "val_dice"])
        if h.empty:
            parts.append(paragraph(f"{rel}: no rounds yet"))
            continue
        histories[m.name] = h
    starts = {}
    for name in histories:
        if (fed / name / "model_card.json").is_file():
            starts[name] = (r.json(f"{FEDERATED}/{name}/model_card.json") or {}).get("start")
    drawn = continued_rounds(histories, starts)
    # One-shot averaging and target-adapted methods have no rounds: not a missing file.
    without = [m.name for m in methods if not (m / "history.csv").is_file()]
    if not any((m / "history.csv").is_file() for m in methods):
        r.missing.append(f"{FEDERATED}/<method>/history.csv")
        parts.append(missing_note(f"{FEDERATED}/<method>/history.csv"))
    if without:
        parts.append(paragraph("Methods without rounds (no history.csv): "
                               + ", ".join(without)))
    if histories:
        parts.insert(0, figure(figures.round_curves(drawn), "federated round curves",
                               "Global validation Dice after each round (one line per "
                               "method; a method that continues another, as self-training "
                               "continues FedAvg, follows its rounds)"))
        parts.insert(1, table(_round_summary(histories), "Per method"))
    return r.section("federated-rounds", "Federated training rounds", parts)


def continued_rounds(histories: dict[str, pd.DataFrame], starts: dict[str, Any]
                     ) -> dict[str, pd.DataFrame]:
    """``histories`` with each method that continues another (``starts[method]``, its
    card's ``start``: self-training starts from FedAvg's last round) numbered after that
    method's last round, so that a round curve draws it after, not over, the first."""
    out = dict(histories)
    for name, h in histories.items():
        start = starts.get(name)
        if start in histories and start != name:
            out[name] = h.assign(round=h["round"] + histories[start]["round"].max())
    return out


def _round_summary(histories: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for method, h in histories.items():
        h = h.sort_values("round")
        best = h.loc[h["val_dice"].idxmax()] if h["val_dice"].notna().any() else None
        row: dict[str, Any] = {
            "method": method, "rounds": int(h["round"].max()),
            "final val Dice": float(h["val_dice"].iloc[-1]),
            "best val Dice": float(best["val_dice"]) if best is not None else float("nan"),
            "best round": int(best["round"]) if best is not None else None}
        # Optional columns: whatever cost the federation recorded per round.
        for c in h.columns:
            if (c == "seconds" or c.startswith("bytes")) and pd.api.types.is_numeric_dtype(h[c]):
                row[f"total {c}"] = float(h[c].sum())
        rows.append(row)
    return pd.DataFrame(rows)


# --- 6. held-out comparison ---------------------------------------------------------------


def held_out(root: Path) -> Section:
    """Mean held-out Dice per (model, site) with 95 % intervals, and paired differences."""
    r = Inputs(root)
    parts = []
    rel = f"{EVALUATE}/summary.csv"
    summary = r.csv(rel, required=("model", "site"))
    if summary is None:
        parts.append(missing_note(rel))
    else:
        cols = list(summary.columns)
        est, lo, hi = (_first(cols, ESTIMATE_COLUMNS), _first(cols, LO_COLUMNS),
                       _first(cols, HI_COLUMNS))
        if est is None or lo is None or hi is None:
            raise FedctError(f"{root / rel}: needs an estimate column (one of "
                             f"{list(ESTIMATE_COLUMNS)}) and interval bounds (one of "
                             f"{list(LO_COLUMNS)} and one of {list(HI_COLUMNS)}); has {cols}")
        summary = r.numeric(rel, summary, [est, lo, hi])
        chart = summary
        if "metric" in cols:
            dice = summary["metric"].astype(str).str.lower() == "dice"
            chart = summary[dice] if dice.any() else summary
        chart = chart.dropna(subset=[est])
        if chart.empty:
            parts.append(paragraph(f"{rel}: no finite estimate to chart"))
        else:
            parts.append(figure(figures.interval_chart(chart, est, lo, hi),
                                "held-out comparison with intervals",
                                "Mean Dice on held-out sites with 95 % cluster-bootstrap "
                                "intervals"))
        # The per-structure means (dice_<structure>, ...) stay in the CSV: too wide here,
        # and so do the single sites when there is a row over all of them.
        bounds = {est, lo, hi, "hd95_lo", "hd95_hi"}
        keep = [c for c in cols if c in bounds or not c.startswith(("dice_", "hd95_"))]
        overall = summary["site"].astype(str) == "all"
        shown, which = ((summary[overall], "over every held-out site") if overall.any()
                        else (summary, "per held-out site"))
        parts.append(table(shown[keep], f"Mean held-out Dice per model {which}, with 95 % "
                                        "intervals (per site and per structure in the CSV)",
                           source=rel))
    rel = f"{EVALUATE}/paired.csv"
    paired = r.csv(rel)
    if paired is None:
        parts.append(missing_note(rel))
    else:
        shown, which = paired, ""
        if {"reference", "site"} <= set(paired.columns):
            main = ((paired["reference"].astype(str) == "best_local")
                    & (paired["site"].astype(str) == "all"))
            if "reference_model" in paired.columns and "model" in paired.columns:
                main &= paired["model"].astype(str) != paired["reference_model"].astype(str)
            if main.any():
                shown, which = paired[main], " against the best local model, all held-out sites"
        parts.append(table(shown, "Paired differences (model minus reference) with 95 % "
                                  f"intervals{which} (other references and sites in the CSV)",
                           source=rel))
    return r.section("held-out", "Held-out sites: comparison with intervals", parts)


# --- 7. promotion -------------------------------------------------------------------------


def read_decision(r: Inputs) -> dict[str, Any] | None:
    """``promote/decision.json``, checked; None (recorded missing) when absent."""
    rel = f"{PROMOTE}/decision.json"
    d = r.json(rel, required=("promote", "reasons"))
    if d is None:
        return None
    if not isinstance(d["promote"], bool):
        raise FedctError(f"{r.root / rel}: 'promote' must be true or false, "
                         f"not {d['promote']!r}")
    reasons = d["reasons"]
    if not isinstance(reasons, list) or not all(isinstance(x, str) for x in reasons):
        raise FedctError(f"{r.root / rel}: 'reasons' must be a list of strings")
    return d


def verdict(d: dict[str, Any]) -> str:
    """The decision in one line: promoted or refused, and who is the champion now."""
    who = ", ".join(f"{k} {text(d[k])}" for k in ("candidate", "version", "alias")
                    if d.get(k) is not None) or "no candidate named"
    if d["promote"]:
        return f'<div class="verdict promoted">PROMOTED: {who}</div>'
    if "champion" not in d:  # a decision.json of before the key
        stays = "the registry's champion, if any, is unchanged"
    elif d["champion"] is None:
        stays = "no champion yet: no version is approved for use"
    else:
        stays = f"the champion stays version {text(d['champion'])}"
    return f'<div class="verdict refused">REFUSED: {who}; {stays}</div>'


def promotion(root: Path) -> Section:
    """The registry gate's verdict, its reasons and the numbers it used."""
    r = Inputs(root)
    rel = f"{PROMOTE}/decision.json"
    d = read_decision(r)
    if d is None:
        return r.section("promotion", "Promotion decision", [missing_note(rel)])
    reasons = d["reasons"]
    parts = [verdict(d), heading("Reasons"),
             bullet_list(reasons) if reasons else paragraph("no reasons recorded")]
    numbers = d.get("numbers")
    if isinstance(numbers, dict):
        numbers = {k: v for k, v in numbers.items() if k != "reasons"}  # listed above
        sites = numbers.pop("sites", None)
        rows = pd.DataFrame(flatten(numbers), columns=["quantity", "value"])
        parts.append(table(rows, "Numbers the gate used"))
        if isinstance(sites, list) and sites and all(isinstance(s, dict) for s in sites):
            parts.append(table(pd.DataFrame(sites), "Per held-out site: mean case Dice of "
                                                    "the candidate and the best local model"))
    elif numbers is not None:
        parts.append(table(pd.DataFrame(flatten(numbers), columns=["quantity", "value"]),
                           "Numbers the gate used"))
    return r.section("promotion", "Promotion decision", parts)


#: The sections of evidence and data, in page order (after ``fedct.report.summary``).
DETAILS: tuple[Callable[[Path], Section], ...] = (
    promotion, held_out, uncertainty_dice, federated_rounds, shift_matrices,
    shift_candidates, vendor_site)
