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
from robaudit.models.fx_graph import training_reads


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
    notes, inexact = [], None
    if any(module.training for module in net.modules()) and _reads_training(net):
        notes.append("TorchScript module was saved in training mode; robaudit evaluates it in inference mode (.eval())")
        # `torch.jit.load` returns it in training mode: dropout draws, batch norm uses batch statistics
        inexact = (
            "the TorchScript module was saved in training mode, and its code depends on the mode (dropout, batch "
            "norm): radii would be about inference mode, not the module as the file loads"
        )
    return RawModel(net=freeze(net), format="torchscript", input_shape=None, num_classes=None, name=str(path),
                    notes=notes, inexact=inexact)  # fmt: skip


def _reads_training(net: torch.jit.ScriptModule) -> bool:
    """Whether the code reads a `training` flag (scripted dropout, batch norm); a trace has the mode baked in."""
    try:
        graph = net.inlined_graph  # kept alive while its nodes are read
    except Exception:  # noqa: BLE001 - a module without a forward graph: assume it does
        return True
    return bool(training_reads(graph))
