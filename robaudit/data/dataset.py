"""The evaluation set handed to the scan, and the checks every source goes through.

Every reader (files, folders, torchvision, digits) returns a `RawData`; the checks here
run once on it so that all sources reject bad input the same way and with the same
one-sentence messages.

Pixels are produced lazily: a `Dataset` keeps the source as read (uint8 arrays, float
arrays, or an image folder's file list) and converts, or decodes, one chunk at a time
in `take`, so a large `--n` never needs all float32 pixels in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from robaudit.errors import RobauditError

RANGE_TOLERANCE = 1e-6


def pixel_bytes(x: torch.Tensor) -> bytes:
    """The float32 bytes of pixels, what every pixel digest hashes (`Dataset.digest`, checkpoint chunks)."""
    return x.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()


@runtime_checkable
class LazyRows(Protocol):
    """A source whose samples are read on demand (an image folder).

    Shape and dtype are known up front (from file headers) so that validation needs
    no decoding; `rows` reads only the samples asked for.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    def rows(self, positions: Sequence[int]) -> torch.Tensor:
        """The samples at `positions` of the source, stacked (dtype `self.dtype`)."""
        ...


Source = torch.Tensor | LazyRows


def read_rows(source: Source, positions: Sequence[int]) -> torch.Tensor:
    """Samples at `positions` of a tensor or lazy source, in that order."""
    if isinstance(source, torch.Tensor):
        return source[torch.as_tensor(list(positions), dtype=torch.int64)]
    return source.rows(positions)


@dataclass(frozen=True)
class PixelReader:
    """Reads sampled positions of a source and scales them into [lo, hi]."""

    source: Source
    indices: list[int]
    lo: float
    hi: float

    def take(self, start: int, stop: int) -> torch.Tensor:
        return scale_pixels(read_rows(self.source, self.indices[start:stop]), self.lo, self.hi)


class Dataset:
    """Samples in pixel space plus the provenance the report needs to be reproducible.

    Built either from all pixels at once (`x=`, for small callers and tests) or from a
    `PixelReader` (what `load_data` does), which keeps the source and scales a chunk
    per `take` call.
    """

    def __init__(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        name: str = "",
        indices: list[int] | None = None,
        source_size: int = 0,
        notes: list[str] | None = None,
        class_names: list[str] | None = None,
        *,
        reader: PixelReader | None = None,
        source_top: int | None = None,
    ) -> None:
        if (x is None) == (reader is None) or y is None:
            raise ValueError("a Dataset needs y and exactly one of x or reader")
        self._x = x  # float32, (N, *sample_shape); images are NCHW
        self._reader = reader
        self.y = y  # int64, (N,)
        self._digest: str | None = None
        self.source_top = source_top  # the largest label of the whole source, sampled or not, where it was read
        self.name = name  # built-in name, or the path exactly as the user gave it
        # Position of each sample in the full source, in the order of x.
        self.indices = list(range(int(y.shape[0]))) if indices is None else indices
        self.source_size = source_size  # samples in the full source before sampling
        self.notes = [] if notes is None else notes  # conversions and choices to report
        self.class_names = class_names

    def __len__(self) -> int:
        if self._x is not None:
            return int(self._x.shape[0])
        return len(self.indices)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, n={len(self)}, "
                f"sample_shape={self.sample_shape}, source_size={self.source_size})")

    @property
    def files(self) -> list[str] | None:
        """Each sample's file as the user would write it, in order; None unless the source is an image folder.

        An index alone cannot name the file: robaudit's folder order (numbered class
        folders by label, hidden files skipped) differs from `ImageFolder`'s.
        """
        shown = getattr(self._reader.source, "shown", None) if self._reader is not None else None
        return None if shown is None else [str(shown[i]) for i in self.indices]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (C, H, W); known without reading any pixels."""
        if self._x is not None:
            return tuple(self._x.shape[1:])
        return tuple(int(d) for d in self._reader.source.shape[1:])

    @property
    def x(self) -> torch.Tensor:
        """All pixels at once (read on first use, then kept): for small callers only.

        The scan reads its data with `take` instead, so memory does not grow with N.
        """
        if self._x is None:
            self._x = self._reader.take(0, len(self))
        return self._x

    def digest(self, chunk: int = 256) -> str:
        """SHA-256 of every audited sample's float32 pixels, in the order of `indices`, read `chunk` at a time.

        Two reports with the same name, indices and labels may still hold other pixels (a
        flipped copy of the images): the digest tells them apart (`gate.data_mismatch`).
        """
        if self._digest is None:
            import hashlib

            total = hashlib.sha256()
            for start in range(0, len(self), chunk):
                total.update(pixel_bytes(self.take(start, min(start + chunk, len(self)))))
            self._digest = total.hexdigest()
        return self._digest

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Pixels of the samples at positions start..stop (in the order of `indices`).

        The scan reads its data through this, a chunk at a time; only that chunk is
        decoded and scaled to float32.
        """
        if self._x is not None:
            return self._x[start:stop]
        return self._reader.take(start, stop)


