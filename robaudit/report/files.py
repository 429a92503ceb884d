"""Writing report files: one place for the one-line error the CLI shows when a write fails."""

from __future__ import annotations

from pathlib import Path

from robaudit.atomic import write_output
from robaudit.errors import RobauditError


def write_text(path: Path, text: str, what: str) -> None:
    """Write one output file (UTF-8); the parent folder must exist (the CLI checked it)."""
    try:
        write_output(path, lambda handle: handle.write(text.encode("utf-8")))
    except OSError as exc:
        raise RobauditError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
