"""Which kind of model file is this? Decided from the extension and the first bytes.

Users pass whatever their framework wrote, often with a generic or wrong extension, so
the bytes are trusted over the name where they say something; `--format` overrides both.
Detection never unpickles anything: a `torch.save` file is classified by statically
listing the Python globals its pickle would import.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from robaudit.errors import RobauditError

FORMATS = ("onnx", "torchscript", "torch-export", "safetensors", "state-dict", "pickle")

_SUPPORTED = (
    "supported formats are ONNX (.onnx), TorchScript (torch.jit.save), torch.export (.pt2), "
    "safetensors, a torch.save state dict (with --arch) and a pickled nn.Module (with --trust-pickle)"
)


@dataclass
class RawModel:
    """A loaded network plus what its file says about it, before any wrapping."""

    net: torch.nn.Module
    format: str
    input_shape: tuple[int, ...] | None
    num_classes: int | None
    notes: list[str] = field(default_factory=list)
    # The batch size the graph is hard-wired to when the file says so and it is > 1
    # (e.g. a torch.export program traced with a batch of 4 and static shapes).
    fixed_batch: int | None = None
    # The file name, for error messages raised after loading.
    name: str = "the model"
    # The file's own semantics where the net is a translation of it (ONNX via onnx2torch):
    # `wrap_model` checks the net against it on the first data samples.
    reference: torch.nn.Module | None = None
    # The per-sample dims the file states where some are free (None), as an ONNX graph taking
    # images of any size: (None, None, 3) is a channel-last net (`layout.free_channel_last`).
    input_dims: tuple[int | None, ...] | None = None
    # Why the net computes something other than the file, where the loader rewrote it (no certificate).
    inexact: str | None = None
    # Each submodule's `training` flag as the file holds it, where some was saved in training mode and no class
    # code read the mode: `wrap_model` runs a copy in those modes and compares (a helper may read it).
    saved_modes: dict[str, bool] | None = None
    # Builds the same network again from its source (an --arch factory and the weights): values the
    # factory draws at random and the file does not hold would differ (`wrap_model` compares the two).
    rebuild: Callable[[], torch.nn.Module] | None = None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A low-level exception as a short single line, for embedding in a RobauditError.

    A TorchScript interpreter error carries the file's serialized code and the tracer's
    Python stack before the actual error on its last line; only that line is kept.
    """
    raw = str(exc)
    if raw.startswith("The following operation failed in the TorchScript interpreter"):
        raw = next((line for line in reversed(raw.splitlines()) if line.strip()), raw)
    text = " ".join(raw.split())
    if not text or isinstance(exc, (KeyError, IndexError, AttributeError, TypeError)):
        text = f"{type(exc).__name__}: {text}".rstrip(": ")
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def mode_readers(net: torch.nn.Module) -> list[str]:
    """The submodules in training mode whose class code reads `training` (dropout, batch norm, a user's branch).

    A module's mode matters only where its code reads it; an MLP saved without `.eval()`
    computes the same in both modes. Every method of the class and its bases (torch's own
    layers included, `nn.Module` itself excluded) is read, nested functions too.
    """
    found = []
    for name, m in net.named_modules():
        if not m.training:
            continue
        label = f"{name}: {type(m).__name__}" if name else type(m).__name__
        if _reads_mode(type(m)) and not _same_in_both(m):
            found.append(label)
        elif any(_hook_reads_mode(hook) for hook in _hooks(m)):  # torch's old spectral_norm iterates while training
            found.append(f"{label} (a hook)")
    return found


def _hooks(m: torch.nn.Module) -> list:
    return [hook for table in ("_forward_pre_hooks", "_forward_hooks") for hook in getattr(m, table, {}).values()]


def _hook_reads_mode(hook) -> bool:
    code = getattr(getattr(hook, "__func__", hook), "__code__", None)
    return _code_reads(code, "training") if code is not None else _reads_mode(type(hook))


def _same_in_both(m: torch.nn.Module) -> bool:
    """torch layers that read the mode but compute the same in both: norms without running statistics (they
    normalize with the input's own in both), dropout that drops nothing."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.dropout import _DropoutNd

    if isinstance(m, _NormBase):
        return m.running_mean is None
    return isinstance(m, _DropoutNd) and m.p == 0


def _reads_mode(cls: type) -> bool:
    """Whether a method of `cls` or of its bases (`nn.Module` and `object` aside) reads `training`."""
    for base in cls.__mro__:
        if base in (torch.nn.Module, object):
            continue
        for value in vars(base).values():
            function = getattr(value, "__func__", value)  # staticmethod / classmethod
            code = getattr(function, "__code__", None)
            if code is not None and _code_reads(code, "training"):
                return True
    return False


def _code_reads(code, name: str) -> bool:
    return name in code.co_names or any(_code_reads(c, name) for c in code.co_consts if hasattr(c, "co_names"))


def saved_in_training(why: str) -> tuple[str, str]:
    """The note and the no-certificate reason for a pickled module saved in training mode, where `why` says how
    its output depends on the mode (the class code read, or a copy run in that mode: `wrapper._saved_mode_differs`)."""
    return (
        f"pickled module was saved in training mode, and {why}; robaudit evaluates it in inference mode (.eval())",
        f"the pickled module was saved in training mode, and {why}: radii would be about inference mode, not the "
        "module as the file loads",
    )


def holds_weights(value: object) -> bool:
    """A state dict: a dict with tensor values."""
    return isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values())


def checkpoint_note(checkpoint: dict, key: str, what: str) -> str:
    """Which entry of a checkpoint was audited, and which others hold a network too (not audited)."""
    others = [repr(k) for k, v in checkpoint.items() if k != key and (isinstance(v, torch.nn.Module) or holds_weights(v))]
    note = f"audited the {what} under {key!r} of the checkpoint"
    if others:
        note += (f"; it also holds {', '.join(others[:3])}{' and more' if len(others) > 3 else ''}, not audited "
                 "(save the network to audit on its own to choose another)")  # fmt: skip
    return note


def few(names: list[str]) -> str:
    """The first three names, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def freeze(net: torch.nn.Module) -> torch.nn.Module:
    """Inference mode, no parameter gradients: attacks only need gradients w.r.t. the input."""
    net.eval()
    refuse_lazy(net, "the model")
    for name, p in net.named_parameters():
        try:
            p.requires_grad_(False)
        except RuntimeError:  # a parameter computed from another tensor (not a leaf): not the model's own weight
            raise RobauditError(
                f"the model's parameter {name} ({type(p).__name__}) is computed from another tensor rather than "
                "stored, and cannot be frozen; save the model with plain tensors as its weights"
            ) from None
    return net


