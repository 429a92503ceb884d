"""Errors that the CLI turns into one clear line and exit code 2.

Anything the user gave us (a file, a flag, a dataset) that we cannot use raises
`RobauditError`; the message must read as a complete sentence on its own, because it
is all the user sees.
"""

from __future__ import annotations


class RobauditError(Exception):
    """Bad input from the user: printed as `error: <message>` and exit code 2."""
