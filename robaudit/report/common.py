"""What the terminal, Markdown and HTML renderers say alike: the verdict, threat names, counts, the curve's caveat.

Reads the Report only, so `robaudit report report.json` says exactly what `scan` said.
"""

from __future__ import annotations

from dataclasses import dataclass

from robaudit.report.schema import CertificateSummary, Curve, Report


def count(value: int | float) -> str:
    """A count with thousands separators: 316316 -> 316,316."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def per_sample(value: float) -> str:
    """Passes per sample, one decimal, with thousands separators: 7908.25 -> 7,908.2."""
    return f"{value:,.1f}"


def duration(seconds: float) -> str:
    """12.3 s, 2 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def total_seconds(report: Report) -> float | None:
    total = report.timing.get("total_s")
    return float(total) if isinstance(total, (int, float)) else None


def certificate_methods(cert: CertificateSummary) -> str:
    """Which bound gave how many radii ("interval 12, crown 18"), as every renderer shows it."""
    return ", ".join(f"{k} {v}" for k, v in cert.methods.items()) or "-"


def threat_names(report: Report) -> dict[str, str]:
    """Canonical threat name -> the form the user wrote (``linf:0.0313725`` -> ``linf:8/255``)."""
    return {t.threat: (t.spec or t.threat) for t in report.summary.threats}


def threat_name(report: Report, canonical: str | None) -> str:
    """The user's form of a threat, for a canonical name found anywhere in the report."""
    if not canonical:
        return ""
    return threat_names(report).get(canonical, canonical)


def with_threat_names(report: Report, text: str) -> str:
    """``predicted_robust_accuracy[linf:0.0313725]`` -> ``predicted_robust_accuracy[linf:8/255]``."""
    for canonical, shown in threat_names(report).items():
        text = text.replace(f"[{canonical}]", f"[{shown}]")
    return text


def canonical_aside(report: Report, canonical: str) -> str:
    """The canonical name when it differs from the user's form (gate messages use it), else ''."""
    return canonical if threat_name(report, canonical) != canonical else ""


@dataclass
class Unproven:
    """Samples a curve counts as robust at every radius only because no attack broke them."""

    norm: str
    count: int  # correctly classified, no verified adversarial example of this norm at any radius
    n: int  # samples in the scan (the curve's denominator)

    @property
    def fraction(self) -> float:
        return self.count / self.n if self.n else 0.0

    def sentence(self) -> str:
        return (
            f"{self.count} of {self.n} samples ({100 * self.fraction:.1f}%): minimal-norm attack found nothing at any "
            f"{self.norm} radius (not proven robust); the curve counts them as robust at every radius, so read it as "
            "an upper bound"
        )


def unproven(report: Report, curve: Curve) -> Unproven:
    """Correctly classified samples with no verified adversarial example of the curve's norm.

    From the per-sample records: under every threat of that norm the sample is robust and
    its ``distance`` (the smallest verified perturbation found) is None. Without sample
    records, the curve's last point says the same: the grid ends at or beyond every finite
    distance found, so what stays robust there was never broken.
    """
    n = report.data.n or len(report.samples)
    names = [t.threat for t in report.summary.threats if t.norm == curve.norm]
    if report.samples and names:
        found = 0
        for s in report.samples:
            if s.clean_pred != s.label:
                continue
            entries = [s.threats.get(name) for name in names]
            if all(e is not None and e.robust and e.distance is None for e in entries):
                found += 1
        return Unproven(curve.norm, found, len(report.samples))
    last = curve.robust_accuracy[-1] if curve.robust_accuracy else 0.0
    return Unproven(curve.norm, round(last * n), n)


def unproven_fractions(report: Report) -> dict[str, float]:
    """Norm -> fraction of samples the curve keeps robust at every radius (for the PNG)."""
    return {c.norm: unproven(report, c).fraction for c in report.summary.curves}


@dataclass
class Verdict:
    level: str  # "pass", "warn", "fail" or "none" (no gate checks and nothing to warn about)
    headline: str  # "FAIL: 1 of 3 gate checks failed"
    advice: str = ""


def verdict(report: Report) -> Verdict:
    """One line for the end of a scan: the gate's outcome, or a warning from the trust checks."""
    checks = report.gate
    missed = sum(not c.passed for c in checks)
    diag = report.summary.diagnostics or {}
    trust = diag.get("verdict")
    plural = "s" if len(checks) != 1 else ""
    if missed:
        return Verdict(
            "fail", f"FAIL: {missed} of {len(checks)} gate check{plural} failed",
            "the exit code is 1; the gate panel above says which check and by how much",
        )  # fmt: skip
    if trust in ("warn", "fail"):
        gate = f"{'the' if len(checks) == 1 else 'all'} {len(checks)} gate check{plural} passed, but " if checks else ""
        word = "failed" if trust == "fail" else "warned"
        return Verdict(
            "warn", f"WARN: {gate}trust checks {word} (see Trust checks above)",
            "the attacks may not have worked on this model, so robust accuracy may be too high; read each check's "
            "evidence, docs/trust.md says what to do" + ("; --strict makes a failed check fail the gate" if trust == "fail" else ""),
        )  # fmt: skip
    if checks:
        return Verdict("pass", f"PASS: {'the' if len(checks) == 1 else 'all'} {len(checks)} gate check{plural} passed")
    return Verdict("none", "DONE: no gate checks", "add --fail-under METRIC=MIN (or a [gate] table) to make the exit code gate CI")
