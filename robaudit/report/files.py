"""Writing report files: one place for the one-line error the CLI shows when a write fails."""

from __future__ import annotations

from pathlib import Path

from robaudit.errors import RobauditError


def write_text(path: Path, text: str, what: str) -> None:
    """Write one output file (UTF-8); the parent folder must exist (the CLI checked it)."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RobauditError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
