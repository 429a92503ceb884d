"""Trust checks: could the attacks have worked on this model at all?

One function per check (``../docs/trust.md``), each returning a `CheckResult` with a
verdict and the numbers behind it. `robaudit.stages.trust` runs them in the scan and
turns their findings into adaptations (EOT, surrogate, score- and decision-based attacks).
"""

from robaudit.checks.verdict import FAIL, PASS, SKIPPED, WARN, CheckResult, overall

__all__ = ["CheckResult", "FAIL", "PASS", "SKIPPED", "WARN", "overall"]
