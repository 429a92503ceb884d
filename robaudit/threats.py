"""Threat models: a norm and a radius, parsed from strings such as ``linf:8/255``.

One canonical spelling per threat (``linf:0.0313725``) keeps JSON keys, gate
expressions and file names in agreement however the user wrote the radius.

The spatial threat (``spatial:30,3``: rotations up to 30 degrees and translations up
to 3 pixels) is a different threat model, not an Lp ball; it shares the type so the
gate, the report and the CLI treat every threat alike.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from robaudit.errors import RobauditError

if TYPE_CHECKING:  # torch is imported where it is used, so that parsing threats (gate, compare) stays fast
    import torch

NORMS = ("linf", "l2", "l1")
SPATIAL = "spatial"
_NORM_ALIASES = {"linf": "linf", "inf": "linf", "l_inf": "linf", "l2": "l2", "l1": "l1", "spatial": SPATIAL}


@dataclass(frozen=True)
class Threat:
    """An Lp ball of radius ``eps`` around each input, in pixel space.

    For ``norm == "spatial"``, ``eps`` is the largest rotation in degrees and ``shift``
    the largest translation in pixels along each image axis.
    """

    norm: str
    eps: float
    spec: str = ""
    shift: float = 0.0

    @property
    def canonical(self) -> str:
        """The stable name used in reports, JSON keys and gate expressions."""
        if self.norm == SPATIAL:
            return f"{SPATIAL}:{self.eps:.6g},{self.shift:.6g}"
        return f"{self.norm}:{self.eps:.6g}"

    @property
    def is_spatial(self) -> bool:
        return self.norm == SPATIAL

    def __str__(self) -> str:
        return self.canonical

    def same_as(self, other: "Threat") -> bool:
        """Equal norms and radii up to float noise, or the same canonical name (``8/255`` equals ``0.0313725``).

        Reports name threats by `canonical` (6 significant digits), which can be up to
        5e-6 of eps away from the radius scanned: a gate or baseline that names a threat
        as the report prints it must find it. A scan never holds two threats of one name
        (`check_distinct`).
        """
        if self.canonical == other.canonical:
            return True
        return (
            self.norm == other.norm
            and math.isclose(self.eps, other.eps, rel_tol=1e-6, abs_tol=1e-12)
            and math.isclose(self.shift, other.shift, rel_tol=1e-6, abs_tol=1e-12)
        )


def check_distinct(threats: list[Threat]) -> None:
    """Refuse two threats that the report would name alike (their results would share one key)."""
    seen: dict[str, Threat] = {}
    for threat in threats:
        first = seen.setdefault(threat.canonical, threat)
        if first is not threat:
            a, b = first.spec or first.canonical, threat.spec or threat.canonical
            same = "twice" if a == b else f"as {a} and {b}, both named {threat.canonical} in the report (6 significant digits)"
            raise RobauditError(f"threat {threat.canonical} is given {same}; give each threat once")


def parse_number(text: str) -> float:
    """Parse ``0.1``, ``8/255`` or ``1e-2`` into a float; fractions keep users' habits."""
    text = text.strip()
    if not re.fullmatch(r"[0-9A-Za-z.+\-/ ]*", text) or "_" in text:  # float() also reads '٣' and '1_0'
        raise RobauditError(f"'{text}' is not a number (write e.g. 0.1 or 8/255, in ASCII digits)")
    if text.count("/") > 1:  # 8/255/2: left to right or 8/(255/2)? Neither guess is safe
        raise RobauditError(f"'{text}' has more than one '/'; write one fraction, e.g. 4/255")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(Fraction(num.strip()) / Fraction(den.strip()))
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise RobauditError(f"'{text}' is not a number (write e.g. 0.1 or 8/255)") from exc


def parse_threat(text: str) -> Threat:
    """Parse ``NORM:EPS`` (``linf:8/255``, ``l2:0.5``, ``l1:12``) or ``spatial:DEGREES,PIXELS``."""
    if ":" not in text:
        raise RobauditError(f"threat '{text}' must look like NORM:EPS, e.g. linf:8/255 or l2:0.5")
    norm_text, eps_text = text.split(":", 1)
    norm = _NORM_ALIASES.get(norm_text.strip().lower())
    if norm is None:
        raise RobauditError(f"threat '{text}': unknown norm '{norm_text}' (use one of {', '.join(NORMS)} or {SPATIAL})")
    if norm == SPATIAL:
        return _parse_spatial(text, eps_text)
    eps = parse_number(eps_text)
    if not math.isfinite(eps) or eps <= 0:
        raise RobauditError(f"threat '{text}': the radius must be a positive number")
    return Threat(norm=norm, eps=eps, spec=text.strip())


def _parse_spatial(text: str, body: str) -> Threat:
    """``spatial:30,3`` (also ``30deg,3px``): largest rotation in degrees, largest shift in pixels."""
    parts = [p.strip().lower() for p in body.split(",")]
    if len(parts) > 2 or not parts[0]:
        raise RobauditError(f"threat '{text}' must look like spatial:DEGREES,PIXELS, e.g. spatial:30,3")
    rotation = parse_number(parts[0].removesuffix("deg"))
    shift = parse_number(parts[1].removesuffix("px")) if len(parts) == 2 else 0.0
    if not (math.isfinite(rotation) and math.isfinite(shift)) or rotation < 0 or shift < 0 or rotation + shift == 0:
        raise RobauditError(f"threat '{text}': rotation and shift must be non-negative and not both 0")
    if rotation > 180:
        raise RobauditError(f"threat '{text}': rotations beyond 180 degrees repeat; use at most 180")
    return Threat(norm=SPATIAL, eps=rotation, spec=text.strip(), shift=shift)


def perturbation_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of a batch of perturbations, computed in float64 for honest checks."""
    import torch

    flat = delta.detach().flatten(1).to(torch.float64)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    raise ValueError(f"unknown norm {norm}")


def distances(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of x_adv - x, the difference taken in float64: a float32 difference rounds (an
    example 0.04999999993 from x read 0.0500000007 under linf:0.05)."""
    import torch

    return perturbation_norms(x_adv.detach().to(torch.float64) - x.detach().to(torch.float64), norm)


def within_ball(x_adv: torch.Tensor, x: torch.Tensor, threat: Threat) -> torch.Tensor:
    """True where x_adv lies inside the threat's ball around x, exactly (float64, no slack).

    The attacks move their candidates inside before they are checked
    (`attacks.base.within_rounding`), so an example is never counted on a tolerance.
    """
    return distances(x_adv, x, threat.norm) <= threat.eps