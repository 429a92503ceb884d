"""Reading audit TOML files, shared by the battery settings and the gate (kept free of torch imports)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from robaudit.errors import RobauditError


def load_toml(path: Path) -> dict[str, Any]:
    """An audit file's raw tables, with one-line errors for a missing, unreadable or invalid file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RobauditError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RobauditError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RobauditError(f"config file {path} is not valid TOML: {exc}") from None
