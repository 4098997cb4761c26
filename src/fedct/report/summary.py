"""The report's first section: the answer (the promotion decision, the headline held-out
comparison with its interval, the failure-detection result), before any detail.

It reads the files the detail sections read (``promote/decision.json``,
``uncertainty/threshold.json`` and ``metrics.json``) and says plainly when there is no
champion.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedct.report.html import Section, bullet_list, missing_note, paragraph
from fedct.report.sections import (
    CATALOGUE,
    EVALUATE,
    PROMOTE,
    UNCERTAINTY,
    Inputs,
    read_decision,
    signal_name,
    verdict,
)


def _finite(v: Any) -> float | None:
    """``v`` as a finite float, else None (absent, null, NaN, a string)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _interval(est: Any, lo: Any, hi: Any, signed: bool = False) -> str:
    def num(v: Any) -> str:
        f = _finite(v)
        return "?" if f is None else f"{f:{'+' if signed else ''}.3f}"
    return f"{num(est)} [{num(lo)}, {num(hi)}]"


def summary(root: Path) -> Section:
    """The answer: the promotion decision, the headline held-out comparison (candidate
    minus best local model, with its 95 % interval) and the failure-detection result."""
    r = Inputs(root)
    parts = []
    d = read_decision(r)
    if d is None:
        parts.append(missing_note(f"{PROMOTE}/decision.json"))
    else:
        parts.append(verdict(d))
    items = []
    numbers = (d or {}).get("numbers")
    diff = numbers.get("difference") if isinstance(numbers, dict) else None
    if isinstance(diff, dict):
        best = numbers.get("best_local") or "the best local model"
        candidate = numbers.get("candidate") or (d or {}).get("candidate") or "the candidate"
        means = ""
        if numbers.get("candidate_mean") is not None:
            local = dict(numbers.get("local_means") or {}).get(best)
            means = (f"; means {float(numbers['candidate_mean']):.3f} against "
                     f"{float(local):.3f}" if local is not None else "")
        items.append(f"Held-out sites: {candidate} minus {best}, mean case Dice "
                     f"{_interval(diff.get('estimate'), diff.get('lo'), diff.get('hi'), True)}"
                     f" (95 % cluster-bootstrap interval{means}); the gate needs the lower "
                     f"bound above {numbers.get('margin', '?')}.")
    elif d is not None:
        items.append("Held-out comparison: decision.json holds no interval.")
    signal, record = signal_name(r, required=False)
    metrics_rel = f"{UNCERTAINTY}/metrics.json"
    metrics = r.json(metrics_rel) if (root / metrics_rel).is_file() else None
    if signal is None and metrics is None:
        parts.append(missing_note(metrics_rel))
        r.missing.append(metrics_rel)
    else:
        m = metrics or {}
        name = signal or m.get("signal")
        auroc = ("AUROC " + _interval(m["auroc_all"], m.get("auroc_lo_all"),
                                      m.get("auroc_hi_all"))
                 if _finite(m.get("auroc_all")) is not None else "AUROC not computed")
        threshold = _finite(record.get("threshold", m.get("flag_threshold")))
        flag = (f"; a case is flagged at {name} >= {threshold:.3g}" if threshold is not None
                else "; no flag threshold")
        sens, spec = _finite(m.get("flag_sensitivity")), _finite(m.get("flag_specificity"))
        if sens is not None and spec is not None:
            flag += f" (sensitivity {sens:.2f}, specificity {spec:.2f})"
        fail = _finite(record.get("failure_dice", m.get("failure_dice")))
        failed = f"Dice below {fail:.3f}" if fail is not None else "failed"
        items.append(f"Failure detection: {name} tells segmentations with {failed} from "
                     f"the others on test pairs with {auroc} (95 % interval){flag}.")
    if items:
        parts.append(bullet_list(items))
    parts.append(paragraph("Details below: the gate's reasons, the held-out comparison of "
                           "every model, failure detection, federated rounds, the shift "
                           "between sites and the data. Full tables: "
                           + ", ".join(f"{s}/" for s in (EVALUATE, UNCERTAINTY, CATALOGUE))
                           + " beside this report."))
    return r.section("summary", "Summary: the answer", parts)
