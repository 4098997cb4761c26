"""The chunk-wise path check (one regex per patient) against the per-path definition."""

from __future__ import annotations

import random

import pytest

from fedct.catalogue.pathids import path_holds_id, paths_hold_ids

PID, NAME, BIRTH = "FAKEID-90210", "Doe^John", "19650312"


def _check(paths: list[str], pid: str | None = PID, name: str | None = NAME,
           birth: str | None = BIRTH) -> list[bool]:
    """``paths_hold_ids`` of ``paths`` (one patient), checked against ``path_holds_id``."""
    n = len(paths)
    got = paths_hold_ids(paths, [pid] * n, [name] * n, [birth] * n)
    assert got == [path_holds_id(p, pid, name, birth) for p in paths]
    return got


def test_a_token_matches_only_as_a_whole_word_of_the_path() -> None:
    assert _check([
        "FAKEID-90210/ST1/IM1.dcm",  # at the start of the path
        "site/x/fakeid-90210",  # at its end
        "site/Doe_John/IM1.dcm",  # "_" is no letter or digit
        "site/1965-03-12/IM1.dcm",
        "site/xfakeid-90210/IM1.dcm",  # inside a longer word
        "site/fakeid-902101/IM1.dcm",  # inside a longer number
        "site/Doeville/IM1.dcm",
        "site/ST1/2019650312/IM1.dcm",
        "site/ST1/IM1.dcm",
    ]) == [True, True, True, True, False, False, False, False, False]


def test_letters_beyond_ascii_are_letters_and_casefolding_may_change_lengths() -> None:
    assert _check(["site/éfakeid-90210/IM1.dcm", "site/fakeid-90210ü/IM1.dcm",
                   "site/·fakeid-90210/IM1.dcm"]) == [False, False, True]
    # "ß" casefolds to "ss": the name part "straße" is "strasse" in the path, and a path
    # that grows when casefolded must not shift later paths' hits onto their neighbours.
    assert _check(["site/STRASSE_ann/IM1.dcm"], name="Straße^Ann") == [True]
    assert _check(["ß" * 20 + "/fakeid-90210", "y/IM1.dcm", "İ" * 9 + "/z",
                   "w/FAKEID-90210"]) == [True, False, False, True]
    assert _check(["site/müller/IM1.dcm", "site/mueller/IM1.dcm"],
                  name="Müller^Jörg") == [True, False]


def test_tokens_with_regex_metacharacters_match_literally() -> None:
    pid = "A+B.(1)*"
    assert _check(["site/a+b.(1)*/IM1.dcm", "site/aab.(1)/IM1.dcm",
                   "site/a+b.(1)*x/IM1.dcm"], pid=pid) == [True, False, False]
    # "." and "\\" are no wildcards: "12.4" is not found in "1234".
    assert _check(["site/1234/IM1.dcm", "site/12.45/IM1.dcm", "site/x12.4/IM1.dcm",
                   "site/12.4_ct/IM1.dcm"], pid="12.4x", name=None, birth=None
                  ) == [False, False, False, False]
    assert _check(["site/[ab]|c/IM1.dcm", "site/a/IM1.dcm"], pid="[ab]|c") == [True, False]


def test_a_patient_id_with_a_slash_is_checked_path_by_path() -> None:
    assert _check(["site/ab/1234/IM1.dcm", "site/ab/12345/IM1.dcm", "ab/1234"],
                  pid="AB/1234", name=None, birth=None) == [True, False, True]


def test_each_file_is_checked_against_its_own_patient() -> None:
    paths = ["site/fakeid-90210/IM1.dcm", "site/fakeid-90210/IM2.dcm", "site/smith/IM1.dcm",
             "site/x/IM1.dcm"]
    got = paths_hold_ids(paths, [PID, "OTHER-1", None, None],
                         [NAME, None, "Smith^Ann", None], [BIRTH, None, None, None])
    assert got == [True, False, True, False]
    assert paths_hold_ids([], [], [], []) == []


@pytest.mark.parametrize("seed", range(5))
def test_random_paths_give_the_per_path_answer(seed: int) -> None:
    rng = random.Random(seed)
    pieces = ["fakeid-90210", "FAKEID-90210", "doe", "John", "19650312", "1965-03-12",
              "ß", "İ", "é", "_", "-", ".", "x", "7", "/", "a+b", "ÉCOLE", "Ὀ", "\udcff"]
    patients = [(PID, NAME, BIRTH), ("a+b", "Ecole^Ὀδυσσεύς", None), (None, None, None),
                ("AB/1234", None, "19000101"), ("ÉCOLE-9", "x^y", "1965031")]
    chosen = [rng.choice(patients) for _ in range(400)]
    paths = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in chosen]
    got = paths_hold_ids(paths, *zip(*chosen, strict=True))
    assert got == [path_holds_id(p, *c) for p, c in zip(paths, chosen, strict=True)]
    assert any(got) and not all(got)