@dataclass
class RawData:
    """A whole source as read from disk, before validation, sampling and scaling."""

    x: Source  # any real dtype; uint8 means 0-255 pixels
    y: torch.Tensor
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None


def validate(raw: RawData, name: str) -> torch.Tensor:
    """Reject malformed data up front and return the labels as int64.

    The whole source is checked (not just the sample) so that the outcome never
    depends on the seed. Lazy sources are checked from their shape and dtype (their
    readers already checked every file header).
    """
    x, y = raw.x, raw.y
    shape = tuple(int(d) for d in x.shape)
    if len(shape) > 0 and math.prod(shape) == 0:
        raise RobauditError(f"data {name} is empty: it contains no samples.")
    if len(shape) < 2:
        raise RobauditError(
            f"data {name} has x of shape {shape}, but x needs a sample "
            "dimension followed by the sample shape, e.g. (N, C, H, W) or (N, D)."
        )
    if x.dtype.is_complex:
        raise RobauditError(f"data {name} has x of unsupported dtype {x.dtype}.")
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        _check_finite(x, name)
    if y.dim() != 1:
        raise RobauditError(
            f"data {name} has labels y of shape {tuple(y.shape)}, but y must be 1-D "
            "with one integer class index per sample."
        )
    if y.shape[0] != shape[0]:
        raise RobauditError(
            f"data {name} has {shape[0]} samples in x but {y.shape[0]} labels in y."
        )
    if y.is_complex():
        raise RobauditError(f"data {name} has labels y of unsupported dtype {y.dtype}.")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == torch.round(y)).all()):
            raise RobauditError(
                f"data {name} has labels y that are not integer-valued; "
                "y must hold integer class indices."
            )
        if len(y) and float(y.double().abs().max()) >= 2.0**53:  # int64 would wrap: name the label as stored
            raise RobauditError(f"data {name} has a label of {float(y.double().abs().max()):g}, not a class index.")
    labels = y.to(torch.int64)
    if bool((labels < 0).any()):
        raise RobauditError(
            f"data {name} has a negative label ({int(labels.min())}); "
            "labels must be non-negative class indices."
        )
    return labels


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise RobauditError(f"data {name} has {bad} NaN or infinite values in x.")


def check_range(x: Source, name: str, lo: float, hi: float) -> str | None:
    """Refuse non-uint8 data outside the model's input range: attacks clamp to it.

    Values within `RANGE_TOLERANCE` outside are accepted and clamped by `scale_pixels`;
    the returned note says how many, since every distance is then measured from the
    clamped pixels rather than the file's.
    """
    if x.dtype == torch.uint8:
        return None
    if not isinstance(x, torch.Tensor):  # lazy sources are uint8 images
        raise TypeError(f"lazy source of dtype {x.dtype} cannot be range-checked")
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo - RANGE_TOLERANCE or xmax > hi + RANGE_TOLERANCE:
        hint = " (for 0-255 pixels, store x as uint8)" if xmax > 1.5 and hi <= 1.0 else ""
        raise RobauditError(
            f"data {name} has values in [{xmin:g}, {xmax:g}], outside the input range "
            f"[{lo:g}, {hi:g}]; pass --input-range to match the range the model "
            f"expects{hint}."
        )
    outside = int((x < lo).sum()) + int((x > hi).sum())
    if not outside:
        return None
    return (f"{outside} value(s) of the data lie less than {RANGE_TOLERANCE:g} outside [{lo:g}, {hi:g}] and were "
            "clamped into it; distances, examples and radii are measured from the clamped pixels")


def pixel_note(dtype: torch.dtype, lo: float, hi: float) -> str | None:
    """The report note for the scaling `scale_pixels` applies to data of `dtype`."""
    return f"scaled uint8 0-255 to [{lo:g}, {hi:g}]" if dtype == torch.uint8 else None


def scale_pixels(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Turn (already range-checked) data into contiguous float32 in [lo, hi].

    One new tensor, scaled in place: a chunk of 224x224 images is 150 MB of float32,
    so every extra temporary shows up in peak memory and page-fault time.
    """
    out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if x.dtype == torch.uint8 and (lo, hi) == (0.0, 1.0):
        # divided, as torchvision's ToTensor does: times float32(1/255) is one float32 step
        # off for 126 of the 256 values, so a point at exactly eps from robaudit's pixels
        # could lie a hair beyond eps from the pixels the user's own loader gives
        out.div_(255.0)
    elif x.dtype == torch.uint8:
        out.mul_((hi - lo) / 255.0).add_(lo)
    # Values within the tolerance may sit a hair outside; attacks assume exact bounds.
    return out.clamp_(lo, hi)


def to_pixels(x: torch.Tensor, lo: float, hi: float, notes: list[str]) -> torch.Tensor:
    """All of `x` as float32 pixels at once, noting the scaling (eager callers)."""
    note = pixel_note(x.dtype, lo, hi)
    if note:
        notes.append(note)
    return scale_pixels(x, lo, hi)
