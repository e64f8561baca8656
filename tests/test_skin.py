"""The shared Fitzpatrick vocabulary: every code a dataset uses maps to I–VI, a group, unknown, or None."""

from __future__ import annotations

import pytest

from dermkohya.skin import UNKNOWN, fst_from_caption, parse_fst


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", "III"), (3, "III"), ("III", "III"), ("FST3", "III"), ("type iv", "IV"), ("6.0", "VI"),
     ("34", "III-IV"), ("56", "V-VI"), ("I-II", "I-II"), (-1, UNKNOWN), ("", UNKNOWN), ("nan", UNKNOWN),
     ("7", None), ("x", None)],
)
def test_parse_fst(value: object, expected: str | None) -> None:
    assert parse_fst(value) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [("clinical dermatology photograph, plaque, Fitzpatrick skin type IV, medical", "IV"),
     ("Fitzpatrick skin type I-II, erythema", "I-II"),  # a group stays a group
     ("fitzpatrick type 5-6", "V-VI"),
     ("Fitzpatrick skin type VI", "VI"),
     ("no skin type here", None)],
)
def test_fst_from_caption(caption: str, expected: str | None) -> None:
    assert fst_from_caption(caption) == expected
