"""The verdict of one trust check, with its evidence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PASS, WARN, FAIL, SKIPPED = "pass", "warn", "fail", "skipped"
_RANK = {SKIPPED: 0, PASS: 1, WARN: 2, FAIL: 3}


@dataclass
class CheckResult:
    """``verdict``: pass (no sign of trouble), warn (a sign, handled or small), fail (the
    evaluation without adaptation cannot be trusted), skipped (the check does not apply)."""

    name: str
    verdict: str
    summary: str  # one line with the numbers
    evidence: dict[str, Any] = field(default_factory=dict)
    threat: str | None = None  # for checks run once per threat

    @property
    def fired(self) -> bool:
        return self.verdict in (WARN, FAIL)


def overall(checks: list[CheckResult]) -> str:
    """The worst verdict among the checks (pass when none ran)."""
    worst = max((c.verdict for c in checks), key=_RANK.__getitem__, default=PASS)
    return PASS if worst == SKIPPED else worst


def by_count(found: int, attacked: int, fail_share: float) -> str:
    """Verdict for 'an extra attack broke `found` of `attacked` points the battery missed':
    any is a warning; a clear share (and at least two points) is a failure."""
    if found == 0:
        return PASS
    return FAIL if found >= 2 and found >= fail_share * max(1, attacked) else WARN
