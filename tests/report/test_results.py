"""results/: what a clone shows with no DVC remote and no internet.

The headline metrics are few and flat (``dvc metrics show`` stays readable), strict JSON
with no path; every plot is a PNG that ``dvc plots show`` draws in headless Chromium with
the network cut off (Vega, loaded from a CDN, would leave its plots blank there)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedct.report.results import headline_metrics, write_results
from tests.report.fakes import write_outputs
from tests.test_report_browser import OFFLINE, _chromium, _dump_dom, _png_size

REPO = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
TRAINED = ("A", "B", "E", "pooled")

# Appended to DVC's page: each image (decoded size) and each Vega container (the size of
# what Vega drew in it, 0 when it drew nothing).
CHECK = """<script>
addEventListener("load", () => setTimeout(() => {
  const images = [...document.images].map(i => ({src: i.getAttribute("src"),
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const vega = [...document.querySelectorAll("div")]
    .filter(d => [...d.querySelectorAll(":scope > script")]
      .some(s => s.textContent.includes("vegaEmbed")))
    .map(d => { const c = d.querySelector("canvas, svg");
                return c ? c.getBoundingClientRect().width * c.getBoundingClientRect().height
                         : 0; });
  const out = document.createElement("pre");
  out.id = "fedct-check";
  out.textContent = JSON.stringify({images, vega});
  document.body.appendChild(out);
}, 1000));
</script>"""


def _outputs(root: Path) -> Path:
    """The report's fake outputs plus what results/ reads beyond the report: training
    histories (validation every other epoch) and evaluate's detailed metrics.json."""
    write_outputs(root)
    rng = np.random.default_rng(1)
    for site in TRAINED:
        epochs = np.arange(1, 9)
        val = np.where(epochs % 2 == 0, 0.4 + 0.05 * epochs + rng.normal(0, 0.01, 8), np.nan)
        d = root / "models" / site
        d.mkdir(parents=True)
        pd.DataFrame({"step": epochs * 3, "epoch": epochs, "loss": 1.5 / epochs,
                      "val_dice_mean": val}).to_csv(d / "history.csv", index=False)
    (root / "evaluate" / "metrics.json").write_text(json.dumps({
        "best_local": "A", "sites": ["C", "G"], "n_cases": 12,
        "heldout_dice": {"local": 0.62, "local_A": 0.62, "pooled": 0.66, "fedavg": 0.65},
        "heldout_dice_C": {"local": 0.5, "fedavg": 0.6}}))
    return root


def test_headline_metrics_are_few_flat_numbers(tmp_path: Path) -> None:
    root = _outputs(tmp_path / "outputs")
    written = write_results(root, tmp_path / "results")
    metrics = json.loads((tmp_path / "results/metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))
    assert metrics == headline_metrics(root)
    # One level of grouping by stage, numbers only; DVC flattens to stage.key columns.
    columns = [f"{stage}.{k}" for stage, keys in metrics.items() for k in keys]
    assert all(isinstance(v, int | float) or v is None
               for keys in metrics.values() for v in keys.values())
    assert 10 <= len(columns) <= 40, columns
    assert metrics["evaluate"]["heldout_dice_fedavg"] == 0.65
    assert metrics["promote"] == {"promoted": 1, "vs_best_local": 0.03,
                                  "vs_best_local_lo": 0.012, "vs_best_local_hi": 0.05}
    assert metrics["uncertainty"]["auroc_all"] == 0.9
    assert metrics["federated"]["fedavg_last_round_val_dice"] == pytest.approx(0.8)
    # Per-site detail stays in evaluate's own metrics.json.
    assert "heldout_dice_C" not in json.dumps(metrics)
    names = {p.name for p in written}
    assert {"training_loss.png", "validation_dice.png", "federated_rounds.png",
            "heldout_dice.png", "catalogue_shift_heatmap.png"} <= names
    # A plot whose input is gone goes too.
    shutil.rmtree(root / "models")
    write_results(root, tmp_path / "results")
    assert not (tmp_path / "results/plots/training_loss.png").exists()


@pytest.mark.slow
def test_dvc_plots_show_draws_every_plot_offline_in_chromium(tmp_path: Path) -> None:
    """The repository's dvc.yaml ``metrics`` and ``plots`` over results/ written from fake
    outputs: `dvc metrics show` is narrow, and every plot of `dvc plots show` has pixels
    in Chromium with no network."""
    exe = _chromium()
    work = tmp_path / "repo"
    work.mkdir()
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (work / "dvc.yaml").write_text(yaml.safe_dump(
        {k: pipeline[k] for k in ("metrics", "plots")}, sort_keys=False))
    write_results(_outputs(tmp_path / "outputs"), work / "results")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    shown = subprocess.run([str(BIN / "dvc"), "metrics", "show"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert "results/metrics.json" in shown
    assert max(len(line) for line in shown.splitlines()) < 1500, shown[:300]
    subprocess.run([str(BIN / "dvc"), "plots", "show", "-o", "dvc_plots"], cwd=work, env=env,
                   check=True, capture_output=True, timeout=300)
    index = work / "dvc_plots" / "index.html"
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text().replace("</body>", CHECK + "</body>"))

    dom = _dump_dom(exe, probe, tmp_path, extra=OFFLINE)

    m = re.search(r'<pre id="fedct-check">(.*?)</pre>', dom, re.S)
    assert m, "the check did not run: " + dom[-500:]
    found = json.loads(html.unescape(m.group(1)))
    pngs = sorted((work / "results" / "plots").glob("*.png"))
    assert len(found["images"]) == len(pngs) >= 5
    for img in found["images"]:
        assert img["complete"] and img["width"] > 0, img
        png = (index.parent / img["src"]).read_bytes()
        assert (img["width"], img["height"]) == _png_size(png), img
    assert all(area > 0 for area in found["vega"]), f"blank Vega plots: {found['vega']}"
