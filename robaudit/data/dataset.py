"""The evaluation set handed to the scan, and the checks every source goes through.

Every reader (files, folders, torchvision, digits) returns a `RawData`; the checks here
run once on it so that all sources reject bad input the same way and with the same
one-sentence messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from robaudit.errors import RobauditError

RANGE_TOLERANCE = 1e-6


@dataclass
class Dataset:
    """Samples in pixel space plus the provenance the report needs to be reproducible."""

    x: torch.Tensor  # float32, (N, *sample_shape); images are NCHW
    y: torch.Tensor  # int64, (N,)
    name: str  # built-in name, or the path exactly as the user gave it
    indices: list[int]  # position of each sample in the full source, in the order of x
    source_size: int  # samples in the full source before sampling
    notes: list[str]  # conversions and choices worth telling the user about
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (C, H, W)."""
        return tuple(self.x.shape[1:])

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Pixels of the samples at positions start..stop (in the order of `indices`).

        The scan reads its data through this, a chunk at a time.
        """
        return self.x[start:stop]


@dataclass
class RawData:
    """A whole source as read from disk, before validation, sampling and scaling."""

    x: torch.Tensor  # any real dtype; uint8 means 0-255 pixels
    y: torch.Tensor
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None


def validate(raw: RawData, name: str) -> torch.Tensor:
    """Reject malformed data up front and return the labels as int64.

    The whole source is checked (not just the sample) so that the outcome never
    depends on the seed.
    """
    x, y = raw.x, raw.y
    if x.dim() > 0 and x.numel() == 0:
        raise RobauditError(f"data {name} is empty: it contains no samples.")
    if x.dim() < 2:
        raise RobauditError(
            f"data {name} has x of shape {tuple(x.shape)}, but x needs a sample "
            "dimension followed by the sample shape, e.g. (N, C, H, W) or (N, D)."
        )
    if x.is_complex():
        raise RobauditError(f"data {name} has x of unsupported dtype {x.dtype}.")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise RobauditError(f"data {name} has {bad} NaN or infinite values in x.")
    if y.dim() != 1:
        raise RobauditError(
            f"data {name} has labels y of shape {tuple(y.shape)}, but y must be 1-D "
            "with one integer class index per sample."
        )
    if y.shape[0] != x.shape[0]:
        raise RobauditError(
            f"data {name} has {x.shape[0]} samples in x but {y.shape[0]} labels in y."
        )
    if y.is_complex():
        raise RobauditError(f"data {name} has labels y of unsupported dtype {y.dtype}.")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == torch.round(y)).all()):
            raise RobauditError(
                f"data {name} has labels y that are not integer-valued; "
                "y must hold integer class indices."
            )
    labels = y.to(torch.int64)
    if bool((labels < 0).any()):
        raise RobauditError(
            f"data {name} has a negative label ({int(labels.min())}); "
            "labels must be non-negative class indices."
        )
    return labels


def check_range(x: torch.Tensor, name: str, lo: float, hi: float) -> None:
    """Refuse non-uint8 data outside the model's input range: attacks clamp to it."""
    if x.dtype == torch.uint8:
        return
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo - RANGE_TOLERANCE or xmax > hi + RANGE_TOLERANCE:
        hint = " (for 0-255 pixels, store x as uint8)" if xmax > 1.5 and hi <= 1.0 else ""
        raise RobauditError(
            f"data {name} has values in [{xmin:g}, {xmax:g}], outside the input range "
            f"[{lo:g}, {hi:g}]; pass --input-range to match the range the model "
            f"expects{hint}."
        )


def to_pixels(x: torch.Tensor, lo: float, hi: float, notes: list[str]) -> torch.Tensor:
    """Turn (already range-checked) data into contiguous float32 in [lo, hi]."""
    if x.dtype == torch.uint8:
        notes.append(f"scaled uint8 0-255 to [{lo:g}, {hi:g}]")
        out = x.to(torch.float32) * ((hi - lo) / 255.0) + lo
    else:
        out = x.to(torch.float32)
    # Values within the tolerance may sit a hair outside; attacks assume exact bounds.
    return out.clamp(lo, hi).contiguous()
