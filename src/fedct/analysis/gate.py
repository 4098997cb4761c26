"""The promotion gate: does the federated model beat the best local model on held-out sites?

Pure, no I/O and no MLflow. Input is the long comparison table the evaluate stage writes,
held-out test cases only, one or more rows per (site, case, model) with a Dice column:

====== ======================================================================
column meaning
====== ======================================================================
site   held-out site of the case (the bootstrap's cluster)
case   case key, unique across sites (e.g. ``series_key``)
model  candidate or baseline name (e.g. ``fedavg``, ``A``, ``B``, ``pooled``)
dice   Dice in [0, 1]; NaN where nothing can be scored (no label)
====== ======================================================================

Extra rows per (site, case, model), such as one per structure or per report seed, are
averaged into one case Dice first, so every case weighs the same (the mean over
structures matches ``fedct.analysis.failure.aggregate_cases``). Other columns are ignored.

Rule (issue 11): promote only when the lower bound of the 95 % paired two-stage cluster
bootstrap interval (sites, then cases; ``fedct.analysis.stats.paired_difference``) of
candidate minus best local mean held-out Dice is strictly above ``margin``, and no
held-out site's mean difference is below ``-site_tolerance``. The best local model is the
baseline with the highest mean case Dice on the training sites' validation cases when a
``selection`` table is given (``evaluate.best_local_on: val``: no held-out case picks the
bar), else on the held-out cases themselves (``test``, the earlier rule; choosing the bar
on the cases it is compared on favours the baseline, the conservative direction for a gate,
but makes the reported "best local" a test-set selection).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from fedct.analysis.stats import Interval, paired_difference
from fedct.errors import FedctError

#: Column names of the comparison table (see the module docstring).
SITE, CASE, MODEL, DICE = "site", "case", "model", "dice"


@dataclass(frozen=True)
class SiteDifference:
    """One held-out site: mean case Dice of both models and candidate minus best local."""

    site: str
    n_cases: int
    candidate_dice: float
    best_local_dice: float
    difference: float


@dataclass(frozen=True)
class Decision:
    """The gate's verdict, with every number it used.

    ``difference`` is the paired interval of candidate minus best local mean case Dice;
    ``reasons`` always says why, whichever the verdict, naming the bound and each site.
    """

    promote: bool
    reasons: tuple[str, ...]
    candidate: str
    best_local: str
    local_means: tuple[tuple[str, float], ...]  # (baseline, mean case Dice), best first
    selected_on: str  # "val": the training sites' validation cases; "test": held-out cases
    candidate_mean: float
    difference: Interval
    sites: tuple[SiteDifference, ...]
    margin: float
    site_tolerance: float
    n_cases: int
    n_boot: int
    seed: int
    alpha: float

    def as_dict(self) -> dict:
        """JSON-ready form (for an artifact or the report)."""
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        out["local_means"] = dict(self.local_means)
        out["difference"] = self.difference._asdict()
        out["sites"] = [asdict(s) for s in self.sites]
        return out


def case_dice(table: pd.DataFrame, models: Sequence[str], source: str = "comparison table"
              ) -> pd.DataFrame:
    """Wide table, one row per held-out case: ``site, case`` and one mean-Dice column per model.

    Rows of other models are ignored. Cases no model could score (all NaN) are dropped; a
    case that some of ``models`` scored and others did not cannot be paired and raises.

    Raises:
        FedctError: naming ``source`` and the reason (missing column or model, a case in
            two sites, a half-scored case, no cases left).
    """
    missing = [c for c in (SITE, CASE, MODEL, DICE) if c not in table.columns]
    if missing:
        raise FedctError(f"{source}: missing column(s) {missing}")
    rows = table[table[MODEL].isin(models)]
    absent = [m for m in models if m not in set(rows[MODEL])]
    if absent:
        raise FedctError(f"{source}: no rows for model(s) {absent}")
    if rows[[SITE, CASE]].isna().to_numpy().any():
        raise FedctError(f"{source}: missing site or case values")
    sites_per_case = rows.groupby(CASE)[SITE].nunique()
    if (sites_per_case > 1).any():
        raise FedctError(f"{source}: case(s) {sorted(sites_per_case.index[sites_per_case > 1])}"
                         " appear at several sites")
    try:
        dice = pd.to_numeric(rows[DICE])
    except (TypeError, ValueError) as exc:
        raise FedctError(f"{source}: non-numeric Dice ({exc})") from exc
    if (dice.notna() & ~dice.between(0.0, 1.0)).any():
        raise FedctError(f"{source}: Dice outside [0, 1]")
    wide = (rows.assign(**{DICE: dice})
            .groupby([SITE, CASE, MODEL], sort=True)[DICE].mean()  # NaN rows skipped
            .unstack(MODEL)
            .reindex(columns=list(models)))
    scored = wide.notna()
    wide = wide[scored.any(axis=1)]
    half = wide.isna().any(axis=1)
    if half.any():
        cases = [c for _, c in wide.index[half]][:5]
        raise FedctError(f"{source}: case(s) {cases} lack a Dice for some of {list(models)}; "
                         "every model must be scored on every held-out case")
    if wide.empty:
        raise FedctError(f"{source}: no held-out case with a Dice")
    wide.columns.name = None
    return wide.reset_index()


def decide(
    table: pd.DataFrame,
    candidate: str,
    baselines: Sequence[str],
    margin: float,
    site_tolerance: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    source: str = "comparison table",
    selection: pd.DataFrame | None = None,
) -> Decision:
    """Apply the promotion rule to the held-out comparison table.

    Args:
        table: long table with columns ``site, case, model, dice`` (module docstring),
            held-out test cases only.
        candidate: the model up for promotion (e.g. the federated model).
        baselines: the local models; the best of them (highest mean case Dice) is the bar.
        margin: Dice points the interval's lower bound must exceed (e.g. 0.0 or 0.01).
        site_tolerance: largest allowed loss of mean Dice at any one site (>= 0).
        n_boot, seed, alpha: of the cluster bootstrap (``1 - alpha`` interval).
        source: how error messages name the table (its file path).
        selection: the baselines on the training sites' validation cases (``site, case,
            model, dice``); when given, the best local model is chosen on it, not on
            ``table``.

    Returns:
        A frozen ``Decision``; ``promote`` is True only when both conditions hold.

    Raises:
        FedctError: bad table or arguments, naming ``source`` where the table is at fault.
    """
    baselines = list(dict.fromkeys(baselines))
    if not baselines:
        raise FedctError("promotion gate: no local baseline models given")
    if candidate in baselines:
        raise FedctError(f"promotion gate: candidate {candidate!r} is also a baseline")
    if not (np.isfinite(margin) and np.isfinite(site_tolerance)) or site_tolerance < 0:
        raise FedctError(f"promotion gate: need a finite margin and site_tolerance >= 0, "
                         f"got {margin} and {site_tolerance}")
    wide = case_dice(table, [candidate, *baselines], source)

    chosen_on = (wide if selection is None
                 else case_dice(selection, baselines, f"{source} (validation cases)"))
    means = chosen_on[baselines].mean()
    # Highest mean wins; ties go to the first name in sorted order, so the choice does not
    # depend on the order the caller lists the baselines in.
    ranked = sorted(means.items(), key=lambda kv: (-kv[1], str(kv[0])))
    best = ranked[0][0]

    interval = paired_difference(wide, candidate, best, cluster_cols=(SITE,), case_col=CASE,
                                 n_boot=n_boot, seed=seed, alpha=alpha)
    per_site = wide.groupby(SITE, sort=True)[[candidate, best]].agg(["mean", "size"])
    sites = tuple(
        SiteDifference(site=str(s), n_cases=int(r[(candidate, "size")]),
                       candidate_dice=float(r[(candidate, "mean")]),
                       best_local_dice=float(r[(best, "mean")]),
                       difference=float(r[(candidate, "mean")] - r[(best, "mean")]))
        for s, r in per_site.iterrows())

    level = f"{100 * (1 - alpha):g}%"
    what = f"{candidate} minus best local ({best}) mean held-out Dice"
    reasons: list[str] = []
    bound_ok = interval.lo > margin
    reasons.append(
        f"lower bound {interval.lo:+.4f} of the {level} interval "
        f"[{interval.lo:+.4f}, {interval.hi:+.4f}] of {what} (estimate {interval.estimate:+.4f})"
        f" is {'above' if bound_ok else 'not above'} the margin {margin:+.4f}")
    lost = [s for s in sites if s.difference < -site_tolerance]
    for s in lost:
        reasons.append(f"site {s.site}: {what} is {s.difference:+.4f} over {s.n_cases} cases, "
                       f"a loss beyond the site tolerance {site_tolerance:.4f}")
    if not lost:
        worst = min(sites, key=lambda s: s.difference)
        reasons.append(f"no held-out site loses more than {site_tolerance:.4f} "
                       f"(worst: site {worst.site} at {worst.difference:+.4f})")

    return Decision(
        promote=bool(bound_ok and not lost),
        reasons=tuple(reasons),
        candidate=candidate,
        best_local=str(best),
        local_means=tuple((str(m), float(v)) for m, v in ranked),
        selected_on="test" if selection is None else "val",
        candidate_mean=float(wide[candidate].mean()),
        difference=interval,
        sites=sites,
        margin=float(margin),
        site_tolerance=float(site_tolerance),
        n_cases=len(wide),
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
    )
