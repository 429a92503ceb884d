"""Figures in every renderer are rounded down: never more robustness, accuracy or radius than measured or proven."""

from __future__ import annotations

import pytest

from robaudit.report.numbers import distinct, fixed, floor_fixed, floor_pct, floor_sig


@pytest.mark.parametrize(
    ("value", "shown"),
    [(26 / 30, "86.6%"), (2 / 3, "66.6%"), (0.9996, "99.9%"), (0.29, "29.0%"), (0.87, "87.0%"), (1.0, "100.0%"),
     (0.0, "0.0%"), (0.1 + 0.2, "30.0%")],
)
def test_percentages_round_down_from_the_exact_value(value: float, shown: str) -> None:
    assert floor_pct(value) == shown


def test_radii_and_ratios_round_down() -> None:
    assert [floor_sig(v) for v in (0.5401744, 0.4070564, 0.2143713, 0.5, 1e-7 * 1.23456)] == [
        "0.5401", "0.407", "0.2143", "0.5", "1.234e-07",
    ]  # fmt: skip
    assert floor_fixed(0.5026, 3) == "0.502" and floor_fixed(2 / 3, 0) == "0"


def test_a_gate_value_below_its_minimum_never_prints_equal_to_it() -> None:
    assert distinct(26 / 30, 0.8667) == ("0.8666", "0.8667")  # rounded down, as every rendered figure
    assert distinct(0.40000001, 0.4) == ("0.40000001", "0.40000000")
    assert distinct(0.5, 0.5) == ("0.5000", "0.5000")


def test_a_huge_gate_figure_is_written_in_significant_digits() -> None:
    # `--fail-under indicator_score=1e300` once printed its minimum with 305 characters.
    shown, minimum = distinct(2.0252935, 1e300)
    assert minimum == "1e+300" and shown == "2.02529"
    assert distinct(1e300, 1.0000001e300) == ("1e+300", "1.0000001e+300")
    assert fixed(2 / 3) == "0.6666"
    assert fixed(1e300) == "1e+300" and fixed(0.25) == "0.2500"
