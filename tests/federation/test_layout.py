"""The federation in Flower's layout: the science in ``task.py`` without Flower, thin apps
over it that do no science themselves, and no fault injection in any of them."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import fedct.federation
from fedct.federation.run_config import FederationConfig, run_config
from tests.federation.conftest import PARAMS

FEDERATION = Path(fedct.federation.__file__).parent


def _imports(name: str) -> set[str]:
    tree = ast.parse((FEDERATION / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_task_holds_the_science_and_no_flower() -> None:
    assert not [m for m in _imports("task") if m.split(".")[0] == "flwr"]
    assert {"fedct.training.local", "fedct.training.loop"} <= _imports("task")


def test_the_apps_train_and_evaluate_only_through_the_task() -> None:
    for app in ("client_app", "server_app"):
        science = [m for m in _imports(app)
                   if m.startswith(("fedct.training", "fedct.model.factory", "torch.nn"))]
        assert not science, (app, science)
    assert "fedct.model" not in {m.rpartition(".")[0] for m in _imports("client_app")}


def _code_words(name: str) -> set[str]:
    """Identifiers and non-docstring strings of a module (docstrings may point to the
    tests' fault injection)."""
    tree = ast.parse((FEDERATION / f"{name}.py").read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            words.add(node.name)
        elif isinstance(node, ast.arg):
            words.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            words.add(node.arg)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docs):
            words.add(node.value)
    return words


def test_no_fault_injection_in_the_apps_or_their_run_config() -> None:
    fields = {f.name for f in dataclasses.fields(FederationConfig)}
    keys = set(run_config(FederationConfig(sites=("A",), train_params=PARAMS, rounds=1,
                                           local_steps=1)))
    for name in ("client_app", "server_app", "run_config", "task", "strategy"):
        words = _code_words(name) | (fields | keys if name == "run_config" else set())
        bad = [w for w in words if re.search(r"(?<![a-z])(fault|kill|fail[_-])", w.lower())]
        assert not bad, (name, bad)
        assert "signal" not in _imports(name), name
