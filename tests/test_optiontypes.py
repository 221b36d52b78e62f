"""Option value types: every bad value is argparse's usage error (exit 4), never a crash."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routeaudit import optiontypes
from routeaudit.cli import main

CHECKS = [
    (optiontypes.positive_int, ["1", "7"], ["0", "-3", "1.5", "x", ""]),
    (optiontypes.non_negative, ["0", "0.01", "3"], ["-0.1", "nan", "inf", "x"]),
    (optiontypes.positive_number, ["0.02", "5"], ["0", "-1", "nan", "inf"]),
    (optiontypes.at_least_one, ["1", "5.5"], ["0.99", "nan", "inf", "-2"]),
    (optiontypes.probability, ["0.05", "0.5"], ["0", "1", "nan", "2"]),
]


@pytest.mark.parametrize(("kind", "good", "bad"), CHECKS)
def test_values_accepted_and_refused(kind, good, bad):
    for text in good:
        assert kind(text) == float(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_non_negative_accepts_exactly_the_finite_non_negative_numbers(x):
    text = repr(x)
    if x >= 0 and x != float("inf"):
        assert optiontypes.non_negative(text) == x
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            optiontypes.non_negative(text)


@pytest.mark.parametrize("option", ["--ece-tol", "--shift-ratio", "--gap-margin", "--nll-margin"])
def test_cli_refuses_a_bad_value_with_a_usage_error(option, capsys, tmp_path):
    assert main(["run", str(tmp_path / "x.npz"), option, "nan"]) == 4
    assert f"argument {option}: must be a finite number: nan" in capsys.readouterr().err
