"""Report data (schema), and the renderers that read it."""

from __future__ import annotations

from robaudit.report.schema import SCHEMA_VERSION, Report, read_report

__all__ = ["SCHEMA_VERSION", "Report", "read_report"]
