"""JUnit XML: one test case per gate check, for GitLab, Jenkins and other CI test views.

The file satisfies both common JUnit schemas: the Ant / Windy Road one (every testsuite
has ``properties``, ``system-out`` and ``system-err``, every testcase ``classname`` and
``time``, ``failure`` a ``type``; the suites inside ``testsuites`` carry ``id`` and
``package``; the timestamp has no time zone) and the Jenkins one (which adds
``skipped`` and the totals on ``testsuites``; we leave those out because Ant's has no
such attributes). Test case names do not contain measured values, so CI tools can track
each check from run to run.
"""

from __future__ import annotations

import platform
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from robaudit.report.common import certificate_methods
from robaudit.report.files import write_text
from robaudit.report.numbers import fixed, floor_pct
from robaudit.report.schema import GateCheck, Report

_KIND_CLASS = {
    "minimum": "robaudit.gate.minimum",
    "max_drop_absolute": "robaudit.gate.max_drop",
    "max_drop_relative": "robaudit.gate.max_drop",
    "strict": "robaudit.gate.strict",
}
# Characters that XML 1.0 cannot hold at all (ElementTree would write them and break the file).
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: str) -> str:
    return _INVALID_XML.sub("?", text)


def _timestamp(created: str | None) -> str:
    """ISO 8601 without time zone and fractions (the Ant schema's pattern)."""
    try:
        when = datetime.fromisoformat(created) if created else datetime.now()
    except ValueError:
        when = datetime.now()
    return when.strftime("%Y-%m-%dT%H:%M:%S")


def case_name(check: GateCheck) -> str:
    """A stable name: the rule, never the measured value."""
    if check.kind == "minimum":
        return f"{check.metric} >= {check.threshold:g}"
    if check.kind == "strict":
        return "every trust check passes or warns (--strict)"
    if check.kind == "max_drop_relative" and check.allowed_drop is not None:
        return f"{check.metric} drops at most {100 * check.allowed_drop:g}% from the baseline"
    if check.allowed_drop is not None:
        return f"{check.metric} drops at most {check.allowed_drop:g} from the baseline"
    return check.metric


def _failure_text(check: GateCheck) -> str:
    lines = [check.describe(), f"rule: {check.expression} ({check.kind})"]
    if check.value is not None:
        lines.append(f"value: {check.value!r}")
    if check.kind != "strict":
        lines.append(f"lowest passing value: {check.threshold!r}")
    if check.baseline is not None:
        lines.append(f"baseline: {check.baseline!r}")
    return "\n".join(lines)


def checks_to_xml(
    checks: Sequence[GateCheck],
    *,
    suite: str,
    properties: dict[str, str],
    system_out: str,
    created: str | None = None,
    seconds: float = 0.0,
) -> str:
    """A JUnit document with one testsuite holding one testcase per check."""
    failures = sum(1 for c in checks if not c.passed and c.value is not None)
    errors = sum(1 for c in checks if not c.passed and c.value is None)
    root = ET.Element("testsuites")
    node = ET.SubElement(
        root,
        "testsuite",
        {
            "name": _clean(suite),
            "tests": str(len(checks)),
            "failures": str(failures),
            "errors": str(errors),
            "time": f"{max(seconds, 0.0):.3f}",
            "timestamp": _timestamp(created),
            "hostname": _clean(platform.node() or "localhost"),
            "id": "0",
            "package": "robaudit",
        },
    )
    props = ET.SubElement(node, "properties")
    for key, value in properties.items():
        ET.SubElement(props, "property", {"name": _clean(key), "value": _clean(str(value))})
    for check in checks:
        case = ET.SubElement(
            node, "testcase", {"name": _clean(case_name(check)), "classname": _KIND_CLASS.get(check.kind, "robaudit.gate"), "time": "0"}
        )
        if not check.passed:
            # A metric the report does not have is an error (the check could not run), a missed one a failure.
            tag, kind = ("failure", "robaudit.GateFailed") if check.value is not None else ("error", "robaudit.MetricMissing")
            element = ET.SubElement(case, tag, {"message": _clean(check.describe()), "type": kind})
            element.text = _clean(_failure_text(check))
    ET.SubElement(node, "system-out").text = _clean(system_out)
    ET.SubElement(node, "system-err").text = ""
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def report_properties(report: Report) -> dict[str, str]:
    """The headline figures, as JUnit properties (shown by Jenkins, kept by GitLab)."""
    s = report.summary
    props = {
        "robaudit_version": report.robaudit_version,
        "model": report.model.path,
        "model_sha256": report.model.sha256,
        "data": report.data.name,
        "n": str(report.data.n),
        "seed": str(report.data.seed),
        "device": report.environment.get("device", ""),
        "clean_accuracy": repr(float(s.clean_accuracy)),
    }
    for t in s.threats:
        props[f"robust_accuracy[{t.threat}]"] = repr(float(t.robust_accuracy))
    if s.certificate is not None and s.certificate.available:
        for key, value in s.certificate.certified_accuracy.items():
            props[f"certified_accuracy[{key}]"] = repr(float(value))
    if s.indicator and isinstance(s.indicator.get("score"), (int, float)):
        props["indicator_score"] = repr(float(s.indicator["score"]))
    if s.diagnostics:
        props["trust_verdict"] = s.diagnostics["verdict"]
        for c in s.diagnostics["checks"]:
            props[f"trust[{c['name']}" + (f"@{c['threat']}]" if c["threat"] else "]")] = c["verdict"]
    return props


def _summary_text(report: Report) -> str:
    s = report.summary
    lines = [f"model {report.model.path} ({report.model.format}), data {report.data.name}: {report.data.n} samples, seed {report.data.seed}"]
    lines.append(f"clean accuracy {floor_pct(s.clean_accuracy)}")
    lines += [f"robust accuracy {t.threat}: {floor_pct(t.robust_accuracy)}" for t in s.threats]
    if s.certificate is not None:
        cert = s.certificate
        if cert.available:
            lines += [f"certified accuracy {k}: {floor_pct(v)}" for k, v in cert.certified_accuracy.items()]
            lines.append(f"certificate budget {cert.budget}; method that gave the radius: {certificate_methods(cert)}")
            lines += [f"  note: {n}" for n in cert.notes]  # the certificate's caveats, as every renderer shows them
        else:
            lines.append(f"certificate: {cert.reason}")
    if s.indicator and "score" in s.indicator:
        lines.append(f"indicator score {fixed(s.indicator['score'], 3)}")
    if s.diagnostics:
        lines.append(f"trust checks: {s.diagnostics['verdict']}")
        lines += [f"  {c['verdict'].upper()} {c['name']}" + (f" [{c['threat']}]" if c["threat"] else "") + f": {c['summary']}" for c in s.diagnostics["checks"]]
        lines += [f"  adapted: {a}" for a in s.diagnostics["adaptations"]]
        if s.diagnostics.get("note"):
            lines.append(f"  note: {s.diagnostics['note']}")
    lines += [("PASS " if c.passed else "FAIL ") + c.describe() for c in report.gate]
    return "\n".join(lines)


def render_junit(report: Report) -> str:
    """The gate of a report as JUnit XML (a report without gate checks gives an empty suite)."""
    return checks_to_xml(
        report.gate,
        suite=f"robaudit gate: {Path(report.model.path).name} on {Path(report.data.name).name}",
        properties=report_properties(report),
        system_out=_summary_text(report),
        created=report.created,
        seconds=float(report.timing.get("total_s") or 0.0),
    )


def write_junit(report: Report, path: Path) -> None:
    write_text(path, render_junit(report), "JUnit file")
