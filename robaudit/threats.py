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

# Float slack for re-verification: a perturbation may exceed eps by this relative amount
# and still count as within the ball (no absolute term: see `within_ball`).
NORM_RTOL = 1e-5


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


def within_ball(delta: torch.Tensor, threat: Threat) -> torch.Tensor:
    """True where a perturbation lies inside the threat's ball, up to a relative `NORM_RTOL` of eps.

    No absolute slack: at eps = 1e-5 an absolute 1e-6 would accept points 10% outside
    the ball (`attacks.base.within_rounding` keeps the attacks' candidates inside).
    """
    limit = threat.eps * (1 + NORM_RTOL)
    return perturbation_norms(delta, threat.norm) <= limit
