"""Attacks behind one interface, and the runner that executes a battery of them.

The name -> attack registry that configuration files use is `robaudit.battery`.
"""

from __future__ import annotations

from robaudit.attacks.base import Attack, AttackContext
from robaudit.attacks.pgd import PGD
from robaudit.attacks.runner import (
    AttackRecord,
    AttackRun,
    MinimalOutcome,
    ThreatOutcome,
    run_minimal,
    run_threat,
    verify_adversarial,
)

__all__ = [
    "Attack",
    "AttackContext",
    "AttackRecord",
    "AttackRun",
    "MinimalOutcome",
    "PGD",
    "ThreatOutcome",
    "run_minimal",
    "run_threat",
    "verify_adversarial",
]
