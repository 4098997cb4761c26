"""The code's shape is its design: layers that import only downwards, no private name
imported across modules, modules short enough to read, mlflow behind tracking.py alone.

Read from the source (AST), imports inside functions included, so a lazy import counts as
much as one at the top.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.source import imported_module

REPO = Path(__file__).parents[1]
SRC = REPO / "src"
BENCHMARKS = REPO / "benchmarks"
MAX_LINES = 600

#: fedct's layers, lowest first: a module may import its own layer and those below it,
#: never one above. One entry per top-level module or package of ``fedct``; a new one
#: must be placed here (``test_every_module_has_a_layer``).
#: - infrastructure (devices, provenance, process control, MLflow) knows no science;
#: - analysis (metrics, failure signals, statistics) sits below training and federation,
#:   which score their validation passes and label-free merges with its metrics;
#: - the stages (and ``synth``, the test bed's stage) wire the packages together; the
#:   commands above them run whole pipelines (report seeds, the study) or serve the UI.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("config", "overlay"),
    ("devices", "provenance", "procs", "logged_model", "tracking", "mlflow_server"),
    ("dicom",),
    ("catalogue",),
    ("data",),
    ("model",),
    ("analysis",),
    ("training",),
    ("federation",),
    ("inference",),
    ("report",),
    ("stages", "synth"),
    ("seeds", "study", "ui"),
    ("cli",),
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
#: The test bed: only the synth stage itself and the CLI that runs it import it.
TEST_BED = "synth"


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. fedct.training.local or benchmarks.federation
    path: Path
    line: int
    target: str  # the fedct module imported from
    name: str | None  # the name imported from it (None: the module itself)


def module_name(path: Path) -> str:
    if path.is_relative_to(SRC):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
    else:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def sources() -> list[Path]:
    return sorted([*SRC.rglob("*.py"), *BENCHMARKS.rglob("*.py")])


def imports(path: Path, text: str | None = None) -> list[Import]:
    """Every import of a fedct module or name in ``path`` (or in ``text``, as if it were
    that file); ``module.attr`` of an imported fedct module counts as importing ``attr``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text() if text is None else text)
    found: list[Import] = []
    aliases: dict[str, str] = {}  # local name -> fedct module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fedct":
                    found.append(Import(me, path, node.lineno, a.name, None))
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            mod = imported_module(node, package)
            if mod.split(".")[0] != "fedct":
                continue
            for a in node.names:
                if is_module(f"{mod}.{a.name}"):  # `from fedct.x import module`
                    found.append(Import(me, path, node.lineno, f"{mod}.{a.name}", None))
                    aliases[a.asname or a.name] = f"{mod}.{a.name}"
                else:
                    found.append(Import(me, path, node.lineno, mod, a.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            found.append(Import(me, path, node.lineno, aliases[node.value.id], node.attr))
    return found


@functools.cache
def all_imports() -> list[Import]:
    return [i for p in sources() for i in imports(p)]


def unit(module: str) -> str:
    """The top-level module or package of ``fedct`` that ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"  # `fedct` itself: nothing in it


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def where(i: Import) -> str:
    return f"{i.path.relative_to(REPO)}:{i.line}"


def test_every_module_has_a_layer() -> None:
    units = {unit(module_name(p)) for p in SRC.rglob("*.py")}
    assert units - set(LAYER) == set(), "place the new module in LAYERS"
    assert set(LAYER) - units == set(), "LAYERS names a module that does not exist"


def test_no_module_imports_a_higher_layer() -> None:
    upward = sorted(f"{where(i)}: {i.importer} imports {i.target}" for i in all_imports()
                    if i.importer.startswith("fedct")
                    and LAYER[unit(i.target)] > LAYER[unit(i.importer)])
    assert not upward, "\n".join(upward)


def test_only_the_synth_stage_and_the_cli_import_the_test_bed() -> None:
    # The pipeline reads the test bed's archive as it would a real one: through files.
    # Benchmarks may use its anatomy and scanners to set up studies.
    users = sorted(f"{where(i)}: {i.importer}" for i in all_imports()
                   if unit(i.target) == TEST_BED and i.importer.startswith("fedct")
                   and unit(i.importer) not in (TEST_BED, "cli"))
    assert not users, "\n".join(users)


def test_no_private_name_is_imported_across_modules() -> None:
    crossing = sorted(f"{where(i)}: {i.importer} uses {i.target}.{i.name}"
                      for i in all_imports() if i.target != i.importer
                      and (private(i.name or "") or any(map(private, i.target.split(".")))))
    assert not crossing, "make these public API where they are used elsewhere:\n" + \
        "\n".join(crossing)


def test_no_two_modules_share_a_name() -> None:
    # ``evaluate`` should say which one: the stage (stages/evaluate.py, one module per
    # stage and command) or the MC-dropout scoring it calls (analysis/mc_eval.py).
    names: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        if path.name != "__init__.py":
            names.setdefault(path.stem, []).append(str(path.relative_to(SRC)))
    assert {n: p for n, p in names.items() if len(p) > 1} == {}


def test_only_tracking_imports_mlflow() -> None:
    users = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "mlflow" for n in names):
                users.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert {u.split(":")[0] for u in users} <= {"src/fedct/tracking.py"}, users


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_every_module_is_at_most_600_lines(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines (at most {MAX_LINES})"


# --- the checks themselves see what they must ------------------------------------------------


def test_the_scan_sees_lazy_relative_aliased_and_attribute_imports() -> None:
    path = SRC / "fedct" / "training" / "local.py"
    text = ("def f():\n"
            "    from fedct.federation.aggregate import weighted_average\n"
            "    from ..analysis import metrics as m\n"
            "    import fedct.training.loop as loop\n"
            "    return m._roc, loop._seed\n")
    got = {(i.target, i.name) for i in imports(path, text)}
    assert ("fedct.federation.aggregate", "weighted_average") in got
    assert ("fedct.analysis.metrics", "_roc") in got  # relative, aliased, attribute
    assert ("fedct.training.loop", "_seed") in got
    upward = [i for i in imports(path, text)
              if LAYER[unit(i.target)] > LAYER[unit(i.importer)]]
    assert [i.target for i in upward] == ["fedct.federation.aggregate"]
    assert private("_roc") and private("_Hasher") and not private("__version__")
