"""Archive paths that spell out their own patient: the check of one path and of a chunk.

A folder named after the PatientID (or the patient's name or birth date) puts an
identifier into every table that holds paths; the catalogue counts such files without
storing the identifier. ``path_holds_id`` is the definition; ``paths_hold_ids`` gives
the same answers for a whole chunk of files with one regular expression per patient.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# Shorter PatientIDs ("12", "A1") turn up in paths by chance (series numbers, dates).
MIN_ID_IN_PATH = 4
# Name parts shorter than this ("Li", "Al") are not compared: they match by chance.
MIN_NAME_PART = 3
# PatientName words of de-identified, phantom or test data: folder names too, no person.
NAME_PLACEHOLDERS = frozenset({"anonymous", "anonymized", "anonymised", "anon", "patient",
                               "unknown", "phantom", "test", "research", "study", "subject"})
# ``str.isalnum`` of one character, as a regex class: a word character (\w) that is not
# "_" (both are Py_UNICODE_ISALNUM in CPython); a token's neighbours must not be one.
_ALNUM = r"[^\W_]"


def _holds_token(path: str, token: str) -> bool:
    """Whether casefolded ``path`` contains casefolded ``token`` not inside a longer word or
    number (its neighbours are not letters or digits)."""
    start = path.find(token)
    while start >= 0:
        end = start + len(token)
        if (start == 0 or not path[start - 1].isalnum()) and \
                (end == len(path) or not path[end].isalnum()):
            return True
        start = path.find(token, start + 1)
    return False


def _id_tokens(patient_id: str | None, name: str | None, birth_date: str | None
               ) -> tuple[str, ...]:
    """The casefolded tokens that ``path_holds_id`` looks for (see there)."""
    tokens = []
    pid = (patient_id or "").strip().casefold()
    if len(pid) >= MIN_ID_IN_PATH:
        tokens.append(pid)
    # PN: components by "^", groups by "=", values by "\\"; only words of letters count,
    # and not the placeholders of de-identified or test data ("ANONYMOUS", "PATIENT^001").
    tokens += [part for part in re.split(r"[\s^,=\\]+", (name or "").casefold())
               if len(part) >= MIN_NAME_PART and part.isalpha()
               and part not in NAME_PLACEHOLDERS]
    date = (birth_date or "").strip()
    if len(date) == 8 and date.isdigit():
        tokens += [date, f"{date[:4]}-{date[4:6]}-{date[6:]}"]
    return tuple(tokens)


def path_holds_id(relpath: str, patient_id: str | None, name: str | None = None,
                  birth_date: str | None = None) -> bool:
    """Whether ``relpath`` spells out its own patient: the PatientID, a part of the
    PatientName or the PatientBirthDate as a whole token, in any letter case.

    An export laid out as ``<PatientID>/<study>/...``, ``DOE^JOHN/...``,
    ``Doe_John_19650312/...`` or ``.../1965-03-12/...``, but not an ID's digits inside a
    longer number or a name part inside another word. IDs under ``MIN_ID_IN_PATH``
    characters, name parts that are not words of at least ``MIN_NAME_PART`` letters or
    are placeholders (``NAME_PLACEHOLDERS``) are not compared; a birth date only as its 8
    digits (YYYYMMDD) or in ISO form (YYYY-MM-DD).
    """
    path = relpath.casefold()
    return any(_holds_token(path, t) for t in _id_tokens(patient_id, name, birth_date))


def _token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """Any of ``tokens`` with no letter or digit on either side (``_holds_token``).

    Regex search tries every start and, at each, every alternative, so it finds a whole
    token wherever ``_holds_token``'s scan of every occurrence does.
    """
    alternatives = "|".join(re.escape(t) for t in sorted(set(tokens), key=len, reverse=True))
    return re.compile(f"(?<!{_ALNUM})(?:{alternatives})(?!{_ALNUM})")


def paths_hold_ids(relpaths: Sequence[str], patient_ids: Sequence[str | None],
                   names: Sequence[str | None], birth_dates: Sequence[str | None]
                   ) -> list[bool]:
    """``path_holds_id`` of every file of a chunk (relpath i with identifiers i).

    Files are grouped by patient (their identifiers); each group's paths, joined by "/",
    are casefolded and searched with one pattern of that patient's tokens. "/" is no
    letter or digit, so a path's ends are token boundaries as they are alone, and a token
    without "/" cannot match across two paths. A patient with a token that holds "/" (a
    PatientID like "12/345") is checked path by path.
    """
    out = np.zeros(len(relpaths), dtype=bool)
    keys = list(zip(patient_ids, names, birth_dates, strict=True))
    patients = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    codes = np.fromiter(map(patients.__getitem__, keys), dtype=np.intp, count=len(keys))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(patients) + 1))
    for key, lo, hi in zip(patients, bounds[:-1], bounds[1:], strict=True):
        tokens = _id_tokens(*key)
        if not tokens:
            continue
        files = order[lo:hi]
        if any("/" in t for t in tokens):
            for i in files.tolist():
                out[i] = path_holds_id(relpaths[i], *key)
            continue
        paths = [relpaths[i] for i in files.tolist()]
        # casefold maps character by character, so the casefold of the joined text is the
        # join of each path's casefold; starts[j]: where path j begins in it.
        text = "/".join(paths).casefold()
        if not text.isascii():
            paths = [p.casefold() for p in paths]
        starts = np.zeros(len(paths) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, paths), dtype=np.int64, count=len(paths)) + 1,
                  out=starts[1:])
        search = _token_pattern(tokens).search
        hit = search(text)
        while hit is not None:
            j = int(np.searchsorted(starts, hit.start(), side="right")) - 1
            out[files[j]] = True
            hit = search(text, int(starts[j + 1]))  # the next path
    return out.tolist()
