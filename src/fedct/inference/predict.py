"""``fedct predict MODEL_URI INPUT -o OUT``: segment one CT with a registered model.

Writes into ``OUT``: ``segmentation.nii.gz`` (label map on the input's grid),
``uncertainty.nii.gz`` (voxel uncertainty, same grid), ``analysed.nii.gz`` (1 where the
network looked, 0 outside its grid, where both maps say 0 for "not analysed"),
``report.json`` (the model's registry name and version; per structure: volume in mL,
mean HU, mean uncertainty; the case's failure score and flag; warnings) and, for a DICOM
input, ``segmentation.dcm`` (DICOM SEG, which names the model and carries the flag, see
``fedct.inference.outputs``). A model that is not the registry's champion (a refused or
older version, a run's artifacts, a folder) is used with a warning, in the report and the
SEG. Defaults come from the model card; nothing is read from params.yaml
and no MLflow run is opened (a consumer command, not a stage).
The report holds no patient identifier and no UID; the DICOM SEG, as any SEG must, copies
the source's patient and study modules so that PACS files it with the study.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fedct.config import PromoteParams, UncertaintyParams
from fedct.devices import pick_device
from fedct.errors import FedctError
from fedct.inference import outputs, segment
from fedct.inference.inputs import read_input

SEGMENTATION = "segmentation.nii.gz"
UNCERTAINTY = "uncertainty.nii.gz"
ANALYSED = "analysed.nii.gz"
REPORT = "report.json"
SEG_DICOM = "segmentation.dcm"


def run(model_uri: str, input_path: Path, out_dir: Path, mc_samples: int | None = None,
        device: str = "auto", uncertainty: str = "entropy",
        seed: int | None = UncertaintyParams().seed) -> dict[str, Any]:
    """Segment ``input_path`` (DICOM series folder or NIfTI) with the model at ``model_uri``.

    ``mc_samples`` overrides the card's T; the failure threshold was calibrated with the
    card's T and the signal's scale depends on T, so at another T the score is reported
    but not flagged (``flag`` None, with the reason). ``seed`` makes the MC samples
    reproducible (the uncertainty stage's seed by default). Outputs of an earlier run in
    ``out_dir`` (the files this command writes) are replaced, a DICOM SEG included when
    this input writes none. Returns the report.
    """
    from fedct import tracking
    from fedct.model.io import CARD_FILE, load_model

    if mc_samples is not None and mc_samples < 2:
        raise FedctError(f"--mc-samples {mc_samples}: MC dropout needs at least 2 samples")
    if uncertainty not in segment.UNCERTAINTY_MAPS:
        raise FedctError(f"uncertainty map {uncertainty!r} is not one of "
                         f"{list(segment.UNCERTAINTY_MAPS)}")
    dev = pick_device(device)
    inp = read_input(Path(input_path))  # first: a bad input fails before a download
    with tempfile.TemporaryDirectory(prefix="fedct-model-") as tmp:
        folder = tracking.download_model(model_uri, Path(tmp))
        # The weights are digest-checked against the card (and, for a registered version,
        # both files against the registry by download_model); nothing is unpickled.
        model, raw = load_model(folder / tracking.MODEL_FILE)
    card = segment.read_card(raw, f"{model_uri}: {CARD_FILE}")
    entry = tracking.registry_entry(model_uri, PromoteParams().alias)
    warnings = _not_champion(model_uri, entry)
    n_samples = mc_samples or card.mc_samples
    x, grid = segment.preprocess(inp.image, card.spec)
    probs = segment.mc_probabilities(model, x, n_samples, seed, dev, card.amp)
    if probs.shape[1] != card.labels.n_classes:
        raise FedctError(f"{model_uri}: the network has {probs.shape[1]} output classes, "
                         f"its card {card.labels.n_classes} labels")
    failure = segment.failure_flag(probs, card)
    if n_samples != card.mc_samples and failure["threshold"] is not None:
        failure["note"] = (f"threshold calibrated with {card.mc_samples} MC samples, "
                           f"scored with {n_samples}")
        failure.update(flag=None, reason=f"not flagged: {failure['note']} (the score's scale "
                                         "depends on T; rerun without --mc-samples)")
    seg = segment.to_input_grid(segment.label_map(probs), grid, inp.image, label=True)
    unc = segment.to_input_grid(segment.uncertainty_map(probs, uncertainty), grid, inp.image,
                                label=False)
    del probs
    structures = segment.structure_table(seg, unc, inp.image, card.labels)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier run's files must not stay beside this one's (another patient's SEG).
    for name in (SEGMENTATION, UNCERTAINTY, ANALYSED, SEG_DICOM, REPORT):
        (out_dir / name).unlink(missing_ok=True)
    outputs.write_image(seg, out_dir / SEGMENTATION)
    outputs.write_image(unc, out_dir / UNCERTAINTY)
    outputs.write_image(segment.analysed_mask(grid, inp.image), out_dir / ANALYSED)
    written = {"segmentation": SEGMENTATION, "uncertainty": UNCERTAINTY,
               "analysed": ANALYSED, "report": REPORT}
    if inp.kind == "dicom":
        provenance = outputs.SegProvenance(
            model=entry["name"] if entry else f"fedct-{card.site}",
            version=entry["version"] if entry else None, champion=not warnings,
            failure=failure)
        seg_path = outputs.write_seg(seg, inp.datasets, card.labels, out_dir / SEG_DICOM,
                                     provenance)
        written["dicom_seg"] = SEG_DICOM if seg_path is not None else None
    report = {
        "model": {"uri": model_uri, "site": card.site, "registry": entry,
                  "labels": card.labels.to_json()},
        "input": {"kind": inp.kind, "size": list(inp.image.GetSize()),
                  "spacing_mm": list(inp.image.GetSpacing())},
        "preprocessing": {"spacing_mm": list(card.spec.spacing_mm),
                          "roi_size": list(card.spec.roi_size), "hu_min": card.spec.hu_min,
                          "hu_max": card.spec.hu_max,
                          "roi_coverage": segment.roi_coverage(grid, inp.image)},
        "mc_samples": n_samples, "seed": seed, "device": str(dev),
        "uncertainty_map": {"kind": uncertainty,
                            "unit": segment.UNCERTAINTY_MAPS[uncertainty][1],
                            "not_analysed": f"0 where {ANALYSED} is 0"},
        "structures": structures,
        "failure": failure,
        "outputs": written,
        "warnings": warnings,
    }
    outputs.write_json(report, out_dir / REPORT)
    return report


def _not_champion(model_uri: str, entry: dict[str, Any] | None) -> list[str]:
    """One warning when the model is not the version the champion alias names, else []."""
    if entry is None:
        return [f"{model_uri} is not a registry version (a run's artifacts or a folder): "
                "no promotion gate has approved it"]
    if entry["version"] == entry["champion"]:
        return []
    decision = f", promotion {entry['decision']}" if entry["decision"] else ""
    champion = (f"the champion is version {entry['champion']}" if entry["champion"]
                else "no version is the champion")
    return [f"{model_uri} is {entry['name']} version {entry['version']}{decision}: "
            f"not the champion ({champion})"]
