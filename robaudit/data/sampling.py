"""Stratified sampling, so a small audit sample keeps the class balance of the source.

It uses its own seeded numpy Generator (never the global RNG), so the same seed gives
the same indices on every machine and run, whatever else touched the RNGs.
"""

from __future__ import annotations

import numpy as np

from robaudit.errors import RobauditError


def allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Per-class sample sizes proportional to `counts`, rounded by largest remainder.

    Integer arithmetic keeps it exact; ties in the remainder go to the smaller class
    index so that the allocation itself is deterministic.
    """
    total = int(counts.sum())
    base = n * counts // total
    remainder = n * counts % total
    short = n - int(base.sum())
    order = np.lexsort((np.arange(len(counts)), -remainder))
    base[order[:short]] += 1
    return base


def stratified_indices(y: np.ndarray, n: int, seed: int) -> list[int]:
    """Sorted indices of a stratified sample of `n` from labels `y` (all if n >= len(y))."""
    total = len(y)
    if n >= total:
        return list(range(total))
    if seed < 0:
        raise RobauditError(f"the seed must be a non-negative integer, got {seed}.")
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    sizes = allocate(counts.astype(np.int64), n)
    rng = np.random.default_rng(seed)
    # Group sample positions by class once (stable, so members stay in source order).
    groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    chosen = [rng.choice(members, size=int(size), replace=False)
              for members, size in zip(groups, sizes, strict=True) if size]
    return sorted(int(i) for i in np.concatenate(chosen))
