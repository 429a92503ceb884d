"""Load a user's saved classifier, whatever the format, and wrap it for pixel-space attacks.

`load_model` reads the file (never writing to it) into a frozen CPU `nn.Module` plus what
the file states about its input; `wrap_model` turns that into an `AuditModel` mapping
pixels in the user's range to logits. Every problem with the user's file or flags is a
`RobauditError` with one sentence, never a raw traceback.
"""

from __future__ import annotations

from pathlib import Path

from robaudit.errors import RobauditError
from robaudit.models.detect import FORMATS, RawModel, check_format, detect_format, holds_safetensors
from robaudit.models.wrapper import AuditModel, WrapInfo, wrap_model

__all__ = ["FORMATS", "AuditModel", "RawModel", "WrapInfo", "detect_format", "load_model", "module_model", "wrap_model"]


def module_model(module) -> RawModel:
    """An in-memory ``torch.nn.Module`` (the Python API) as a loaded model: a frozen CPU copy, so the caller's is untouched."""
    import copy

    import torch

    from robaudit.models.detect import few, freeze, mode_readers

    if not isinstance(module, torch.nn.Module):
        raise RobauditError(f"model must be a path or a torch.nn.Module, not {type(module).__name__}")
    try:
        net = copy.deepcopy(module).cpu()
    except Exception as exc:  # noqa: BLE001 - any failure to copy is the same user-facing problem
        raise RobauditError(f"cannot copy the model {type(module).__name__} ({type(exc).__name__}: {exc})") from exc
    name = type(module).__qualname__
    notes = [f"in-memory torch.nn.Module {name} (a copy was audited)"]
    reading = mode_readers(net)
    if reading:  # the caller's own module in memory: audited, and certified, as it runs in inference mode
        notes.append(f"the module was passed in training mode and its code reads the mode ({few(reading)}); "
                     "robaudit audits its copy in inference mode (.eval())")  # fmt: skip
    return RawModel(net=freeze(net), format="module", input_shape=None, num_classes=None, notes=notes,
                    name=name)  # fmt: skip


def load_model(
    path: Path,
    *,
    fmt: str | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
) -> RawModel:
    """Load `path` (format detected unless `fmt` is given) as a frozen, eval-mode module on CPU."""
    path = Path(path)
    if not path.exists():
        raise RobauditError(f"model file {path} does not exist")
    if not path.is_file():
        raise RobauditError(f"model path {path} is not a file; pass the model file itself")
    if num_classes is not None and num_classes < 2:
        raise RobauditError(f"--num-classes must be at least 2, got {num_classes}")
    fmt = check_format(fmt) if fmt else detect_format(path)
    if path.stat().st_size == 0:
        raise RobauditError(f"model file {path} is empty (0 bytes); re-save or re-copy it")
    if fmt in ("onnx", "torchscript", "torch-export") and (arch is not None or num_classes is not None):
        flag = "--arch" if arch is not None else "--num-classes"
        raise RobauditError(
            f"{flag} applies to weights-only files (safetensors, state dicts); a {fmt} file carries its own network"
        )

    if fmt == "onnx":
        from robaudit.models.onnx_file import load_onnx

        return load_onnx(path)
    if fmt == "torchscript":
        from robaudit.models.torchscript_file import load_torchscript

        return load_torchscript(path)
    if fmt == "torch-export":
        from robaudit.models.export_file import load_export

        return load_export(path)

    from robaudit.models.weights_file import read_safetensors, state_dict_from, weights_model

    # `--format state-dict` or `pickle` on safetensors bytes is read as safetensors (torch.load reads them too)
    if fmt == "safetensors" or holds_safetensors(path):
        return weights_model(path, read_safetensors(path), fmt="safetensors", arch=arch, num_classes=num_classes)

    # 'state-dict' or 'pickle': what the file really holds decides, not the guess.
    from robaudit.models.pickle_file import find_module, pickle_model, read_torch_save

    obj = read_torch_save(path, trust_pickle=trust_pickle)
    module, entry = find_module(obj)
    if module is not None:
        return pickle_model(path, module, arch, entry)
    notes: list[str] = []
    weights = state_dict_from(obj, path, notes)
    return weights_model(path, weights, fmt="state-dict", arch=arch, num_classes=num_classes, notes=notes)
