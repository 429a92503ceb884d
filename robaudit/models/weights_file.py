"""Weights-only files (safetensors, torch.save state dicts) rebuilt with `--arch`.

These files cannot run code, which makes them the safe way to share a model; the price
is that the user names the architecture. Keys and shapes are compared up front so a
mismatch reads as one sentence naming the first offending keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

from robaudit.errors import RobauditError
from robaudit.models.arch import build_arch
from robaudit.models.detect import RawModel, checkpoint_note, freeze, holds_weights, one_line, safetensors_header

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Prefixes training wrappers add to every key: DataParallel/DDP, torch.compile, Lightning.
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")


REBUILD_SEED = 20261206  # the second build of an --arch factory, whose random draws must not matter


def no_arch(path: Path) -> RobauditError:
    return RobauditError(
        f"{path} holds only weights; pass --arch NAME (a torchvision model) or --arch package.module:factory"
    )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    safetensors_header(path)
    try:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
        raise RobauditError(f"cannot read safetensors file {path}: {one_line(exc)}") from None


def state_dict_from(obj: object, path: Path, notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, unwrapping the usual checkpoint layouts.

    The entry read is named in `notes`, with every other entry that holds weights too (an
    EMA copy, a second network): the report must say which network it is about.
    """
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if holds_weights(inner):
                if notes is not None:
                    notes.append(checkpoint_note(obj, key, "weights"))
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise RobauditError(f"{path} holds a {type(obj).__name__}, not a model or a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:5]))
        raise RobauditError(f"{path} holds a dict without tensors (keys: {keys}), not a state dict")
    return tensors


def _strip_prefixes(model_sd: dict, weights: dict, depth: int = 3) -> tuple[dict, list[str]] | None:
    """The weights with training-wrapper prefixes removed (stacked too: `module._orig_mod.`) so that every key
    fits the model, and the prefixes removed; None where no sequence of them makes the keys fit."""
    frontier: list[tuple[dict, list[str]]] = [(weights, [])]
    for _ in range(depth):
        deeper = []
        for current, used in frontier:
            for prefix in _KEY_PREFIXES:
                if current and all(k.startswith(prefix) for k in current):
                    stripped = {k.removeprefix(prefix): v for k, v in current.items()}
                    if not any(_compare(model_sd, stripped)[:2]):
                        return stripped, [*used, prefix]
                    deeper.append((stripped, [*used, prefix]))
        frontier = deeper
    return None


def _compare(model_sd: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    missing = [k for k in model_sd if k not in weights]
    unexpected = [k for k in weights if k not in model_sd]
    shapes = [
        (k, tuple(weights[k].shape), tuple(v.shape))
        for k, v in model_sd.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, shapes


def _head_classes(model_sd: dict[str, torch.Tensor], shapes: list) -> int | None:
    """If only the final layer's output size differs, the number of classes the weights have."""
    last = set(list(model_sd)[-2:])
    if not all(key in last and file_shape[1:] == model_shape[1:] for key, file_shape, model_shape in shapes):
        return None
    sizes = {file_shape[0] for _, file_shape, _ in shapes if file_shape}
    return sizes.pop() if len(sizes) == 1 else None


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:4])
    return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def weights_model(
    path: Path, weights: dict[str, torch.Tensor], *, fmt: str, arch: str | None, num_classes: int | None,
    notes: list[str] | None = None,
) -> RawModel:
    """Build `arch` and load `weights` into it strictly; `notes` say where the weights came from."""
    if not arch:
        raise no_arch(path)
    notes = list(notes or [])
    net = build_arch(arch, num_classes)
    model_sd = net.state_dict()
    missing, unexpected, shapes = _compare(model_sd, weights)
    if missing or unexpected:
        found = _strip_prefixes(model_sd, weights)
        if found is not None:
            weights, used = found
            missing, unexpected, shapes = _compare(model_sd, weights)
            named = " and ".join(repr(prefix) for prefix in used)
            notes.append(f"removed the prefix{'es' if len(used) > 1 else ''} {named} (added by a training wrapper) "
                         "from the weight names")  # fmt: skip
    untracked = [k for k in missing if k.endswith("num_batches_tracked")]
    if untracked and not unexpected and len(untracked) == len(missing):
        # batch norm's step counter (torch < 0.4.1 state dicts have none): inference never reads it
        weights = {**weights, **{k: model_sd[k] for k in untracked}}
        missing = []
        notes.append(f"the file has no num_batches_tracked for {len(untracked)} batch norm layer(s) (an older "
                     "torch's state dict): their counters are left at the built model's, which inference does not read")  # fmt: skip

    if num_classes is None and not missing and not unexpected and shapes:
        classes = _head_classes(model_sd, shapes)
        if classes is not None:
            try:
                retry = build_arch(arch, classes)
            except RobauditError:
                retry = None
            if retry is not None and not any(_compare(retry.state_dict(), weights)):
                net, model_sd, shapes = retry, retry.state_dict(), []
                num_classes = classes
                notes.append(f"built --arch {arch} with num_classes={classes} to match the weights")

    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) the model needs are missing from the file ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) in the file are not in the model ({_listing(unexpected)})")
        raise RobauditError(f"the weights in {path} do not fit --arch {arch}: {'; '.join(parts)}")
    if shapes:
        key, file_shape, model_shape = shapes[0]
        more = f" (and {len(shapes) - 1} more mismatched tensors)" if len(shapes) > 1 else ""
        advice = (f"--num-classes {num_classes} built it that way; pass the number of classes the weights have, or "
                  "leave --num-classes out to take it from them") if num_classes is not None else (
                  "if the model has a different number of classes, pass --num-classes")  # fmt: skip
        raise RobauditError(
            f"the weights in {path} do not fit --arch {arch}: {key} has shape {file_shape} in the file but "
            f"{model_shape} in the model{more}; {advice}"
        )
    stored = {v.dtype for v in weights.values() if v.is_floating_point()}
    if len(stored) == 1 and stored != {torch.float32}:
        # built in the file's precision before loading: load_state_dict casts into the architecture's
        # tensors, so float32 ones would round float64 weights, and a float16 / bfloat16 file is as
        # often run in its own precision
        (dtype,) = stored
        net = net.to(dtype)
        notes.append(f"built --arch {arch} in {str(dtype).removeprefix('torch.')}, the precision of the weights in the file")
    elif stored - {torch.float32}:
        kinds = ", ".join(sorted(str(d).removeprefix("torch.") for d in stored))
        notes.append(f"the weights in the file mix {kinds}: loaded into --arch {arch}'s float32 tensors")
    try:
        net.load_state_dict(weights, strict=True)
    except Exception as exc:  # noqa: BLE001 - dtype/device oddities the comparison above cannot see
        raise RobauditError(f"the weights in {path} do not fit --arch {arch}: {one_line(exc)}") from None
    dtype = next((t.dtype for t in net.parameters() if t.is_floating_point()), torch.float32)

    def rebuild() -> torch.nn.Module:  # the same factory and weights, under another seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(REBUILD_SEED)
            again = build_arch(arch, num_classes).to(dtype)
        again.load_state_dict(weights, strict=True)
        return freeze(again)

    return RawModel(
        net=freeze(net), format=fmt, input_shape=None, num_classes=num_classes, notes=notes, name=str(path),
        rebuild=rebuild,
    )  # fmt: skip
