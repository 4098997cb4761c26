"""The README is a landing page and every page of ``docs/`` is reachable from it.

Checks every relative link of ``README.md`` and ``docs/**/*.md``: the target file or folder
exists, and a ``#anchor`` names a heading of the target page (GitHub's slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 300

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _links(text: str) -> list[str]:
    """Link targets outside fenced code blocks and code spans."""
    text = _CODE.sub("", _FENCE.sub("", text))
    return _LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {slug(h) for h in _HEADING.findall(_FENCE.sub("", page.read_text()))}


def _problems(page: Path, root: Path = ROOT) -> list[str]:
    out = []
    name = page.relative_to(root)
    for target in _links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            out.append(f"{name}: {target}: no such file")
        elif dest.is_dir() and not any(dest.glob("*.md")):
            out.append(f"{name}: {target}: a folder without pages")
        elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
            out.append(f"{name}: {target}: no heading #{anchor}")
    return out


def test_readme_is_a_landing_page() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail to docs/"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert _problems(page) == []


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    seen, todo = set(), [README]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in _links(page.read_text()):
            dest = (page.parent / target.partition("#")[0]).resolve()
            if dest.is_dir():  # a folder's link reaches each of its pages
                todo.extend(dest.glob("*.md"))
            elif dest.suffix == ".md" and dest.is_file():
                todo.append(dest)
    unreachable = [str(p.relative_to(ROOT)) for p in _pages() if p.resolve() not in seen]
    assert unreachable == []


def test_the_checker_catches_broken_links(tmp_path: Path) -> None:
    """A missing file and a missing heading are reported; links in code are not links."""
    (tmp_path / "b.md").write_text("# Title\n\n## The `make seeds` study (2 cores)\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#the-make-seeds-study-2-cores) [gone](c.md) "
                    "[bad](b.md#nope) [top](#title) `[code](d.md)`\n```\n[fenced](e.md)\n```\n"
                    "# Title\n")
    assert _problems(page, tmp_path) == ["a.md: c.md: no such file",
                                         "a.md: b.md#nope: no heading #nope"]


# The README's smoke numbers are those of the committed dvc.lock's outputs. Where the
# workspace holds exactly those outputs (after `make demo` on the machine kind the README
# names), every number it quotes must equal the one the stage wrote.
QUESTIONS = {  # README row (start) -> outputs/uncertainty/metrics.json keys
    "in-domain test Dice": ("in_domain_dice",),
    "failure detection": ("auroc_all", "auroc_lo_all", "auroc_hi_all"),
    "its AURC against the best baseline": ("aurc_all", "aurc_deterministic_max_softmax_all"),
}
CANDIDATES = {  # README row (start) -> the candidate's label in outputs/evaluate/metrics.json
    "best local model": "local", "pooled": "pooled", "one-shot": "one_shot",
    "FedAvg": "fedavg", "FedProx": "fedprox", "`uw_select`": "uw_select",
}
_NUMBER = re.compile(r"[+-]?\d+\.\d+")


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _locked_output(stage: str, out: str, name: str, root: Path = ROOT) -> Path | None:
    """``out/name`` when its bytes are those the committed ``dvc.lock`` records (through
    the DVC cache's listing of the ``out`` folder), else None."""
    import json

    import yaml

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    dirs = [o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out]
    path = root / out / name
    if not dirs or not path.is_file():
        return None
    listing = root / ".dvc" / "cache" / "files" / "md5" / dirs[0][:2] / dirs[0][2:]
    if not listing.is_file():
        return None
    md5 = {e["relpath"]: e["md5"] for e in json.loads(listing.read_text())}.get(name)
    return path if md5 == _md5(path) else None


def _table_rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for every table row of ``text``."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def _row(rows: dict[str, list[str]], start: str) -> list[str]:
    found = [cells for first, cells in rows.items() if first.startswith(start)]
    assert len(found) == 1, f"README: no single table row starting {start!r}"
    return found[0]


def smoke_number_mismatches(readme: str, uncertainty: dict, evaluate: dict) -> list[str]:
    """Every number of the README's smoke tables that differs from the metrics files."""
    rows, bad = _table_rows(readme), []

    def check(where: str, quoted: str, value: float | None) -> None:
        if value is None or f"{value:+.3f}" != f"{float(quoted):+.3f}":
            bad.append(f"{where}: README {quoted}, outputs {value}")

    for start, keys in QUESTIONS.items():
        for key, quoted in zip(keys, _NUMBER.findall(_row(rows, start)[0]), strict=True):
            check(key, quoted, uncertainty.get(key))
    ranking = _row(rows, "label-free site ranking")[0].replace(" ", "")
    if ranking != uncertainty.get("site_ranking"):
        bad.append(f"site_ranking: README {ranking}, outputs {uncertainty.get('site_ranking')}")
    for start, label in CANDIDATES.items():
        dice, paired = _row(rows, start)[:2]
        for suffix, quoted in zip(("", "_lo", "_hi"), _NUMBER.findall(dice), strict=True):
            check(f"heldout_dice{suffix}.{label}", quoted,
                  evaluate.get(f"heldout_dice{suffix}", {}).get(label))
        for suffix, quoted in zip(("", "_lo", "_hi") if paired != "-" else (),
                                  _NUMBER.findall(paired), strict=True):
            check(f"paired_vs_best_local{suffix}.{label}", quoted,
                  evaluate.get(f"paired_vs_best_local{suffix}", {}).get(label))
    return bad


def test_readme_smoke_numbers_are_the_committed_lock_outputs() -> None:
    import json

    files = [_locked_output("uncertainty", "outputs/uncertainty", "metrics.json"),
             _locked_output("evaluate", "outputs/evaluate", "metrics.json")]
    if None in files:
        pytest.skip("outputs/ does not hold the committed dvc.lock's metrics "
                    "(run `make demo` on the CPU the README names)")
    uncertainty, evaluate = (json.loads(f.read_text()) for f in files)
    assert smoke_number_mismatches(README.read_text(), uncertainty, evaluate) == []


def test_the_smoke_number_check_reads_every_quoted_number(tmp_path: Path) -> None:
    """Metrics equal to the README's numbers pass; one changed number is named."""
    import json

    rows = _table_rows(README.read_text())
    numbers = {key: float(q) for start, keys in QUESTIONS.items()
               for key, q in zip(keys, _NUMBER.findall(_row(rows, start)[0]), strict=True)}
    uncertainty = {**numbers, "site_ranking":
                   _row(rows, "label-free site ranking")[0].replace(" ", "")}
    evaluate: dict = {}
    for start, label in CANDIDATES.items():
        dice, paired = _row(rows, start)[:2]
        for suffix, q in zip(("", "_lo", "_hi"), _NUMBER.findall(dice), strict=True):
            evaluate.setdefault(f"heldout_dice{suffix}", {})[label] = float(q) + 4e-4
        for suffix, q in zip(("", "_lo", "_hi") if paired != "-" else (),
                             _NUMBER.findall(paired), strict=True):
            evaluate.setdefault(f"paired_vs_best_local{suffix}", {})[label] = float(q)
    assert len(evaluate["heldout_dice"]) == len(CANDIDATES) == 6
    assert smoke_number_mismatches(README.read_text(), uncertainty, evaluate) == []
    evaluate["heldout_dice_hi"]["fedavg"] += 0.002
    assert smoke_number_mismatches(README.read_text(), uncertainty, evaluate) == [
        f"heldout_dice_hi.fedavg: README 0.633, outputs {evaluate['heldout_dice_hi']['fedavg']}"]
    # The lock's listing decides which outputs count as the committed ones.
    (tmp_path / "outputs" / "evaluate").mkdir(parents=True)
    metrics = tmp_path / "outputs" / "evaluate" / "metrics.json"
    metrics.write_text(json.dumps(evaluate))
    listing = tmp_path / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef.dir"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([{"md5": _md5(metrics), "relpath": "metrics.json"}]))
    (tmp_path / "dvc.lock").write_text(
        "stages:\n  evaluate:\n    outs:\n    - path: outputs/evaluate\n      md5: abcdef.dir\n")
    assert _locked_output("evaluate", "outputs/evaluate", "metrics.json", tmp_path) == metrics
    metrics.write_text("{}")
    assert _locked_output("evaluate", "outputs/evaluate", "metrics.json", tmp_path) is None
