"""Batch sizes that back off on CUDA out-of-memory instead of crashing the scan.

The default batch size (1024 on CUDA) fits small models but not a large one on a small
GPU. `AdaptiveBatch` halves the size whenever a chunk runs out of GPU memory and runs
that chunk again from the state it started in, so a chunk's result is exactly what it
would have been had the scan started at the smaller size; the size stays reduced for
the rest of the scan (one `AdaptiveBatch` per scan) and `note` says so in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from robaudit.errors import RobauditError

T = TypeVar("T")

# torch.OutOfMemoryError (torch >= 2.5) is the base of torch.cuda.OutOfMemoryError; both are named for older torches.
OUT_OF_MEMORY: tuple[type[BaseException], ...] = tuple(
    {torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)}
)

Restore = Callable[[], None]


class AdaptiveBatch:
    """The scan's batch size: starts at `size`, halves on each out-of-memory, never grows back."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise RobauditError(f"--batch-size must be at least 1, not {size}")
        self.initial = int(size)
        self.size = int(size)

    @property
    def note(self) -> str | None:
        """For the report's notes: set once the size was reduced."""
        if self.size == self.initial:
            return None
        return f"batch size reduced from {self.initial} to {self.size} after CUDA out-of-memory"

    def shrink(self, failed: int, reason: str) -> None:
        """Halve until below the size of the chunk that failed (a short last chunk can fail
        too); at 1 there is nothing left to try."""
        _free_cuda_cache()
        if failed <= 1:
            raise RobauditError(
                "out of GPU memory even at batch size 1: the model does not fit on this GPU "
                f"(use --device cpu or a GPU with more memory; CUDA said: {reason})"
            )
        while self.size >= failed:
            self.size //= 2

    def run(self, total: int, fn: Callable[[int, int], T], checkpoint: Callable[[], Restore] | None = None) -> list[T]:
        """``fn(start, stop)`` over ``range(total)`` in chunks of the current size; the results in order.

        `checkpoint()` is called before each chunk and returns a function that puts back
        the state the chunk starts from (random generators, pass counters); it runs before
        a failed chunk is tried again. `fn` must not change other state before its last
        model call.
        """
        results: list[T] = []
        start = 0
        while start < total:
            stop = min(total, start + self.size)
            restore = checkpoint() if checkpoint is not None else None
            failure = None
            try:
                results.append(fn(start, stop))
            except OUT_OF_MEMORY as error:
                # keep only the message: the traceback's frames hold the chunk's tensors, which
                # must be released before the cache is emptied
                failure = _first_line(error)
            if failure is None:
                start = stop
                continue
            if restore is not None:
                restore()
            self.shrink(stop - start, failure)
        return results


def as_batch(batch_size: int | AdaptiveBatch) -> AdaptiveBatch:
    """The scan's shared `AdaptiveBatch`, or a fresh one for a plain size (library callers)."""
    return batch_size if isinstance(batch_size, AdaptiveBatch) else AdaptiveBatch(batch_size)


def rng_checkpoint(*generators: torch.Generator) -> Restore:
    """Save the given generators and torch's global ones (CPU, and CUDA once in use); return the restore."""
    saved = [(g, g.get_state()) for g in generators]
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore() -> None:
        for g, state in saved:
            g.set_state(state)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return restore


def _free_cuda_cache() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