def refuse_lazy(net: torch.nn.Module, what: str) -> None:
    """Lazy layers (nn.LazyLinear, ...) take their shapes from the first input: nothing can be loaded into or
    frozen in them before (an internal error once)."""
    lazy = [name for name, t in [*net.named_parameters(), *net.named_buffers()] if torch.nn.parameter.is_lazy(t)]
    if lazy:
        raise RobauditError(
            f"{what} has uninitialized lazy parameters ({', '.join(lazy[:3])}; e.g. nn.LazyLinear): run it once on a "
            "sample so they take their shapes, then save it (or build it with plain layers)"
        )


def check_format(fmt: str) -> str:
    """Validate a `--format` value (accepting a few spellings people naturally type)."""
    key = fmt.strip().lower().replace("_", "-")
    key = {"pt2": "torch-export", "export": "torch-export", "jit": "torchscript", "statedict": "state-dict"}.get(key, key)
    if key not in FORMATS:
        raise RobauditError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return key


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def holds_safetensors(path: Path) -> bool:
    """Whether the bytes are a safetensors file, whatever its name or --format says."""
    with path.open("rb") as handle:
        head = handle.read(16)
    return _is_safetensors(head, path.stat().st_size)


def _zip_kind(path: Path) -> str:
    """Classify a zip archive written by torch.save / torch.jit.save / torch.export.save."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise RobauditError(
            f"{path} starts like a zip archive (torch.save, TorchScript or torch.export) but cannot be "
            f"opened ({one_line(exc)}); the file is probably truncated or corrupt"
        ) from None
    # Entries live under one top-level folder named after the archive: "<name>/code/...".
    inner = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if any(n.startswith("code/") for n in inner) or "constants.pkl" in inner:
        return "torchscript"
    if "archive_format" in inner or any(n.startswith("models/") for n in inner):
        return "torch-export"
    if "data.pkl" in inner:
        return _pickle_kind(path)
    raise RobauditError(
        f"{path} is a zip archive but not one written by torch.save, torch.jit.save or torch.export.save; "
        f"{_SUPPORTED} (use --format to say which)"
    )


def _pickle_kind(path: Path) -> str:
    """'state-dict' when the pickle imports only what weights_only allows, else 'pickle'."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - undecidable statically; load_model decides from the content
        return "state-dict"
    return "pickle" if unsafe else "state-dict"


def _is_onnx(path: Path) -> bool:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure just means "not ONNX"
        return False
    return len(model.graph.node) > 0 and len(model.opset_import) > 0


def detect_format(path: Path) -> str:
    """Return one of FORMATS for `path`, or raise RobauditError naming the supported ones."""
    path = Path(path)
    if not path.exists():
        raise RobauditError(f"model file {path} does not exist")
    if path.is_dir():
        raise RobauditError(f"model path {path} is a directory; pass the model file itself")
    size = path.stat().st_size
    if size == 0:
        raise RobauditError(f"model file {path} is empty (0 bytes); re-save or re-copy it ({_SUPPORTED})")
    with path.open("rb") as handle:
        head = handle.read(16)
    suffix = path.suffix.lower()

    if suffix == ".onnx":
        return "onnx"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(path)
    if suffix == ".pt2":
        return "torch-export"
    if suffix == ".safetensors" or _is_safetensors(head, size):
        return "safetensors"
    if head.startswith(b"\x80"):
        return "state-dict"  # legacy (non-zip) torch.save; load_model tells a state dict from a pickle
    if _is_onnx(path):
        return "onnx"
    raise RobauditError(
        f"cannot tell what kind of model file {path} is (it is not ONNX, safetensors or a PyTorch archive); "
        f"{_SUPPORTED}; if it is one of these, pass --format"
    )


def safetensors_header(path: Path) -> dict:
    """Parse a safetensors header, so corrupt files fail with a clear message before loading."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise RobauditError(f"cannot read safetensors file {path}: the file is shorter than its 8-byte header")
        (header_len,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if header_len > size - 8:
            raise RobauditError(f"cannot read safetensors file {path}: its header is cut off (truncated file?)")
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise RobauditError(f"cannot read safetensors file {path}: invalid header ({one_line(exc)})") from None
    if not isinstance(header, dict):
        raise RobauditError(f"cannot read safetensors file {path}: invalid header")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise RobauditError(f"cannot read safetensors file {path}: its header does not describe tensors") from None
    if 8 + header_len + end > size:
        raise RobauditError(f"cannot read safetensors file {path}: the tensor data is cut off (truncated file?)")
    return header
