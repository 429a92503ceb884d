"""Resolve `--arch`: the code that turns a weights-only file back into a network.

Safetensors files and state dicts hold tensors but no code, so the user names the
architecture: a torchvision classification model, or their own factory function as
`package.module:factory` (or `path/to/file.py:factory`), imported like any Python code.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from robaudit.errors import RobauditError
from robaudit.models.detect import one_line, refuse_lazy

FACTORY_HINT = "or --arch package.module:factory for your own model code"


def torchvision_names() -> list[str]:
    """Classification models only: detection/segmentation/video nets are not image classifiers here."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _import_module(spec: str, arch: str):
    if spec.endswith(".py"):
        file = Path(spec).expanduser()
        if not file.is_file():
            raise RobauditError(f"--arch {arch}: the file {file} does not exist")
        name = f"_robaudit_arch_{abs(hash(str(file.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, file)
        if loader_spec is None or loader_spec.loader is None:
            raise RobauditError(f"--arch {arch}: cannot import {file}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        # Console scripts do not put the working directory on sys.path; users expect
        # `--arch mymodels:build` to find ./mymodels.py like `python -m` would.
        top = spec.split(".")[0]
        if exc.name == top and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
            try:
                return importlib.import_module(spec)
            finally:
                sys.path.remove(os.getcwd())
        raise


def _factory(arch: str) -> Callable[..., object]:
    module_name, _, attr = arch.rpartition(":")
    if not module_name or not attr:
        raise RobauditError(f"--arch {arch!r} is not of the form package.module:factory")
    try:
        module = _import_module(module_name, arch)
    except RobauditError:
        raise
    except Exception as exc:  # noqa: BLE001 - ImportError, or anything the user's module raises on import
        raise RobauditError(f"--arch {arch}: cannot import {module_name} ({one_line(exc)})") from None
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RobauditError(f"--arch {arch}: module {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RobauditError(f"--arch {arch}: {attr} in {module_name} is not callable")
    return target  # type: ignore[return-value]


def build_arch(arch: str, num_classes: int | None) -> torch.nn.Module:
    """Build an untrained network for `arch`, with `num_classes` outputs when given."""
    arch = arch.strip()
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if ":" in arch:
        factory = _factory(arch)
        what = f"--arch {arch}"
    else:
        import torchvision.models as tvm

        names = torchvision_names()
        name = arch.lower()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise RobauditError(
                f"--arch {arch} is not a torchvision classification model{hint}; "
                f"pass a name from torchvision.models.list_models() {FACTORY_HINT}"
            )

        def factory(**kw: object) -> object:
            return tvm.get_model(name, weights=None, **kw)

        what = f"torchvision model {name}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code or torchvision rejecting arguments
        args = f" with num_classes={num_classes}" if kwargs else ""
        raise RobauditError(f"building {what}{args} failed: {one_line(exc)}") from None
    if not isinstance(net, torch.nn.Module):
        raise RobauditError(f"{what} returned {type(net).__name__}, not a torch.nn.Module")
    refuse_lazy(net, what)
    return net
