"""The report as data: dataclasses that become the JSON file, read back by `robaudit report`.

Every renderer (terminal, JSON, and later JUnit / Markdown / HTML) reads this one
object, so adding a format never touches the pipeline. The layout is documented in
docs/report-schema.md; bump SCHEMA_VERSION on any incompatible change. Everything that
varies between two runs with the same seed lives in ``created`` and ``timing`` only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from robaudit.atomic import write_output
from robaudit.threats import parse_threat
from robaudit.errors import RobauditError
from robaudit.report.numbers import distinct

SCHEMA_VERSION = "1.6"


@dataclass
class ModelInfo:
    path: str
    format: str
    sha256: str
    input_shape: list[int] | None
    num_classes: int
    output_kind: str = "logits"
    batching: str = "batched"
    mean: list[float] | None = None
    std: list[float] | None = None
    input_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    notes: list[str] = field(default_factory=list)


@dataclass
class DataInfo:
    name: str
    n: int
    seed: int
    indices: list[int]
    source_size: int
    sample_shape: list[int]
    notes: list[str] = field(default_factory=list)
    sha256: str | None = None  # of the audited samples' float32 pixels in the order of `indices` (1.5)
    files: list[str] | None = None  # image folders: each audited sample's file, in the order of `indices`


@dataclass
class AttackSummary:
    """One attack's share of a threat's result: what it broke and what it cost."""

    name: str
    params: dict[str, Any]
    restarts: int
    attempted: int
    broke: int
    robust_accuracy_after: float
    forward_passes: int
    backward_passes: int
    skipped: str | None = None


@dataclass
class ThreatSummary:
    threat: str
    norm: str
    eps: float
    robust_accuracy: float
    attacks: dict[str, float]
    attack_details: list[AttackSummary] = field(default_factory=list)
    forward_passes_per_sample: float = 0.0
    backward_passes_per_sample: float = 0.0
    spec: str = ""
    per_class: dict[str, float] = field(default_factory=dict)
    shift: float = 0.0  # spatial threats: largest translation in pixels (eps is the largest rotation in degrees)


@dataclass
class MinimalNormSummary:
    """The minimal-norm stage of one norm: run once, shared by every threat of that norm."""

    norm: str
    attack_details: list[AttackSummary]
    forward_passes_per_sample: float = 0.0
    backward_passes_per_sample: float = 0.0


@dataclass
class Curve:
    """Robust accuracy against radius from verified minimal-norm and fixed-radius results."""

    norm: str
    eps: list[float]
    robust_accuracy: list[float]
    median_distance: float | None
    attacks: list[str]


@dataclass
class CertificateSummary:
    """Certified L2 radii (lower bounds that no attack can break), or why there are none."""

    available: bool
    reason: str | None = None  # "certificate unavailable: <layer>" or why it was skipped
    budget: str = "default"
    certified_accuracy: dict[str, float] = field(default_factory=dict)  # per L2 threat: radius >= eps
    radius_quantiles: dict[str, float] = field(default_factory=dict)  # over correctly classified samples
    median_ratio: float | None = None  # median certified / smallest adversarial L2 distance found
    ratio_samples: int = 0
    methods: dict[str, int] = field(default_factory=dict)  # which bound gave each sample's radius
    notes: list[str] = field(default_factory=list)


@dataclass
class Summary:
    clean_accuracy: float
    threats: list[ThreatSummary]
    minimal_norm: list[MinimalNormSummary] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    forward_passes_per_sample: float = 0.0
    backward_passes_per_sample: float = 0.0
    certificate: CertificateSummary | None = None
    indicator: dict[str, Any] | None = None  # decision-surface indicator (docs/indicator.md): score, parts, formula
    diagnostics: dict[str, Any] | None = None  # trust checks (docs/trust.md): verdict, checks with evidence, adaptations


@dataclass
class SampleThreat:
    robust: bool
    broken_by: str | None
    distance: float | None
    transform: dict[str, float] | None = None  # spatial threats: the verified rotation (degrees) and shift (pixels)


@dataclass
class SampleRecord:
    index: int
    label: int
    clean_pred: int
    threats: dict[str, SampleThreat]
    adversarial_l2: float | None = None  # L2 size of the closest verified adversarial example of any threat
    certified_l2: float | None = None
    certified_method: str | None = None
    indicator: dict[str, Any] | None = None  # this sample's decision surface: g, Jacobian, Hessian, predicted drops


@dataclass
class GateCheck:
    """One gate check: ``value >= threshold`` passes.

    ``kind`` is ``minimum`` (``--fail-under``, ``[gate.min]``), or ``max_drop_absolute`` /
    ``max_drop_relative`` (``--max-drop``, ``[gate.max_drop]`` against a baseline report):
    then ``threshold`` is the lowest value the drop allows, worked out from ``baseline``
    and ``allowed_drop`` (an absolute amount, or a fraction of the baseline value), or
    ``strict`` (``--strict``): ``value`` is the number of failed trust checks, which must be 0.
    ``value`` is ``None`` when the report has no such metric (the check fails).
    """

    expression: str
    metric: str
    threshold: float
    value: float | None
    passed: bool
    kind: str = "minimum"
    baseline: float | None = None
    allowed_drop: float | None = None
    message: str = ""

    def describe(self) -> str:
        """One sentence saying what was checked and how it came out."""
        if self.message:
            return self.message
        if self.value is None:
            return f"{self.metric} is not in the report ({self.expression})"
        relation = ">=" if self.passed else "is below"
        value, threshold = distinct(self.value, self.threshold)
        return f"{self.metric} = {value} {relation} {threshold} ({self.expression})"


@dataclass
class Report:
    schema_version: str
    robaudit_version: str
    created: str
    model: ModelInfo
    data: DataInfo
    config: dict[str, Any]
    environment: dict[str, str]
    summary: Summary
    samples: list[SampleRecord]
    timing: dict[str, Any] = field(default_factory=dict)
    gate: list[GateCheck] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # image files written by --plots

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: Path | str) -> None:
        """Write the report; the parent folder must exist (we never create the user's folders silently)."""
        path = Path(path)
        try:
            text = (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")
            write_output(path, lambda handle: handle.write(text))  # a FIFO or device (/dev/stdout) is written through
        except OSError as exc:
            raise RobauditError(f"cannot write report {path}: {exc.strerror or exc}") from exc

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Report":
        """The report a JSON object describes; keys a later minor version added are left out.

        Raises KeyError, TypeError or ValueError where a key is missing or holds a value of
        another type than the schema's (`read_report` turns that into a one-line error).
        """
        return _build(cls, raw, "")


def read_report(path: Path) -> Report:
    """Load a JSON report written by `robaudit scan --json`, with a clear error for anything else."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RobauditError(f"report {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RobauditError(f"cannot read report {path}: not a JSON file ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or "schema_version" not in raw:
        raise RobauditError(f"{path} is not a robaudit report (no schema_version)")
    major = str(raw["schema_version"]).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise RobauditError(
            f"{path} uses report schema {raw['schema_version']}; this robaudit reads {SCHEMA_VERSION}"
        )
    try:
        report = Report.from_dict(raw)
    except KeyError as exc:
        raise RobauditError(f"{path} is not a valid robaudit report (key {exc} is missing)") from None
    except (TypeError, ValueError) as exc:
        raise RobauditError(f"{path} is not a valid robaudit report ({exc})") from None
    problem = inconsistency(report)
    if problem:
        raise RobauditError(f"{path} is not a robaudit report as robaudit wrote it: {problem}")
    return report


# --------------------------------------------------------------------------- reading: types and consistency


def _build(kind: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as an instance of the annotation `kind`, checking every type on the way."""
    if kind is Any:
        return value
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None:
            if type(None) in options:
                return None
            raise TypeError(f"{where or 'the report'} is null")
        return _build(next(o for o in options if o is not type(None)), value, where)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise TypeError(f"{where or 'the report'} is {type(value).__name__}, not an object")
        hints = typing.get_type_hints(kind)
        known = {f.name: f for f in dataclasses.fields(kind)}
        missing = [name for name, f in known.items() if name not in value and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # fmt: skip
        if missing:
            raise KeyError(f"{where}.{missing[0]}".lstrip("."))
        return kind(**{k: _build(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in value.items() if k in known})
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where} is {type(value).__name__}, not a list")
        (item,) = typing.get_args(kind)
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} is {type(value).__name__}, not an object")
        _, item = typing.get_args(kind)
        return {k: _build(item, v, f"{where}.{k}") for k, v in value.items()}
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} is {type(value).__name__} {value!r:.40}, not a number")
        return float(value)
    if kind in (int, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"{where} is {type(value).__name__} {value!r:.40}, not {kind.__name__}")
        return value
    raise TypeError(f"{where}: unsupported annotation {kind}")  # pragma: no cover - the schema's own types


def _fraction(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


def is_number(value: Any) -> bool:
    """An int or float from parsed JSON or TOML (a bool is neither here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _indicator_problem(ind: dict[str, Any] | None, where: str) -> str | None:
    """The indicator block is free-form JSON in the schema; the renderers read these fields as typed."""
    if ind is None:
        return None
    for key in ("score", "curvature_scale", "seconds", "zero_threshold", "forwards_per_sample", "backwards_per_sample"):
        if ind.get(key) is not None and not is_number(ind[key]):
            return f"{where}.{key} is {ind[key]!r:.40}, not a number"
    parts = ind.get("parts", {})
    if not isinstance(parts, dict) or any(not is_number(v) for v in parts.values()):
        return f"{where}.parts must map names to numbers"
    notes = ind.get("notes", [])
    if not isinstance(notes, list) or any(not isinstance(n, str) for n in notes):
        return f"{where}.notes must be a list of strings"
    if not isinstance(ind.get("masking_suspected", False), bool):
        return f"{where}.masking_suspected must be true or false"
    return None


def _diagnostics_problem(diag: dict[str, Any] | None) -> str | None:
    if diag is None:
        return None
    checks = diag.get("checks", [])
    if not isinstance(checks, list) or any(
        not isinstance(c, dict) or not all(isinstance(c.get(k), str) for k in ("name", "verdict", "summary")) for c in checks
    ):  # fmt: skip
        return "summary.diagnostics.checks must be a list of checks with a name, a verdict and a summary"
    for key in ("verdict", "note"):
        if diag.get(key) is not None and not isinstance(diag[key], str):
            return f"summary.diagnostics.{key} must be a string"
    if not isinstance(diag.get("adaptations", []), list) or not isinstance(diag.get("white_box_robust_accuracy", {}), dict):
        return "summary.diagnostics: adaptations must be a list and white_box_robust_accuracy an object"
    return None


CERTIFIED_METHODS = ("linear", "closed-form", "interval", "global-lipschitz", "crown", "none")  # certify.METHODS, "none"


def _certificate_problem(report: Report) -> str | None:
    """What the certificate's figures say that its samples contradict, or None.

    A radius is a finite number >= 0, 0 for a misclassified sample, never above the
    sample's closest adversarial example (that would be a broken certificate), from a
    known method; certified accuracies are of L2 threats and are the samples' own; the
    method counts are those of the correctly classified samples; an unavailable (or
    absent) certificate gives no figures.
    """
    cert, samples = report.summary.certificate, report.samples
    if cert is None or not cert.available:
        if any(r.certified_l2 is not None or r.certified_method is not None for r in samples):
            return "samples carry certified radii, but the summary has no certificate"
        if cert is not None and (cert.certified_accuracy or cert.radius_quantiles or cert.methods or cert.median_ratio is not None):
            return "summary.certificate is unavailable but gives figures"
        return None
    for r in samples:
        radius = r.certified_l2
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not (math.isfinite(radius) and radius >= 0):
            return f"sample {r.index}: certified_l2 {radius!r} is not a radius (a finite number >= 0)"
        if r.certified_method not in CERTIFIED_METHODS:
            return f"sample {r.index}: certified_method {r.certified_method!r} is none of {', '.join(CERTIFIED_METHODS)}"
        if r.clean_pred != r.label and radius != 0:
            return f"sample {r.index} is misclassified but has certified radius {radius!r}"
        if r.adversarial_l2 is not None and radius > r.adversarial_l2 * (1 + 1e-9):
            return f"sample {r.index}: certified radius {radius!r} exceeds its adversarial example's distance {r.adversarial_l2!r}"
    n = len(samples)
    for key, value in cert.certified_accuracy.items():
        try:
            threat = parse_threat(key)
        except Exception:  # noqa: BLE001 - RobauditError: not a threat at all
            threat = None
        if threat is None or threat.norm != "l2":
            return f"summary.certificate.certified_accuracy has {key!r}, not an L2 threat"
        # the key spells eps to 6 digits: count the radii at eps give or take that much
        most = sum(r.certified_l2 >= threat.eps * (1 - 1e-6) for r in samples)
        least = sum(r.certified_l2 >= threat.eps * (1 + 1e-6) for r in samples)
        if n and not least - 1e-6 <= value * n <= most + 1e-6:
            return f"certified_accuracy[{key}] {value!r} differs from its samples' {least / n!r}"
    counts: dict[str, int] = {}
    for r in samples:
        if r.clean_pred == r.label:
            counts[r.certified_method] = counts.get(r.certified_method, 0) + 1
    if counts != dict(cert.methods):
        return f"summary.certificate.methods {dict(cert.methods)!r} differs from its samples' {counts!r}"
    return None


def inconsistency(report: Report) -> str | None:
    """What a hand-edited or corrupted report says that a scan could not have written, or None.

    Fractions lie in [0, 1]; the summary's accuracies are those of its own samples; each
    gate check's verdict is the one its value and threshold give.
    """
    s = report.summary
    fractions = {"clean_accuracy": s.clean_accuracy}
    for t in s.threats:
        fractions[f"robust_accuracy[{t.threat}]"] = t.robust_accuracy
        fractions.update({f"per_class[{t.threat}][{c}]": v for c, v in t.per_class.items()})
    if s.certificate is not None:
        fractions.update({f"certified_accuracy[{k}]": v for k, v in s.certificate.certified_accuracy.items()})
    for c in s.curves:
        fractions.update({f"curve[{c.norm}]": v for v in c.robust_accuracy})
    bad = next((name for name, v in fractions.items() if not _fraction(v)), None)
    if bad is not None:
        return f"{bad} = {fractions[bad]!r} is not a fraction in [0, 1]"
    untyped = _indicator_problem(s.indicator, "summary.indicator") or _diagnostics_problem(s.diagnostics)
    if untyped:
        return untyped
    n = len(report.samples)
    if n != report.data.n or len(report.data.indices) != n:
        return f"data.n is {report.data.n} with {len(report.data.indices)} indices, but there are {n} samples"
    if len(set(report.data.indices)) != n or [r.index for r in report.samples] != report.data.indices:
        return "the samples' indices are not data.indices, each once, in order"
    if n:
        clean = sum(r.clean_pred == r.label for r in report.samples) / n
        if abs(clean - s.clean_accuracy) > 1e-9:
            return f"clean_accuracy {s.clean_accuracy!r} differs from its samples' {clean!r}"
        for t in s.threats:
            entries = [r.threats.get(t.threat) for r in report.samples]
            if any(e is None for e in entries):
                return f"a sample has no result for threat {t.threat}"
            robust = sum(bool(e.robust) for e in entries if e is not None) / n
            if abs(robust - t.robust_accuracy) > 1e-9:
                return f"robust_accuracy[{t.threat}] {t.robust_accuracy!r} differs from its samples' {robust!r}"
    problem = _certificate_problem(report)
    if problem:
        return problem
    for check in report.gate:
        if check.kind in ("minimum", "max_drop_absolute", "max_drop_relative"):
            holds = check.value is not None and math.isfinite(check.value) and check.value >= check.threshold
            if holds != check.passed:
                return f"gate check {check.expression!r} says passed={check.passed} for value {check.value!r} and threshold {check.threshold!r}"
    return None
