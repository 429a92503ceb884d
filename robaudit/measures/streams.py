"""Random draws per sample: what a sample draws does not depend on the batch it shares.

The indicator draws random start vectors, directions and probes for a batch at a time.
From one generator, a sample's draws would depend on which samples come before it in
its batch, so its values, and the indicator score a CI gate checks, would change with
`--batch-size`. Each sample gets its own generator instead, seeded by the scan's seed
and the sample's position.
"""

from __future__ import annotations

import numpy as np
import torch

class SampleStreams:
    """One torch.Generator per sample (row) of a batch."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    @classmethod
    def for_samples(cls, seed: int, first: int, count: int) -> SampleStreams:
        """Streams of samples `first` .. `first + count - 1` under `seed`."""
        states = [np.random.SeedSequence([int(seed), first + i]).generate_state(1, np.uint64)[0] for i in range(count)]
        return cls([torch.Generator().manual_seed(int(s) & (2**63 - 1)) for s in states])

    def rows(self, mask: torch.Tensor) -> SampleStreams:
        """The streams of the rows where `mask` holds."""
        return SampleStreams([g for g, keep in zip(self.generators, mask.tolist()) if keep])


def _drawn(source: torch.Generator | SampleStreams, shape: tuple[int, ...], axis: int, draw) -> torch.Tensor:
    """`draw(shape, generator)` from one generator, or per sample along `axis` from its own stream."""
    if isinstance(source, torch.Generator):
        return draw(shape, source)
    one = shape[:axis] + shape[axis + 1 :]
    return torch.stack([draw(one, g) for g in source.generators], dim=axis)


def normal(source: torch.Generator | SampleStreams, shape: tuple[int, ...], dtype: torch.dtype, axis: int = 0) -> torch.Tensor:
    """Standard normal values of `shape`, whose `axis` runs over the samples where `source` has one stream each."""
    return _drawn(source, shape, axis, lambda s, g: torch.randn(s, generator=g, dtype=dtype))


def signs(source: torch.Generator | SampleStreams, shape: tuple[int, ...], axis: int = 0) -> torch.Tensor:
    """Random -1 / +1 (int64) of `shape`, per sample along `axis` as in `normal`."""
    return _drawn(source, shape, axis, lambda s, g: torch.randint(0, 2, s, generator=g) * 2 - 1)


def exponential(source: torch.Generator | SampleStreams, shape: tuple[int, ...], dtype: torch.dtype, axis: int = 0) -> torch.Tensor:
    """Exponential(1) values of `shape`, per sample along `axis` as in `normal`."""
    return _drawn(source, shape, axis, lambda s, g: torch.empty(s, dtype=dtype).exponential_(generator=g))
