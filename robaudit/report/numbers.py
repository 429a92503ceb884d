"""How the renderers write figures: never above what was measured or proven.

Robust accuracy is an upper bound on the true robustness, a certified radius or
certified accuracy a lower bound. Rounded to nearest, 26/30 would read 86.7% and a radius
of 0.5401744 would read 0.5402: more than the scan showed. Figures are cut towards minus
infinity instead (86.6%, 0.5401), from the exact decimal of the float (so 0.29 stays 29.0%).
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal


def _exact(value: float) -> Decimal:
    """The float's shortest decimal, so 0.29 is 0.29 and not 0.28999999999999998."""
    return Decimal(repr(float(value)))


def _floor(exact: Decimal, exponent: int) -> Decimal:
    return exact.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_FLOOR)


def floor_fixed(value: float, places: int) -> str:
    """`value` with `places` decimals, rounded down: 0.86666 -> '0.866' at 3 places."""
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    return f"{_floor(_exact(value), -places):.{places}f}"


def floor_pct(value: float, places: int = 1) -> str:
    """A fraction as a percentage, rounded down: 26/30 -> '86.6%', 0.9996 -> '99.9%'."""
    if value != value:
        return "nan"
    return f"{_floor(_exact(value) * 100, -places):.{places}f}%"


def floor_sig(value: float, digits: int = 4) -> str:
    """`value` to `digits` significant digits, rounded down: 0.5401744 -> '0.5401'."""
    if value == 0 or value != value or value in (float("inf"), float("-inf")):
        return f"{value:g}"
    exact = _exact(value)
    return f"{float(_floor(exact, exact.adjusted() - digits + 1)):.{digits}g}"


LARGE = 1e6  # from here on a figure is written in significant digits: 1e300 with 4 decimals is 305 characters


def fixed(value: float, places: int = 4) -> str:
    """`value` rounded down to `places` decimals, or to `places` + 2 significant digits where it is huge."""
    return floor_sig(value, places + 2) if abs(value) >= LARGE else floor_fixed(value, places)


def distinct(value: float, other: float, places: int = 4) -> tuple[str, str]:
    """Both numbers rounded down to `places` decimals, or as many more as it takes to tell unequal ones apart."""
    huge = max(abs(value), abs(other)) >= LARGE
    for p in range(places, 18):
        a, b = (floor_sig(value, p + 2), floor_sig(other, p + 2)) if huge else (floor_fixed(value, p), floor_fixed(other, p))
        if a != b or value == other:
            return a, b
    return repr(value), repr(other)


def gate_figures(check) -> tuple[str, str]:
    """A gate check's value and lowest passing value for a table, told apart where they differ."""
    if check.value is None:
        return "n/a", fixed(check.threshold)
    return distinct(check.value, check.threshold)
