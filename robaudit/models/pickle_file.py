"""Files written by `torch.save`: state dicts, checkpoints, and whole pickled modules.

Unpickling can run arbitrary code, so everything is first read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers; a
full unpickle happens only when the user passes --trust-pickle.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from robaudit.errors import RobauditError
from robaudit.models.detect import RawModel, checkpoint_note, few, freeze, mode_readers, one_line, saved_in_training

_GLOBAL_RE = re.compile(r"GLOBAL (\S+) was not an allowed global")


def pickle_refusal(path: Path, imports: str | None = None) -> RobauditError:
    what = f" (it imports {imports})" if imports else ""
    return RobauditError(
        f"{path} is a pickled Python object{what}; loading it can run arbitrary code. "
        "Pass --trust-pickle only if you trust its source (or save a state dict / safetensors instead)"
    )


def read_torch_save(path: Path, *, trust_pickle: bool) -> object:
    """torch.load safely; unpickle fully only with trust_pickle. Bad files raise RobauditError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        match = _GLOBAL_RE.search(text)
        if match is None and "Unsupported global" not in text and "Unsupported class" not in text:
            # Not a refusal to import code but garbage: a bad opcode or a cut-off stream.
            raise RobauditError(f"cannot read PyTorch file {path}: the pickle data is corrupt or truncated") from None
        if not trust_pickle:
            raise pickle_refusal(path, match.group(1) if match else None) from None
    except Exception as exc:  # noqa: BLE001 - zip reader errors, EOFError, OSError on truncated files
        raise RobauditError(f"cannot read PyTorch file {path}: {one_line(exc)}") from None

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as exc:
        raise RobauditError(
            f"{path} pickles code that cannot be imported here ({one_line(exc)}); run robaudit where the model's "
            "Python code is importable, or save a state dict / safetensors and pass --arch"
        ) from None
    except Exception as exc:  # noqa: BLE001 - anything the pickle's own code raises
        raise RobauditError(f"cannot unpickle {path}: {one_line(exc)}") from None


def find_module(obj: object) -> tuple[torch.nn.Module | None, str | None]:
    """The nn.Module in a trusted load and the note naming its checkpoint entry: the object itself or an entry."""
    if isinstance(obj, torch.nn.Module):
        return obj, None
    if isinstance(obj, dict):
        for key in ("model", "net", "module", "ema"):
            if isinstance(obj.get(key), torch.nn.Module):
                return obj[key], checkpoint_note(obj, key, "module")
    return None, None


def pickle_model(path: Path, net: torch.nn.Module, arch: str | None, entry: str | None = None) -> RawModel:
    """A whole module from a trusted pickle; the file carries its own architecture, and its mode.

    `torch.load` gives the module back in the mode it was saved in. Saved in training mode
    with code that reads the mode (dropout, batch norm), the file computes something else
    than the inference mode robaudit audits (batch statistics, random drops): that is said,
    and no certificate is given, as for TorchScript and torch.export files.
    """
    notes = [f"--arch {arch} ignored: {path.name} holds a whole model"] if arch else []
    if entry:
        notes.append(entry)
    inexact = None
    reading = mode_readers(net)
    if reading:
        note, inexact = saved_in_training(f"its code depends on the mode ({few(reading)})")
        notes.append(note)
    modes = {name: m.training for name, m in net.named_modules()}
    saved = modes if not reading and any(modes.values()) else None  # the code read no mode: run it to see
    net = net.to("cpu")
    return RawModel(net=freeze(net), format="pickle", input_shape=None, num_classes=None, notes=notes, name=str(path),
                    inexact=inexact, saved_modes=saved)  # fmt: skip
