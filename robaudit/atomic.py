"""Files written whole or not at all: a temporary file in the same folder, then a rename.

A scan killed while writing (SIGKILL, a dead rank, a full disk) leaves the previous file
or none, never half a report or half a checkpoint chunk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def probe_folder(folder: Path, name: str = "robaudit") -> None:
    """Create and remove a file in `folder` (OSError where none can be written): an unwritable
    output is found before the scan, not after hours of attacks."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", suffix=".check"):
        pass


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(handle)`` on a temporary file beside `path`, flush it to disk, and rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_output(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a user-named output: atomically where `path` is a regular file or new, in place otherwise.

    The rename replaces the folder entry, not the file's contents: a hard link to the old
    file (a model, a dataset) keeps its data. A device or pipe (/dev/stdout) is written to.
    """
    if path.exists() and not path.is_file():
        with path.open("wb") as handle:
            write(handle)
        return
    write_atomic(path, write)
