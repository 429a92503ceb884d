"""The bundled digits set: a tiny real dataset so robaudit works offline out of the box.

It is scikit-learn's 8x8 digits test split, frozen into the package by
`scripts/make_digits.py`, so the package never needs scikit-learn at run time.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from robaudit.data.dataset import RawData
from robaudit.data.files import short_reason
from robaudit.errors import RobauditError

DIGITS_FILE = "digits_test.npz"


def load_digits() -> RawData:
    """The shipped digits test split: x uint8 (N, 1, 8, 8), y int64."""
    try:
        with resources.files("robaudit.data").joinpath(DIGITS_FILE).open("rb") as f:
            with np.load(f, allow_pickle=False) as archive:
                x, y = archive["x"], archive["y"]
    except Exception as exc:  # only a broken installation gets here
        raise RobauditError(
            f"the bundled digits data ({DIGITS_FILE}) is missing or damaged; "
            f"reinstall robaudit ({short_reason(exc)})."
        ) from exc
    return RawData(x=torch.from_numpy(x.copy()), y=torch.from_numpy(y.astype(np.int64)))
