"""Typed, frozen configuration loaded once from ``params.yaml``.

One top-level key of ``params.yaml`` per pipeline stage; each maps onto one frozen
dataclass below. ``params.yaml`` is the one set of defaults: the dataclass defaults equal
it (a test says so) and exist only so that tests can build variants with
``dataclasses.replace``. Loading a file, an unknown key (a typo) and a missing key are
both errors that name the key: nothing silently falls back to a value in the code.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from fedct.errors import FedctError

Profile = Literal["tiny", "demo", "study", "clinical"]
SiteRule = Literal["folder", "institution", "mapping"]


@dataclass(frozen=True)
class SynthParams:
    """``fedct synth``: the synthetic multi-site archive."""

    profile: Profile = "demo"
    # The report seed: never used while the protocol's choices were made. Results in the
    # README come from it; ``dev_seeds`` are the seeds the choices were made on.
    seed: int = 5202
    dev_seeds: tuple[int, ...] = (2026, 4099, 5101, 5102, 5103, 5201)
    # The study's report archives (``fedct seeds``: one DVC experiment per seed, paired
    # with ``cohort.report_seeds``); the first is ``seed``, the one ``dvc repro`` runs.
    report_seeds: tuple[int, ...] = (5202, 5203, 5204)


@dataclass(frozen=True)
class CatalogueParams:
    """``fedct catalogue``: header scan of a DICOM archive."""

    workers: int = 2
    # Where the site of a file comes from: the first folder level under the archive
    # root ("folder", level ``site_level``), the InstitutionName tag ("institution"),
    # or a CSV mapping InstitutionName or folder -> site ("mapping").
    site_rule: SiteRule = "folder"
    site_level: int = 0
    site_mapping: str | None = None
    min_slices: int = 32
    # HMAC key for pseudonymising patients. A path to a file that the site keeps
    # secret; ``FEDCT_PSEUDONYM_KEY`` overrides it. ``demo_key: true`` allows the
    # public demo key (synthetic data only).
    key_file: str | None = None
    demo_key: bool = True
    # Rows per Parquet row group while streaming; bounds memory on huge archives.
    chunk_size: int = 2000
    # Address of an existing Dask scheduler ("tcp://host:8786"); empty = local processes.
    scheduler: str | None = None


@dataclass(frozen=True)
class CohortParams:
    """``fedct cohort``: series selection and patient-level splits."""

    # Report seed of the patient split; ``dev_seeds``: the splits used while developing.
    seed: int = 324
    dev_seeds: tuple[int, ...] = (7, 101, 313, 314, 315, 323)
    # Paired with ``synth.report_seeds`` (``fedct seeds``).
    report_seeds: tuple[int, ...] = (324, 325, 326)
    val_fraction: float = 0.125
    # Calibration cases: never trained on and never used to pick a checkpoint, so the
    # failure definition and the flag threshold are set on data that nothing else saw.
    calib_fraction: float = 0.125
    test_fraction: float = 0.25
    # At least this many calib patients per training site (when it has patients to spare:
    # one each stays for train, val and test): so that the failure cut-off and the flag
    # threshold rest on enough in-domain pairs, whatever the fraction gives. 0: the
    # fraction alone (at least one from four patients on).
    min_calib: int = 0
    # Sites whose data never trains a model; they are only evaluated on.
    holdout_sites: tuple[str, ...] = ("C", "G")
    # Of each held-out site's patients, this fraction (at least one) forms the ``adapt``
    # split: images that the label-free methods adapt on (never a label: none is
    # prepared), disjoint from the ``test`` cases every model is scored on. 0: no adapt
    # split; the label-free methods then adapt on the test images themselves
    # (transductive, the demo's earlier design).
    adapt_fraction: float = 0.0
    # Held-out sites without an injected shift: negative controls of the failure and shift
    # analyses (the uncertainty stage reports them apart). A subset of holdout_sites.
    control_sites: tuple[str, ...] = ()
    # Sites without labels: they only take part in label-free methods.
    unlabelled_sites: tuple[str, ...] = ()
    # A patient key found at several sites: ``one_site`` (one person: kept at one site
    # only, fedct.stages.cohort) or ``per_site`` (IDs issued per hospital: each site's own).
    shared_patients: Literal["one_site", "per_site"] = "one_site"
    # Preprocessing of every chosen series (cached by the cohort stage): resampled to
    # ``spacing_mm`` (x, y, z), cropped/padded to ``roi_size`` voxels about the centre,
    # HU window [hu_min, hu_max] scaled to [0, 1].
    spacing_mm: tuple[float, float, float] = (7.0, 7.0, 7.0)
    roi_size: tuple[int, int, int] = (64, 48, 32)
    hu_min: float = -250.0
    hu_max: float = 1000.0


@dataclass(frozen=True)
class TrainParams:
    """``fedct train``: one Bayesian U-Net per site, plus the pooled model."""

    # Every site that trains a local model (not the held-out ones) and ``pooled``, the
    # centralised upper bound: one model folder each under the train stage's output.
    sites: tuple[str, ...] = ("A", "B", "D", "E", "pooled")
    seed: int = 0
    # Training length: every model (local or pooled) trains until its validation loss has
    # not improved for ``patience`` validation passes (0: never stop early), for at most
    # ``steps`` optimiser steps; the weights of the best validation loss are kept. So each
    # model stops at its own convergence under one common cap, not after an equal number
    # of epochs.
    steps: int = 400
    # Length of the one-cycle learning-rate schedule: 0 spans the cap (``steps``); a value
    # below the cap ends the schedule there and the rate then holds at its end value, so a
    # model still improving trains on and one that is not stops on its plateau before the
    # cap. The schedule ends at learning_rate / 25 / ``final_div_factor`` (torch's
    # OneCycleLR; its default 1e4 ends near 0, 4 ends at learning_rate / 100).
    schedule_steps: int = 0
    final_div_factor: float = 10000.0
    # Validation passes (deterministic, whole volumes) spread evenly over ``steps``.
    val_checks: int = 10
    patience: int = 3
    batch_size: int = 2
    # Random training crops (voxels) of each case padded by ``max_shift`` voxels per side
    # (x, y, z): anatomy moves about the input, so position cannot stand in for anatomy.
    # Validation and inference see the whole volume.
    patch_size: tuple[int, int, int] = (64, 48, 16)
    max_shift: tuple[int, int, int] = (4, 4, 8)
    # Peak learning rate of the one-cycle schedule (AdamW).
    learning_rate: float = 0.01
    dropout: float = 0.25
    # Dropout after the blocks of this many levels, counted from the coarsest.
    dropout_depth: int = 4
    # Feature widths per level; channels[0] is the full-resolution level.
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    # 0: plain two-convolution blocks; >= 1: residual blocks.
    num_res_units: int = 1
    amp: bool = True
    device: str = "auto"
    # Models trained at once, each in its own process (CPU: with an equal share of the
    # threads; GPU: sharing the device).
    workers: int = 2


def model_params(params: TrainParams) -> dict:
    """``params`` as a dict without the keys that say how a run is organised, not what a
    model is: ``workers`` (how many models train at once) and ``sites`` (which models the
    stage trains; a model's own cases are hashed beside it). Checkpoint fingerprints key on
    this."""
    return {k: v for k, v in to_dict(params).items() if k not in ("workers", "sites")}


@dataclass(frozen=True)
class UncertaintyParams:
    """``fedct uncertainty``: every model on every site's test set with MC dropout."""

    mc_samples: int = 10
    mc_batch: int = 10
    # Failure, relative to in-domain performance: a (model, case) pair fails when its
    # case Dice is below this percentile of in-domain calibration Dice (each local model
    # on its own site's calib cases). ``failure_sweep`` reports other percentiles too.
    failure_percentile: float = 5.0
    failure_sweep: tuple[float, ...] = (1.0, 2.5, 5.0, 10.0, 20.0)
    # The failure signal that consumers flag with (threshold.json; the later predict
    # command): the MC samples' disagreement, 1 - mean Dice of each sample with the
    # consensus (Roy et al. 2019; the best signal of Zenk et al. 2025). Frozen on
    # development seeds (an earlier demo, where it led per structure) before any report
    # seed ran; every signal and baseline is still reported in signals.csv.
    signal: str = "sample_disagreement"
    # Structure scores -> case score: the mean, as case Dice is formed (frozen on
    # development seeds; "max" lets one small structure dominate every case).
    aggregation: Literal["mean", "max"] = "mean"
    # The flag threshold's rule, from calibration pairs only: Youden's J when they hold at
    # least ``threshold_min_failures`` failures, else this quantile of the in-domain
    # calibration scores (frozen on development seeds).
    threshold_min_failures: int = 5
    threshold_in_domain_quantile: float = 0.95
    # Site-level shift ranking: the flag signal too. Chosen on development seeds (synth
    # 2026, cohort 7): it ranks C and G first, predictive entropy ranks G, E, J, C
    # (entropy holds the aleatoric part, which any noisier acquisition raises).
    ranking_signal: str = "sample_disagreement"
    # Protocol fixes of issue 23 (off: the demo's earlier protocol). ``heldout_flag``: a
    # "held-out site" flag (1 for a case of a held-out site) among the baselines, what a
    # site label alone scores. ``domain_subsets``: AUROC and AURC also among out-of-domain
    # pairs only and among the negative-control sites' pairs (``cohort.control_sites``).
    heldout_flag: bool = False
    domain_subsets: bool = False
    # Cluster-bootstrap resamples (sites, then cases) for every interval.
    n_boot: int = 1000
    seed: int = 0
    # CPU: models evaluated in parallel processes (ignored on a GPU).
    workers: int = 2
    device: str = "auto"


#: The methods of ``federate.methods``, one module each in ``fedct.federation.methods``
#: (whose registry a test holds equal to this).
FEDERATE_METHODS = ("one_shot", "fedavg", "fedprox", "uw_merge", "tent", "self_train",
                    "uw_select", "steered", "steered_uniform", "cw_self_train",
                    "cw_self_train_all", "gated_tent", "gated_tent_random")
#: Each label-free method guided by uncertainty and its ablation without the guidance (run
#: beside it: ``evaluate`` pairs them).
ABLATIONS = {"steered": "steered_uniform", "cw_self_train": "cw_self_train_all",
             "gated_tent": "gated_tent_random"}
#: Uncertainty signals that ``uw_merge`` can weight by and ``uw_select`` minimise: the
#: bounded ones of ``fedct.analysis.failure`` (``label_free.WEIGHT_SIGNALS``; a test).
WEIGHT_SIGNALS = ("variance", "entropy", "mutual_information", "boundary_entropy",
                  "unassigned_mass", "max_softmax_deficit", "sample_disagreement")


@dataclass(frozen=True)
class FederateParams:
    """``fedct federate``: federated models of the training sites, and label-free methods."""

    # Clients: training sites with a local model (one SuperNode each in the simulation).
    sites: tuple[str, ...] = ("A", "B", "D", "E")
    # one_shot: average of the local models from ``train``; fedavg / fedprox: multi-round
    # on Flower; uw_merge, tent, uw_select (per held-out target site), self_train: label-free.
    methods: tuple[str, ...] = ("one_shot", "fedavg", "fedprox", "uw_merge", "tent",
                                "self_train", "uw_select")
    # Site weights of every average: training cases (``cases``) or ``equal``.
    weighting: Literal["cases", "equal"] = "cases"
    # Rounds of fedavg and fedprox: all of them with patience 0, else a cap.
    rounds: int = 4
    # Stop after this many rounds without a higher mean validation Dice of the clients and
    # keep the best round's model (0: every round, the last round's model).
    patience: int = 0
    # A round improves only when the mean validation Dice beats the best by more than this.
    min_delta: float = 0.0
    # Optimiser steps per client per round: rounds x local_steps = train.steps, so each
    # client does as many steps as a local model's cap.
    local_steps: int = 100
    # A round completes when at least this many clients reply (a failed client rejoins).
    min_clients: int = 3
    proximal_mu: float = 0.01      # FedProx: mu / 2 ||w - w_global||^2
    # Label-free methods read the target's images, never its labels.
    mc_samples: int = 10
    mc_batch: int = 10
    uw_signal: str = "sample_disagreement"  # uw_merge: uncertainty of each site model
    uw_aggregation: Literal["mean", "max"] = "mean"  # structure scores -> case score
    uw_rule: Literal["softmax", "inverse"] = "softmax"
    uw_temperature: float = 0.1
    tent_steps: int = 10           # TENT on the FedAvg model: norm affine parameters only
    tent_lr: float = 0.001
    pseudo_p_min: float = 0.75     # self_train (DPL): keep voxels with mean p > p_min
    pseudo_std_max: float = 0.05   # and MC std < std_max
    self_train_rounds: int = 1     # further FedAvg rounds with the pseudo-labelled sites
    # Peak learning rate of those rounds: they fine-tune the FedAvg model (dev seeds: at
    # train.learning_rate the restart undid FedAvg, validation Dice 0.61 -> 0.37).
    self_train_lr: float = 0.001
    # uw_select: per target site, the candidate of these methods (each must run) with the
    # lowest uw_signal on the target's images; a tie keeps the first (FedAvg).
    select_from: tuple[str, ...] = ("fedavg", "fedprox", "tent", "self_train")
    # steered (each target site steers FedAvg's merge by MC-dropout scores of the clients'
    # updates on its images) and steered_uniform (its ablation, FedAvg's weights): rounds
    # from the FedAvg model, their peak learning rate, and the softmax temperature of the
    # scores in uw_signal's units (an update scored lower by it weighs e times more).
    steer_rounds: int = 3
    steer_lr: float = 0.001
    steer_temperature: float = 0.01
    # cw_self_train (class-wise curriculum self-training at each target) and
    # cw_self_train_all (its ablation, every voxel kept): rounds of pseudo-labelling, steps
    # per round, peak learning rate, the share of each structure's voxels kept in the first
    # and last round (lowest MC standard deviation first), proximal weight to each round's
    # starting weights (0: none).
    cwst_rounds: int = 4
    cwst_steps: int = 50
    cwst_lr: float = 0.001
    cwst_keep: tuple[float, float] = (0.5, 0.8)
    # The loss weight of the voxels not kept (0: ignored, as DPL/CBST; on development
    # seeds that collapsed: fedct.federation.adaptation).
    cwst_floor: float = 0.2
    cwst_mu: float = 0.0
    # gated_tent / gated_tent_random: the share of each image's voxels whose entropy TENT
    # minimises (the least uncertain ones / as many at random).
    gate_keep: float = 0.5
    # The label-free method whose result at the most shifted held-out site answers the
    # study's question (`fedct seeds`); fixed for report seeds 5203-5204. No stage reads it.
    primary_label_free: str = "uw_select"
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class EvaluateParams:
    """``fedct evaluate``: every candidate (local, pooled, federated) on the held-out sites.

    The failure signal and its aggregation are ``uncertainty.signal`` and
    ``uncertainty.aggregation`` (frozen there); MC dropout as in ``uncertainty``.
    """

    mc_samples: int = 10
    mc_batch: int = 10
    # Cluster-bootstrap resamples (sites, then cases) of every interval and paired difference.
    n_boot: int = 1000
    seed: int = 0
    # Where "the best local model" (the bar of paired.csv and of the promotion gate) is
    # chosen: ``val``, on the training sites' validation cases (every local model scored
    # on them; no held-out case takes part in the choice), or ``test``, on the held-out
    # test cases it is then compared on (the demo's earlier rule; docs/protocol.md).
    best_local_on: Literal["test", "val"] = "test"
    # CPU: models evaluated in parallel processes (ignored on a GPU).
    workers: int = 2
    device: str = "auto"


@dataclass(frozen=True)
class PromoteParams:
    """``fedct promote``: register the federated candidate; alias it only if it wins."""

    model_name: str = "fedct-seg"   # the registered model consumers load
    candidate: str = "fedavg"       # the federated model put forward (an evaluate model)
    alias: str = "champion"
    # Promote only when the lower bound of the 95 % paired cluster-bootstrap interval of
    # (candidate - best local) mean held-out Dice exceeds ``margin``, and no held-out
    # site's mean difference is below -``site_tolerance``.
    margin: float = 0.0
    site_tolerance: float = 0.05
    n_boot: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class Params:
    synth: SynthParams = field(default_factory=SynthParams)
    catalogue: CatalogueParams = field(default_factory=CatalogueParams)
    cohort: CohortParams = field(default_factory=CohortParams)
    train: TrainParams = field(default_factory=TrainParams)
    uncertainty: UncertaintyParams = field(default_factory=UncertaintyParams)
    federate: FederateParams = field(default_factory=FederateParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    promote: PromoteParams = field(default_factory=PromoteParams)


T = TypeVar("T")
#: Checks of a dataclass's values: (keys, test of their values, what the test expects).
Rules = list[tuple[tuple[str, ...], Callable[..., bool], str]]


class ConfigError(FedctError):
    """params.yaml is malformed; the message names the file and the key."""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        elif len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values (x, y, z), got {value!r}")
        else:
            items = list(args)
        return tuple(_coerce(t, v, f"{where}[{i}]")
                     for i, (t, v) in enumerate(zip(items, value, strict=True)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "params",
              rules: Rules | None = None) -> T:
    """Build dataclass ``cls`` from a mapping; unknown and missing keys are errors, and so
    are values that break ``rules`` (by default the params' own, ``check``)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(f'{where}.{n}' for n in missing)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return check(cls(**kwargs), where, rules)


def check(obj: T, where: str, rules: Rules | None = None) -> T:
    """``obj`` if its values are in range (``rules``, by default its class's in
    ``_RULES``), else a ConfigError naming ``where.key``; for params built in code as well
    as read from ``params.yaml``."""
    for keys, ok, expected in (_RULES.get(type(obj), ()) if rules is None else rules):
        values = [getattr(obj, k) for k in keys]
        if not ok(*values):
            shown = ", ".join(f"{where}.{k} = {_show(v)}" for k, v in zip(keys, values,
                                                                            strict=True))
            raise ConfigError(f"{shown}: expected {expected}")
    return obj


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)


def _all(cond: Callable[[Any], bool]) -> Callable[[tuple], bool]:
    return lambda values: all(cond(v) for v in values)


def _pos(v: float) -> bool:
    return v > 0


def _nonneg(v: float) -> bool:
    return v >= 0


def _unit(v: float) -> bool:
    return 0.0 <= v < 1.0


# MC dropout compares samples: one is no distribution.
_MC = (("mc_samples",), lambda v: v >= 2, ">= 2 (MC dropout compares samples)")


# Ranges and consistency of values, checked when params.yaml is read (a value out of range
# would otherwise fail deep inside a stage, as a traceback): (keys, test, what it expects).
_RULES: dict[type, Rules] = {
    CatalogueParams: [
        (("min_slices",), _pos, ">= 1"),
        (("workers",), _pos, ">= 1"),
        (("chunk_size",), _pos, ">= 1"),
        (("site_level",), _nonneg, ">= 0"),
    ],
    CohortParams: [
        (("val_fraction",), _unit, "a fraction in [0, 1)"),
        (("calib_fraction",), _unit, "a fraction in [0, 1)"),
        (("test_fraction",), _unit, "a fraction in [0, 1)"),
        (("val_fraction", "calib_fraction", "test_fraction"), lambda a, b, c: a + b + c < 1,
         "a sum below 1 (the rest of each site's patients train)"),
        (("min_calib",), _nonneg, ">= 0"),
        (("adapt_fraction",), _unit, "a fraction in [0, 1)"),
        (("control_sites", "holdout_sites"), lambda c, h: set(c) <= set(h),
         "control sites among the held-out sites"),
        (("spacing_mm",), _all(_pos), "sizes > 0 mm"),
        (("roi_size",), _all(_pos), "sizes >= 1 voxel"),
        (("hu_min", "hu_max"), lambda lo, hi: lo < hi, "hu_min < hu_max"),
    ],
    TrainParams: [
        (("steps",), _pos, ">= 1"),
        (("schedule_steps", "steps"), lambda s, c: 0 <= s <= c,
         "0 (the schedule spans the cap) or a length within 1..train.steps"),
        (("final_div_factor",), lambda v: math.isfinite(v) and v >= 1, ">= 1"),
        (("val_checks",), _pos, ">= 1"),
        (("patience",), _nonneg, ">= 0 (0: never stop early)"),
        (("batch_size",), _pos, ">= 1"),
        (("learning_rate",), _pos, "> 0"),
        (("dropout",), _unit, "a probability in [0, 1)"),
        (("dropout_depth",), _nonneg, ">= 0"),
        (("channels",), lambda v: len(v) >= 2 and all(c >= 1 for c in v),
         "at least two levels of >= 1 channel"),
        (("channels", "strides"), lambda c, s: len(s) == len(c) - 1 and all(x >= 1 for x in s),
         "one stride >= 1 between each two levels (len(strides) = len(channels) - 1)"),
        (("num_res_units",), _nonneg, ">= 0"),
        (("patch_size",), _all(_pos), "sizes >= 1 voxel"),
        (("max_shift",), _all(_nonneg), "shifts >= 0 voxels"),
        (("workers",), _pos, ">= 1"),
    ],
    UncertaintyParams: [
        _MC,
        (("mc_batch",), _pos, ">= 1"),
        (("failure_percentile",), lambda v: 0 < v < 100, "a percentile in (0, 100)"),
        (("failure_sweep",), _all(lambda v: 0 < v < 100), "percentiles in (0, 100)"),
        (("threshold_min_failures",), _pos, ">= 1"),
        (("threshold_in_domain_quantile",), lambda v: 0 < v <= 1, "a quantile in (0, 1]"),
        (("n_boot",), _pos, ">= 1"),
        (("workers",), _pos, ">= 1"),
    ],
    FederateParams: [
        (("methods",), lambda v: set(v) <= set(FEDERATE_METHODS),
         f"methods among {list(FEDERATE_METHODS)}"),
        (("methods",), lambda v: len(set(v)) == len(v), "each method once"),
        (("methods", "select_from"),
         lambda m, s: "uw_select" not in m or (bool(s) and set(s) <= set(m) - {"uw_select"}),
         "uw_select choosing among one or more other methods that run (federate.methods)"),
        (("methods",), lambda m: all(ABLATIONS[k] in m for k in set(m) & set(ABLATIONS)),
         f"each uncertainty-guided method with its ablation: {ABLATIONS}"),
        (("methods", "uw_signal"),
         lambda m, s: not set(m) & {"uw_merge", "uw_select"} or s in WEIGHT_SIGNALS,
         f"a signal uw_merge and uw_select can use: one of {list(WEIGHT_SIGNALS)}"),
        (("rounds",), _pos, ">= 1"),
        (("patience",), _nonneg, ">= 0 (0: never stop early)"),
        (("min_delta",), lambda v: 0 <= v < 1, "a Dice difference in [0, 1)"),
        (("local_steps",), _pos, ">= 1"),
        (("min_clients",), _pos, ">= 1"),
        (("proximal_mu",), _nonneg, ">= 0"),
        _MC,
        (("mc_batch",), _pos, ">= 1"),
        (("uw_temperature",), _pos, "> 0"),
        (("tent_steps",), _nonneg, ">= 0"),
        (("tent_lr",), _pos, "> 0"),
        (("pseudo_p_min",), lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
        (("pseudo_std_max",), _nonneg, ">= 0"),
        (("self_train_rounds",), _pos, ">= 1"),
        (("self_train_lr",), _pos, "> 0"),
        (("steer_rounds",), _pos, ">= 1"),
        (("steer_lr",), _pos, "> 0"),
        (("steer_temperature",), _pos, "> 0"),
        (("cwst_rounds",), _pos, ">= 1"),
        (("cwst_steps",), _pos, ">= 1"),
        (("cwst_lr",), _pos, "> 0"),
        (("cwst_keep",), lambda v: 0 < v[0] <= v[1] <= 1, "shares 0 < first <= last <= 1"),
        (("cwst_floor",), lambda v: 0 <= v <= 1, "a weight in [0, 1]"),
        (("cwst_mu",), _nonneg, ">= 0"),
        (("gate_keep",), lambda v: 0 < v <= 1, "a share in (0, 1]"),
    ],
    EvaluateParams: [
        _MC,
        (("mc_batch",), _pos, ">= 1"),
        (("n_boot",), _pos, ">= 1"),
        (("workers",), _pos, ">= 1"),
    ],
    # The gate must not be talked into promoting: a negative margin passes a candidate
    # worse than the best local model; a site tolerance above 0.2 Dice lets one hospital
    # lose a fifth of its overlap; a 95 % percentile interval from fewer than 200
    # resamples rests on its 5 most extreme values. A stricter gate is always allowed.
    PromoteParams: [
        (("margin",), lambda v: 0.0 <= v < 1.0, "a Dice difference in [0, 1)"),
        (("site_tolerance",), lambda v: 0.0 <= v <= 0.2, "a Dice loss in [0, 0.2]"),
        (("n_boot",), lambda v: v >= 200, ">= 200 resamples"),
        (("model_name",), lambda v: bool(v) and "'" not in v, "a name without quotes"),
        (("alias",), lambda v: bool(v) and "'" not in v, "a name without quotes"),
    ],
}


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load ``params.yaml``; a missing file, key or unknown key is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root, "
                          f"or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage -> params")
    return from_dict(Params, raw, where=str(path))


def to_dict(obj: Any) -> dict[str, Any]:
    """Flatten a params dataclass to ``{"a.b": value}`` for MLflow's log_params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name))
        else:
            out[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", obj)
    return out
