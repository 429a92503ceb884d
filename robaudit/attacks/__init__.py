"""Attacks behind one interface, and the runner that executes a battery of them."""

from __future__ import annotations

from robaudit.attacks.base import Attack, AttackContext
from robaudit.attacks.pgd import PGD
from robaudit.attacks.runner import AttackRecord, AttackRun, ThreatOutcome, run_threat, verify_adversarial

# Name -> attack class, for configuration files and flags.
ATTACKS: dict[str, type[Attack]] = {PGD.name: PGD}

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "AttackRecord",
    "AttackRun",
    "PGD",
    "ThreatOutcome",
    "run_threat",
    "verify_adversarial",
]
