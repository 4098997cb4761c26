"""Assemble the report from the outputs folder and write it atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedct.errors import FedctError
from fedct.report.html import Section, page
from fedct.report.sections import DETAILS
from fedct.report.summary import summary

TITLE = "fedct study report: federated learning on multi-hospital CT"


@dataclass(frozen=True)
class Report:
    """The HTML document and the sections it holds (with their missing inputs)."""

    html: str
    sections: tuple[Section, ...]

    @property
    def missing(self) -> tuple[str, ...]:
        """Inputs (relative to the outputs folder) some section could not find."""
        return tuple(dict.fromkeys(m for s in self.sections for m in s.missing))


def build_report(outputs_dir: str | Path) -> Report:
    """The report of the pipeline outputs under ``outputs_dir`` (see ``sections``)."""
    root = Path(outputs_dir)
    if not root.is_dir():
        raise FedctError(f"{root}: not a directory (the pipeline's outputs folder)")
    sections = tuple(build(root) for build in (summary, *DETAILS))
    missing = tuple(dict.fromkeys(m for s in sections for m in s.missing))
    intro = ["Built from the outputs of the fedct pipeline (DVC stages catalogue, "
             "uncertainty, federate, evaluate and promote). Sites are letters and series "
             "keys are pseudonymised; no patient identifier enters this page."]
    intro.append(f"{len(missing)} input(s) not available; their sections say which."
                 if missing else "Every input was available.")
    return Report(page(TITLE, sections, intro), sections)


def write_report(report: Report, path: str | Path) -> Path:
    """Write ``report`` to ``path`` (UTF-8), replacing it only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report.html, encoding="utf-8")
    os.replace(tmp, path)
    return path
