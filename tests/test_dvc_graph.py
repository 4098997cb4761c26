"""dvc.yaml matches the code: every stage depends on every project module it imports,
lists only params keys that exist, and no stage imports another stage or the test bed.

The ``synth`` stage is the test bed itself (``fedct.synth``, not a module of
``fedct.stages``): a real archive replaces it (README)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.source import imported_module

REPO = Path(__file__).parents[1]
SRC = REPO / "src"
# Keys that only say where or how fast a stage runs: listing them would rerun work whose
# results cannot change, except by float rounding (threads per process), as on a machine
# with another number of cores.
OPERATIONAL = {"catalogue.workers", "catalogue.scheduler", "catalogue.chunk_size",
               "train.device", "train.workers", "uncertainty.workers", "uncertainty.device",
               "evaluate.workers", "evaluate.device", "federate.device"}


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def imported_modules(name: str) -> set[str]:
    """Project modules that ``name`` imports anywhere (top level or inside functions)."""
    path = module_file(name)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = imported_module(node, package)
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    out: set[str] = set()
    for mod in found:
        if mod == "fedct" or mod.startswith("fedct."):
            parts = mod.split(".")
            # Importing a.b.c runs a/__init__, a/b/__init__ too.
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                       if module_file(".".join(parts[:i])) is not None)
    return out


def closure(start: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(imported_modules(m) - seen)
    return seen


def stages() -> dict[str, dict]:
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: (st["do"] if "foreach" in st else st) for name, st in raw.items()}


#: The stage that writes the synthetic archive: its code is the test bed package.
TEST_BED = "synth"


def stage_module(name: str) -> str:
    return "fedct.synth" if name == TEST_BED else f"fedct.stages.{name}"


def stage_command(stage: dict) -> str:
    m = re.match(r"\s*fedct\s+([a-z_-]+)", stage["cmd"])
    assert m, f"stage command {stage['cmd']!r} does not run `fedct <stage>`"
    return m.group(1).replace("-", "_")


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def dep_paths(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_cover_its_import_closure(name: str) -> None:
    stage = stages()[name]
    command = stage_command(stage)
    assert command == name, f"stage {name} runs `fedct {command}`: one stage, one command"
    # The CLI loads params through config (and maps errors) before calling the stage.
    mods = closure({stage_module(command), "fedct.config", "fedct.errors"})
    # Its command line itself (option wiring, defaults) is part of every stage too.
    missing = sorted(str(module_file(m).relative_to(REPO)) for m in mods | {"fedct.cli"}
                     if not covered(module_file(m), dep_paths(stage)))
    assert not missing, f"dvc.yaml stage {name} imports but does not depend on {missing}"


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_hold_no_module_it_does_not_import(name: str) -> None:
    # A source dep outside the import closure reruns the stage for nothing (editing the
    # U-Net must not regenerate the synthetic archive): every src/ dep holds at least
    # one module the stage imports. The stage module's own packages run on import too.
    stage = stages()[name]
    start = stage_module(stage_command(stage))
    parts = start.split(".")
    mods = closure({start, "fedct.config", "fedct.errors"}) | {"fedct.cli"} | {
        ".".join(parts[:i]) for i in range(1, len(parts))}
    files = [module_file(m).relative_to(REPO).as_posix() for m in mods]
    unused = [d for d in dep_paths(stage) if d.startswith("src/")
              and not any(f == d or f.startswith(d.rstrip("/") + "/") for f in files)]
    assert not unused, f"dvc.yaml stage {name} depends on {unused} but imports none of it"


def test_only_the_stages_that_load_models_depend_on_the_model_package() -> None:
    # tracking.py logs models without importing fedct.model (fedct.logged_model says what
    # a logged model declares): stages that never build or load a network stay apart.
    for name in ("synth", "catalogue", "cohort", "report"):
        assert not any(d.startswith("src/fedct/model") for d in dep_paths(stages()[name])), name
        assert "fedct.model" not in closure({stage_module(name)}), name


@pytest.mark.parametrize("name", sorted(set(stages()) - {TEST_BED}))
def test_no_stage_imports_another_stage_or_the_test_bed(name: str) -> None:
    mods = closure({f"fedct.stages.{name}"})
    others = sorted(m for m in mods if m.startswith("fedct.stages.")
                    and m != f"fedct.stages.{name}")
    synth = sorted(m for m in mods if m == "fedct.synth" or m.startswith("fedct.synth."))
    assert not others and not synth, (name, others, synth)


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_params_exist_and_are_not_operational(name: str) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    listed = stages()[name].get("params", [])
    for key in listed:
        assert isinstance(key, str), key
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{name}: {key} not in params.yaml"
            node = node[part]
        assert key not in OPERATIONAL, f"{name} lists {key}, which cannot change its results"
        assert "." in key, f"{name} lists the whole key {key!r}; list the keys it reads"


def test_the_closure_finds_lazy_imports() -> None:
    # The check itself must see an import inside a function (train's tracking import).
    assert "fedct.tracking" in closure({"fedct.stages.train"})
    assert "fedct.model.unet" in closure({"fedct.stages.train"})


def test_the_test_bed_stage_feeds_the_pipeline_through_files_only() -> None:
    # The archive stage is the only one running fedct.synth; every other stage reads what
    # it wrote (archive, labels), as with a real archive.
    assert TEST_BED in stages()
    assert "fedct.stages" not in {m.rpartition(".")[0] for m in closure({"fedct.synth"})}
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in stages()[TEST_BED]["outs"]}
    assert {"data/archive", "data/labels"} <= outs
    assert "data/archive" in dep_paths(stages()["catalogue"])
    assert "data/labels" in dep_paths(stages()["cohort"])


def test_metrics_and_plots_travel_with_git_and_draw_without_vega() -> None:
    # A clone without the DVC remote has only what git carries: every metrics file and
    # plot sits in an uncached output (committed with dvc.lock), and every plot is an
    # image (no Vega template: Vega loads from a CDN, blank where that is blocked). The
    # learning curves draw every history file there is (fedct.report.results), so no
    # list of sites here can fall behind train.sites.
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    uncached = {path for stage in pipeline["stages"].values() for o in stage.get("outs", [])
                if isinstance(o, dict) for path, spec in o.items()
                if spec and spec.get("cache") is False}
    uncached -= {"outputs/catalogue_paths", "outputs/catalogue_index"}  # site-only
    assert uncached == {"results/metrics.json", "results/plots"}
    for path in [*pipeline["metrics"], *pipeline["plots"]]:
        assert isinstance(path, str) and path in uncached, path
    # results/ also holds what no stage writes (make study's results/study, benchmarks'
    # JSON): no output may be that folder or above it, or `dvc repro` would delete them.
    outs = {next(iter(o)) if isinstance(o, dict) else o
            for stage in pipeline["stages"].values() for o in stage.get("outs", [])}
    for kept in ("results/study/runs.csv", "results/benchmarks/ui-open.json"):
        assert not [o for o in outs if kept == o or kept.startswith(o.rstrip("/") + "/")], kept
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/metrics.json"],
                             cwd=REPO, capture_output=True)
    assert ignored.returncode == 1, "results/ is git-ignored"
