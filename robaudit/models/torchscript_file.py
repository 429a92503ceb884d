"""TorchScript archives (torch.jit.save): deprecated upstream but still what many teams ship.

The archive carries its own code, so no architecture is needed, but it says nothing about
the input shape or the number of classes; the wrapper learns those from the data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from robaudit.errors import RobauditError
from robaudit.models.detect import RawModel, freeze, one_line


def load_torchscript(path: Path) -> RawModel:
    """Load on CPU; corrupt or non-TorchScript files become a RobauditError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - RuntimeError from the zip reader or the deserializer
        raise RobauditError(f"cannot read TorchScript file {path}: {one_line(exc)}") from None
    if not isinstance(net, torch.nn.Module):
        raise RobauditError(f"TorchScript file {path} does not hold a module")
    return RawModel(net=freeze(net), format="torchscript", input_shape=None, num_classes=None, name=str(path))
