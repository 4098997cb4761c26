"""The ``fedct`` command line: one thin command per pipeline stage."""

from __future__ import annotations

from pathlib import Path

import click

from fedct.config import load_params
from fedct.errors import FedctError, printable


class _Group(click.Group):
    """Turns a stage's :class:`FedctError` into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FedctError as exc:
            raise click.ClickException(printable(str(exc))) from exc


PARAMS = click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="Pipeline parameters (one top-level key per stage).",
)


def _load(params_file: Path):
    return load_params(params_file)


@click.group(cls=_Group)
@click.version_option(package_name="fedct")
def main() -> None:
    """fedct: federated learning on multi-hospital CT, from DICOM archive to registry."""


@main.command()
@click.argument("archive_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--truth", "truth_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the ground truth goes (tests and evaluation only).")
@click.option("--labels", "labels_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="NIfTI label masks [default: ARCHIVE_DIR/../labels].")
@click.option("--profile", type=click.Choice(["tiny", "demo", "study", "clinical"]), default=None,
              help="Archive size [default: synth.profile of params.yaml].")
@click.option("--seed", type=int, default=None, help="[default: synth.seed of params.yaml]")
@click.option("--workers", type=int, default=None, help="Processes [default: all cores].")
@PARAMS
def synth(archive_dir: Path, truth_dir: Path, labels_dir: Path | None, profile: str | None,
          seed: int | None, workers: int | None, params_file: Path) -> None:
    """Write the synthetic multi-site CT archive (DICOM) with labels and ground truth."""
    import dataclasses

    from fedct import synth as synth_mod

    params = _load(params_file).synth
    params = dataclasses.replace(
        params,
        profile=profile or params.profile,  # type: ignore[arg-type]
        seed=params.seed if seed is None else seed,
    )
    labels_dir = labels_dir or archive_dir.parent / "labels"
    summary = synth_mod.run(params, archive_dir, labels_dir, truth_dir, workers)
    click.echo(
        f"wrote {summary['n_files']} files, {summary['n_series']} series "
        f"({summary['n_usable']} usable) of {summary['n_patients']} patients to {archive_dir}"
    )


@main.command()
@click.argument("archive_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--workers", type=int, default=None,
              help="Parallel header readers [default: catalogue.workers].")
@click.option("--index-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Per-file index for incremental rescans [default: OUT_DIR/index].")
@click.option("--paths-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The tables with archive paths (the cohort's file lists), which stay "
                   "at the site: keep them out of anything DVC caches [default: "
                   "OUT_DIR/paths].")
@click.option("--scheduler", default=None, help="Dask scheduler address (tcp://host:8786).")
@PARAMS
def catalogue(archive_dir: Path, out_dir: Path, workers: int | None, index_dir: Path | None,
              paths_dir: Path | None, scheduler: str | None, params_file: Path) -> None:
    """Catalogue ARCHIVE_DIR: one row per series, rejects, vendor x site reports."""
    import dataclasses

    from fedct.stages import catalogue as stage

    params = _load(params_file).catalogue
    if workers is not None:
        params = dataclasses.replace(params, workers=workers)
    if scheduler is not None:
        params = dataclasses.replace(params, scheduler=scheduler)
    result = stage.run(params, archive_dir, out_dir, index_dir=index_dir, paths_dir=paths_dir)
    click.echo(str(result))


@main.command()
@click.argument("catalogue_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--archive", "archive_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", "labels_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="NIfTI labels named by SeriesInstanceUID.")
@click.option("--paths-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The catalogue's --paths-dir [default: CATALOGUE_DIR/paths].")
@PARAMS
def cohort(catalogue_dir: Path, out_dir: Path, archive_dir: Path, labels_dir: Path | None,
           paths_dir: Path | None, params_file: Path) -> None:
    """Choose usable series, split per site by patient, prepare the volumes."""
    from fedct.stages import cohort as stage

    params = _load(params_file)
    df = stage.run(params.cohort, params.catalogue, catalogue_dir, archive_dir, labels_dir,
                   out_dir, paths_dir)
    click.echo(df.groupby(["site", "split"]).size().unstack(fill_value=0).to_string())


@main.command()
@click.argument("cohort_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("models_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--site", "sites", multiple=True,
              help="Site letter, or 'pooled' for all training sites (repeatable; default: "
                   "train.sites).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Resume a killed run from here.")
@PARAMS
def train(cohort_dir: Path, models_dir: Path, sites: tuple[str, ...],
          checkpoint_dir: Path | None, params_file: Path) -> None:
    """Train the Bayesian U-Net of each site and the pooled model into MODELS_DIR/<site>."""
    from fedct.stages import train as stage

    params = _load(params_file).train
    results = stage.run_sites(params, sites or params.sites, cohort_dir, models_dir,
                              checkpoint_dir)
    for site, metrics in results.items():
        click.echo(f"{site}: {metrics}")


@main.command()
@click.argument("cohort_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("models_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@PARAMS
def uncertainty(cohort_dir: Path, models_dir: Path, out_dir: Path, params_file: Path) -> None:
    """Every model on every site with MC dropout: shift matrix, failure detection."""
    from fedct.stages import uncertainty as stage

    params = _load(params_file)
    metrics = stage.run(params.uncertainty, cohort_dir, models_dir, out_dir,
                        control_sites=params.cohort.control_sites)
    click.echo(metrics)


@main.command()
@click.argument("cohort_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("models_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Round checkpoints: a killed federation resumes from here.")
@PARAMS
def federate(cohort_dir: Path, models_dir: Path, out_dir: Path, checkpoint_dir: Path | None,
             params_file: Path) -> None:
    """Federated models of the training sites (one-shot, FedAvg, FedProx on Flower) and
    the label-free, uncertainty-guided methods for the held-out sites."""
    from fedct.stages import federate as stage

    params = _load(params_file)
    metrics = stage.run(params.federate, params.train, cohort_dir, models_dir, out_dir,
                        checkpoint_dir)
    click.echo(metrics)


@main.command()
@click.argument("cohort_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("models_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("federated_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--threshold", "threshold_file", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The uncertainty stage's threshold.json (flag threshold of the signal).")
@PARAMS
def evaluate(cohort_dir: Path, models_dir: Path, federated_dir: Path, out_dir: Path,
             threshold_file: Path | None, params_file: Path) -> None:
    """Every local, pooled and federated model on the held-out sites' test cases: Dice,
    HD95 and the failure signal, with cluster-bootstrap intervals and paired differences."""
    from fedct.stages import evaluate as stage

    params = _load(params_file)
    metrics = stage.run(params.evaluate, params.uncertainty, cohort_dir, models_dir,
                        federated_dir, out_dir, threshold_file)
    click.echo(stage.summary_line(metrics))


@main.command()
@click.argument("evaluate_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("models_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("federated_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("uncertainty_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@PARAMS
def promote(evaluate_dir: Path, models_dir: Path, federated_dir: Path, uncertainty_dir: Path,
            out_dir: Path, params_file: Path) -> None:
    """Register the federated candidate; alias it champion only if it beats the locals.
    The table and the weights (local models in MODELS_DIR, the candidate in FEDERATED_DIR)
    must be those that `fedct evaluate` scored."""
    from fedct.stages import promote as stage

    stage.run(_load(params_file).promote, evaluate_dir, models_dir, federated_dir,
              uncertainty_dir, out_dir)


@main.command()
@click.argument("outputs_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "out_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The HTML file to write.")
@click.option("--results", "results_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write the headline metrics.json and plots/*.png here (the "
                   "results committed to git: docs/results-and-ui.md).")
def report(outputs_dir: Path, out_file: Path, results_dir: Path | None) -> None:
    """The study report of OUTPUTS_DIR as one static HTML file (logged to MLflow)."""
    from fedct.stages import report as stage

    result = stage.run(outputs_dir, out_file, results_dir=results_dir)
    missing = f"; not available: {', '.join(result.missing)}" if result.missing else ""
    click.echo(f"wrote {out_file} ({len(result.sections)} sections){missing}")


@main.command()
@click.argument("model_uri")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--mc-samples", type=click.IntRange(min=2), default=None,
              help="MC-dropout samples [default: the model card's; at another number "
                   "the failure score is not flagged, its threshold being calibrated at the "
                   "card's].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1...")
@click.option("--uncertainty", type=click.Choice(["entropy", "variance", "mutual_information"]),
              default="entropy", show_default=True, help="Voxel uncertainty map to write.")
def predict(model_uri: str, input_path: Path, out_dir: Path, mc_samples: int | None,
            device: str, uncertainty: str) -> None:
    """Segment INPUT (DICOM series folder or NIfTI) with MODEL_URI (models:/name@alias,
    models:/name/version, runs:/... or a model folder): label map, uncertainty, report,
    DICOM SEG."""
    from fedct.inference import predict as command

    report = command.run(model_uri, input_path, out_dir, mc_samples, device, uncertainty)
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    failure = report["failure"]
    flag = failure["flag"]
    why = failure["reason"] if failure.get("note") else "no threshold"
    click.echo(f"wrote {', '.join(v for v in report['outputs'].values() if v)} to {out_dir}; "
               f"failure flag: {f'none ({why})' if flag is None else flag}")


@main.command("convert-model")
@click.argument("old_model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def convert_model(old_model: Path, out_dir: Path) -> None:
    """Re-export a pickled OLD_MODEL (model.pt of an earlier fedct) that you trust as
    OUT_DIR/model.safetensors + model_card.json. It is read with
    torch.load(weights_only=True): tensors and plain containers only, anything else is
    refused. A model from an untrusted source should be retrained, not converted."""
    from fedct.model.io import convert_legacy

    out = convert_legacy(old_model, out_dir)
    click.echo(f"wrote {out} and its card; register or evaluate that folder, not {old_model}")


@main.command()
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default="outputs/seeds", show_default=True, help="Summary folder.")
@click.option("--run/--no-run", "run_missing", default=True, show_default=True,
              help="Run the report-seed experiments that do not exist yet.")
@click.option("--force", is_flag=True, help="Rerun every report-seed experiment.")
@PARAMS
def seeds(out_dir: Path, run_missing: bool, force: bool, params_file: Path) -> None:
    """The study over report seeds: one `dvc exp run --temp` per pair of
    synth.report_seeds and cohort.report_seeds (up to evaluate), then per-seed and pooled
    tables in OUT."""
    from fedct import seeds as command

    if params_file.resolve() != Path("params.yaml").resolve():
        # `dvc exp run` reads the repository's params.yaml: another file would be
        # summarised beside experiments that never saw it.
        raise FedctError(f"--params {params_file}: the experiments run with the repository's "
                         "params.yaml (DVC); edit and commit that file instead")
    result = command.run(_load(params_file), out_dir, run_missing=run_missing, force=force)
    click.echo(f"summarised {len(result['experiments'])} report seeds "
               f"({', '.join(result['experiments'])}) in {out_dir}")


@main.command()
@click.option("--profile", "overlay", type=click.Path(exists=True, dir_okay=False,
                                                      path_type=Path),
              default="profiles/study.yaml", show_default=True,
              help="Params overlay of the study (checked like params.yaml).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default="results/study", show_default=True,
              help="runs.csv (one row per finished run) and pooled.json.")
@click.option("--queue", is_flag=True,
              help="Queue the missing runs in DVC's experiment queue (then `dvc queue start "
                   "-j N`; a later `fedct study` reads them back).")
@PARAMS
def study(overlay: Path, out_dir: Path, queue: bool, params_file: Path) -> None:
    """The study (issue 23): one `dvc exp run --temp` per (report seed pair, training
    seed) of the overlay, each run's row appended to OUT/runs.csv as it finishes (a rerun
    skips those already there) and OUT/pooled.json rewritten."""
    from fedct import study as command

    if params_file.resolve() != Path("params.yaml").resolve():
        raise FedctError(f"--params {params_file}: the experiments run with the repository's "
                         "params.yaml (DVC); put the study's changes in the overlay")
    runs = command.run(overlay, out_dir, params_file, queue=queue)
    if queue:
        click.echo("queued; run them with `dvc queue start -j N`, then `fedct study` again")
        return
    click.echo(f"{len(runs)} study run(s) in {out_dir / command.RUNS_FILE}; pooled in "
               f"{out_dir / command.POOLED_FILE}")


@main.command()
@click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default="mlflow.db",
              show_default=True, help="The pipeline's MLflow store (SQLite).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: this machine only).")
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True,
              help="Server worker processes (one suits a 2-core machine).")
def ui(store: Path, host: str, port: int, workers: int) -> None:
    """Open the study in MLflow's UI: serve the store and print its runs and registry pages;
    Ctrl-C stops the server."""
    from fedct import ui as command

    command.run(store, host, port, workers)
