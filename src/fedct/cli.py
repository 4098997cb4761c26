"""The ``fedct`` command line: one thin command per pipeline stage."""

from __future__ import annotations

from pathlib import Path

import click

from fedct.config import ConfigError, load_params

PARAMS = click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="Pipeline parameters (one top-level key per stage).",
)


def _load(params_file: Path):
    try:
        return load_params(params_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
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
@click.option("--profile", type=click.Choice(["tiny", "demo", "study"]), default=None,
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
