"""How many CPU threads torch may use for a scan (``--threads``).

The default is the cores this process may run on (its affinity mask, which container
CPU limits, ``taskset`` and batch schedulers set), not the machine's core count:
more intra-op threads than usable cores make torch's OpenMP workers wait on each
other, which on a busy machine turned seconds into minutes (docs/benchmarks.md,
"Threads and CPU contention").
"""

from __future__ import annotations

import os
import sys

from robaudit.errors import RobauditError

# torch is imported inside the functions: `quiet_openmp` must run before torch loads.


def quiet_openmp() -> bool:
    """Make idle OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``); True if in time.

    OpenMP reads the setting once, when torch loads it, so this must run before the first
    ``import torch`` (the CLI's entry point calls it first). Spinning threads steal the
    cores that the working threads and other processes need on a busy machine. A value
    the user set is kept.
    """
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def default_threads() -> int:
    """The cores this process may use: its affinity mask where the OS has one, else the core count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def apply_threads(requested: int | None) -> int:
    """Set torch's intra-op (and, while still allowed, inter-op) thread count; return the count used.

    ``None`` means `default_threads()`. A count below 1 is a user error.
    """
    import torch

    if requested is not None and requested < 1:
        raise RobauditError(f"--threads must be at least 1, not {requested}")
    count = default_threads() if requested is None else int(requested)
    torch.set_num_threads(count)
    _set_interop(count)
    return count


def _set_interop(count: int) -> None:
    """Inter-op threads can only be set before torch's first parallel work; later it raises
    RuntimeError, which is harmless (the scan runs no inter-op parallel work)."""
    import torch

    if torch.get_num_interop_threads() == count:
        return
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:
        pass
