"""Progress displays: what the scan is doing now, by stage and attack.

The runner and the stages report through a `ProgressSink` (start a stage, advance, name
the attack now running, finish). In a terminal the CLI draws a rich bar per stage whose
label names the chunk, the stage and the attack; when stderr is not a terminal (a CI
log) it prints one line per finished stage instead, so a long job shows signs of life.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from rich.progress import Progress


class Prefixed:
    """A sink whose labels start with where in the scan it is (e.g. "chunk 2/5")."""

    def __init__(self, inner, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix

    def start(self, description: str, total: int) -> None:
        self.inner.start(f"{self.prefix} · {description}", total)

    def advance(self, amount: int) -> None:
        self.inner.advance(amount)

    def step(self, name: str) -> None:
        step = getattr(self.inner, "step", None)
        if step is not None:
            step(name)

    def finish(self) -> None:
        self.inner.finish()


def prefixed(factory, prefix: str):
    """A progress factory whose sinks label every stage with `prefix` (a chunk, the trust checks)."""
    return lambda: Prefixed(factory(), prefix)


class RichProgress:
    """One rich bar per stage; its label shows the attack now running."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None
        self.description = ""

    def start(self, description: str, total: int) -> None:
        self.description = description
        self.task = self.progress.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, amount)

    def step(self, name: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"{self.description} · {name}")

    def finish(self) -> None:
        if self.task is not None:
            task = self.progress.tasks[self.task]
            self.progress.update(self.task, completed=task.total, description=self.description)


class LineProgress:
    """For logs: one line per finished stage, with its attacks and how long it took."""

    def __init__(self, stream: IO[str] | None = None, started: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.started = started if started is not None else time.monotonic()
        self.description = ""
        self.begun = 0.0
        self.steps: list[str] = []

    def start(self, description: str, total: int) -> None:
        self.description, self.begun, self.steps = description, time.monotonic(), []

    def advance(self, amount: int) -> None:
        pass

    def step(self, name: str) -> None:
        if name not in self.steps:
            self.steps.append(name)

    def finish(self) -> None:
        now = time.monotonic()
        minutes, seconds = divmod(int(now - self.started), 60)
        attacks = f" ({', '.join(self.steps)})" if self.steps else ""
        print(f"[{minutes:d}:{seconds:02d}] {self.description}{attacks}: done in {now - self.begun:.1f} s",
              file=self.stream, flush=True)  # fmt: skip
