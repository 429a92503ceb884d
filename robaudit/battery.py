"""Which attacks run, in which order, with which parameters: presets, TOML files, flags.

A battery is a list of specs (``{"attack": "apgd-ce", "steps": 100, "restarts": 1}``);
`build_battery` turns specs into `AttackRun`s. Presets are specs too, so a TOML file
or a flag changes a preset the same way it changes any other battery.
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path
from typing import Any

from robaudit.attacks.base import Attack
from robaudit.attacks.runner import AttackRun
from robaudit.config_file import load_toml
from robaudit.errors import RobauditError

Spec = dict[str, Any]


def _factories() -> dict[str, tuple[type[Attack], dict[str, Any]]]:
    """Attack name -> (class, fixed arguments); imported lazily to keep CLI start-up fast."""
    from robaudit.attacks.apgd import APGD, APGDTargeted
    from robaudit.attacks.deepfool import DeepFool
    from robaudit.attacks.fab import FABTargeted
    from robaudit.attacks.fgsm import FGSM
    from robaudit.attacks.fmn import FMN
    from robaudit.attacks.hopskipjump import HopSkipJump
    from robaudit.attacks.noise import Noise
    from robaudit.attacks.pgd import PGD
    from robaudit.attacks.rays import RayS
    from robaudit.attacks.simba import SimBA
    from robaudit.attacks.spatial import SpatialGrid
    from robaudit.attacks.square import Square
    from robaudit.attacks.transfer import Transfer

    return {
        "fgsm": (FGSM, {}),
        "pgd": (PGD, {}),
        "bim": (PGD, {"random_init": False}),
        "apgd-ce": (APGD, {"loss": "ce"}),
        "apgd-dlr": (APGD, {"loss": "dlr"}),
        "apgd-t": (APGDTargeted, {}),
        "fmn": (FMN, {}),
        "deepfool": (DeepFool, {}),
        "fab-t": (FABTargeted, {}),
        "square": (Square, {}),
        "simba": (SimBA, {}),
        "noise": (Noise, {}),
        "spatial-grid": (SpatialGrid, {}),
        "hsj": (HopSkipJump, {}),
        "rays": (RayS, {}),
        "transfer": (Transfer, {}),
    }


ATTACK_NAMES = (
    "fgsm", "pgd", "bim", "apgd-ce", "apgd-dlr", "apgd-t", "fmn", "deepfool", "fab-t", "square", "simba", "noise", "spatial-grid",
    "hsj", "rays", "transfer",
)  # fmt: skip
# Attacks that never use the model's gradients: what they find, white-box attacks missed.
GRADIENT_FREE = ("square", "simba", "noise", "spatial-grid", "hsj", "rays", "transfer")

# Margin shares (best candidate's margin / clean margin) below which `standard` spends more:
# AutoAttack's other 6 targets, then fresh random starts, then more of them right at the
# boundary (docs/attacks.md, docs/benchmarks.md).
CLOSE_TARGETS = 0.3
CLOSE_RESTARTS = 0.1
CLOSE_EDGE = 0.03


def white_box(steps: int) -> list[Spec]:
    """The white-box core of `standard` (50 steps) and of `thorough` (50, then 100): see "standard" below."""
    return [
        {"attack": "apgd-ce", "steps": steps},
        {"attack": "apgd-t", "steps": steps, "n_targets": 3, "ranking": "linear"},
        {"attack": "apgd-ce", "steps": steps, "start": "warm", "near": 1.5},
        {"attack": "apgd-t", "steps": steps, "n_targets": 6, "skip_targets": 3, "ranking": "linear", "close": CLOSE_TARGETS},
        {"attack": "apgd-ce", "steps": steps, "restarts": 2, "close": CLOSE_RESTARTS, "stalled": False},
        {"attack": "apgd-t", "steps": steps, "n_targets": 9, "ranking": "linear", "close": CLOSE_RESTARTS, "stalled": False},
        {"attack": "apgd-ce", "steps": steps, "restarts": 4, "close": CLOSE_EDGE, "stalled": False},
        {"attack": "apgd-t", "steps": steps, "n_targets": 3, "ranking": "linear", "restarts": 2, "close": CLOSE_EDGE, "stalled": False},
        {"attack": "apgd-dlr", "steps": steps, "restarts": 2, "close": CLOSE_EDGE, "stalled": False},
    ]


STANDARD_STEPS = 50  # APGD steps per run in `standard`: half of AutoAttack's 100 (docs/benchmarks.md)
STANDARD_WHITE_BOX: list[Spec] = white_box(STANDARD_STEPS)

PRESETS: dict[str, list[Spec]] = {
    # A fast screen: one gradient step, then a short APGD on what survives.
    "quick": [
        {"attack": "fgsm"},
        {"attack": "apgd-ce", "steps": 50},
        {"attack": "spatial-grid", "rotations": 11, "shifts": 3},
    ],
    # AutoAttack "standard" strength at a sixth of its model passes (docs/attacks.md,
    # docs/benchmarks.md). Every robust point gets APGD-CE, APGD-T on the 3 targets nearest
    # by a linear estimate of the distance to each class (MALT), both 50 steps, and a
    # 100-query Square probe. Where those attacks came close (their best point kept at most
    # 30% of the clean margin z_y - max z_j) or barely moved the margin (75% or more left),
    # APGD-T runs on AutoAttack's other 6 targets; near the boundary (10%), where the random
    # start decides, APGD-CE gets 2 and APGD-T 1 fresh start(s), and right at it (3%)
    # APGD-CE 4, APGD-T on the 3 nearest targets 2 and APGD-DLR 2 more; those starts skip
    # the barely-moved points (`stalled = false`). Points the minimal-norm stage (FMN, which also gives
    # the accuracy-versus-eps curve) found within 1.5 eps get APGD-CE started at FMN's
    # point. Square runs its other 4900 queries only where the probe broke a point the
    # white-box attacks missed (evidence of gradient masking).
    "standard": [
        {"attack": "fmn", "steps": 100},
        # Under L1, FMN's dense steps miss the one- or two-pixel perturbations that AutoAttack's
        # FAB-T finds; DeepFool's linearized L1 step (the largest-gradient pixels first) finds them.
        {"attack": "deepfool", "norms": ["l1"]},
        *STANDARD_WHITE_BOX,
        # AutoAttack's FAB-T, under L1 only (50 steps, 3 targets by logit): one- and two-pixel examples
        # that the APGD runs miss (hunts 20 and 22).
        {"attack": "fab-t", "steps": 50, "n_targets": 3, "norms": ["l1"]},
        {"attack": "square", "n_queries": 5000, "probe_queries": 100},
        # Only spatial threats (spatial:DEG,PX) run it; Engstrom et al.'s 31 x 5 x 5 grid.
        {"attack": "spatial-grid", "rotations": 31, "shifts": 5},
    ],
    # AutoAttack "standard" as published (Croce & Hein 2020), budgets included: APGD-CE
    # (100 steps, one start), APGD-T (100 steps, 9 targets), FAB-T's slot filled by FMN
    # (100 steps; robaudit has no FAB) and Square with its full 5000 queries on every point
    # still robust. Under L1, AutoAttack's L1 attacks and budgets: APGD-CE with 5 starts,
    # APGD-T on 5 targets (both L1-APGD), FAB-T (100 steps, 9 targets); Square has no L1
    # version here. For figures comparable with AutoAttack / RobustBench (with --first N).
    "autoattack": [
        {"attack": "apgd-ce", "steps": 100, "norms": ["linf", "l2"]},
        {"attack": "apgd-ce", "steps": 100, "restarts": 5, "norms": ["l1"]},
        {"attack": "apgd-t", "steps": 100, "n_targets": 9, "norms": ["linf", "l2"]},
        {"attack": "apgd-t", "steps": 100, "n_targets": 5, "norms": ["l1"]},
        {"attack": "fmn", "steps": 100},
        {"attack": "fab-t", "steps": 100, "n_targets": 9, "norms": ["l1"]},
        {"attack": "square", "n_queries": 5000},
        {"attack": "spatial-grid", "rotations": 31, "shifts": 5},
    ],
    # The strongest setting: `standard`'s attacks first, the same core again at 100 steps,
    # then AutoAttack's own (APGD-CE, APGD-T on all 9 targets by logit, full Square) with
    # many restarts on every robust point, a PGD step-size grid, both DLR forms, more
    # queries, two minimal-norm attacks.
    "thorough": [
        {"attack": "fmn", "steps": 300},
        {"attack": "deepfool"},
        {"attack": "fgsm"},
        *STANDARD_WHITE_BOX,
        *white_box(100),
        {"attack": "apgd-ce", "steps": 200, "restarts": 5},
        {"attack": "apgd-dlr", "steps": 200, "restarts": 5},
        {"attack": "pgd", "steps": 200, "step_size": 0.01, "restarts": 3},
        {"attack": "pgd", "steps": 200, "step_size": 0.025, "restarts": 3},
        {"attack": "pgd", "steps": 200, "step_size": 0.1, "restarts": 3},
        {"attack": "apgd-t", "steps": 200, "n_targets": 9, "restarts": 2},
        {"attack": "apgd-t", "steps": 200, "n_targets": 9, "ranking": "linear"},
        {"attack": "fab-t", "steps": 100, "n_targets": 9, "norms": ["l1"]},
        {"attack": "square", "n_queries": 10000, "restarts": 2},
        {"attack": "simba"},
        {"attack": "spatial-grid", "rotations": 61, "shifts": 9},
    ],
}
DEFAULT_PRESET = "standard"

# Randomized models (robaudit.models.randomized): AutoAttack's "rand" version, APGD-CE and
# APGD-DLR on EOT gradients, replaces a preset's Lp attacks; `eot` draws per gradient.
RANDOMIZED: dict[str, dict[str, Any]] = {
    "quick": {"eot": 5, "attacks": [{"attack": "apgd-ce", "steps": 50}, {"attack": "apgd-dlr", "steps": 50}]},
    "standard": {"eot": 20, "attacks": [{"attack": "apgd-ce", "steps": 100}, {"attack": "apgd-dlr", "steps": 100}]},
    "thorough": {
        "eot": 20,
        "attacks": [{"attack": "apgd-ce", "steps": 200, "restarts": 2}, {"attack": "apgd-dlr", "steps": 200, "restarts": 2}],
    },
}
REPEATS = 10  # draws per prediction of a randomized model; the worst one counts

# Gradient masking found (robaudit.stages.trust): attacks no masking of gradients or scores
# can stop, run on every point still robust, in every preset: a scale-invariant white-box
# loss, transfer attacks from the BPDA surrogate (untargeted, then APGD-T on its nearest
# classes), Square (score-based) and a decision-based attack (RayS for Linf, HopSkipJump
# for L2: labels only).
ADAPTIVE: dict[str, list[Spec]] = {
    "quick": [
        {"attack": "apgd-dlr", "steps": 50},
        {"attack": "transfer", "steps": 50},
        {"attack": "transfer", "steps": 50, "targets": 3},
        {"attack": "square", "n_queries": 1000},
        {"attack": "rays", "max_queries": 1000},
        {"attack": "hsj", "max_queries": 1000},
    ],
    "standard": [
        {"attack": "apgd-dlr", "steps": 100},
        {"attack": "transfer", "steps": 100},
        {"attack": "transfer", "steps": 100, "targets": 9},
        {"attack": "square", "n_queries": 5000},
        {"attack": "rays", "max_queries": 5000},
        {"attack": "hsj", "max_queries": 5000},
    ],
    "thorough": [
        {"attack": "apgd-dlr", "steps": 200},
        {"attack": "transfer", "steps": 200},
        {"attack": "transfer", "steps": 200, "targets": 9},
        {"attack": "square", "n_queries": 10000},
        {"attack": "rays", "max_queries": 10000},
        {"attack": "hsj", "max_queries": 10000},
    ],
}


def _accepts(cls: type[Attack], key: str) -> bool:
    return key in inspect.signature(cls.__init__).parameters


# Parameters that may be 0 (no targets skipped, no bisection, no overshoot); every other one is at least 1 (counts) or above 0.
_MAY_BE_ZERO = {"skip_targets", "targets", "search_steps", "init_tries", "start_candidates", "overshoot", "gamma_final"}


def _parameters(cls: type[Attack]) -> dict[str, inspect.Parameter]:
    """The parameters a user may set for an attack class (not `self`, not internal objects such as a surrogate)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {
        p.name: p for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and "Module" not in str(p.annotation)
    }  # fmt: skip


def _check_parameter(name: str, key: str, value: Any, param: inspect.Parameter) -> None:
    """A one-line error for a value of the wrong type, not finite, or not positive (a wrong number otherwise)."""
    kind = str(param.annotation) if param.default is None else type(param.default).__name__
    floor = 0 if key in _MAY_BE_ZERO else None
    if "bool" in kind:
        if not isinstance(value, bool):
            raise RobauditError(f"attack '{name}': {key} must be true or false, not {value!r}")
    elif "int" in kind:
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if floor is None else 0):
            least = "a positive integer" if floor is None else "an integer of at least 0"
            raise RobauditError(f"attack '{name}': {key} must be {least}, not {value!r}")
    elif "float" in kind:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value <= 0 if floor is None else value < 0
        ):  # fmt: skip
            least = "a positive finite number" if floor is None else "a finite number of at least 0"
            raise RobauditError(f"attack '{name}': {key} must be {least}, not {value!r}")
    elif "str" in kind and not isinstance(value, str):
        raise RobauditError(f"attack '{name}': {key} must be a string, not {value!r}")


def override(
    specs: list[Spec], *, steps: int | None = None, restarts: int | None = None, step_sizes: list[float] | None = None
) -> list[Spec]:
    """Apply command-line overrides to a battery (flags beat presets and files)."""
    factories = _factories()
    specs = copy.deepcopy(specs)
    for spec in specs:
        cls, _ = factories.get(spec.get("attack", ""), (None, None))
        if cls is None:
            continue
        if steps is not None and _accepts(cls, "steps"):
            spec["steps"] = steps
        if restarts is not None and cls.randomized:
            spec["restarts"] = restarts
    if step_sizes:
        base = {"steps": steps or 100, "restarts": restarts or 1}
        specs.extend({"attack": "pgd", "step_size": float(s), **base} for s in step_sizes)
    return specs


def _label(spec: Spec, seen: dict[str, int]) -> str:
    name = spec["attack"]
    if name == "pgd" and "step_size" in spec:
        name = f"pgd[step={spec['step_size']:g}eps]"
    seen[name] = seen.get(name, 0) + 1
    return name if seen[name] == 1 else f"{name}#{seen[name]}"


RUN_KEYS = ("attack", "restarts", "near", "close", "stalled", "norms")  # keys of an entry that are not attack parameters


def build_battery(specs: list[Spec]) -> list[AttackRun]:
    """Construct the attacks, with a one-line error for unknown names or parameters."""
    factories = _factories()
    runs, seen = [], {}
    for spec in specs:
        if not isinstance(spec, dict) or "attack" not in spec:
            raise RobauditError(f"attack entry {spec!r} needs an 'attack' name (one of {', '.join(ATTACK_NAMES)})")
        params = {k: v for k, v in spec.items() if k not in RUN_KEYS}
        name = spec["attack"]
        if not isinstance(name, str) or name not in factories:
            raise RobauditError(f"unknown attack {name!r} (known: {', '.join(ATTACK_NAMES)})")
        cls, fixed = factories[name]
        allowed = {k: v for k, v in _parameters(cls).items() if k not in fixed}
        for key, value in params.items():
            if key in fixed:
                raise RobauditError(f"attack '{name}': {key} is fixed to {fixed[key]!r} for this attack")
            if key not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise RobauditError(
                    f"attack '{name}': unknown parameter '{key}' (its parameters: {known}; and for every attack: restarts, "
                    "near, close, stalled, norms)"
                )
            _check_parameter(name, key, value, allowed[key])
        restarts = spec.get("restarts", 1)
        if not isinstance(restarts, int) or restarts < 1:
            raise RobauditError(f"attack '{name}': restarts must be a positive integer, not {restarts!r}")
        try:
            attack = cls(**fixed, **params)
        except (TypeError, ValueError) as exc:
            raise RobauditError(f"attack '{name}': {exc}") from None
        near = spec.get("near")
        if near is not None and (isinstance(near, bool) or not isinstance(near, (int, float)) or not 1 <= near < math.inf):
            raise RobauditError(f"attack '{name}': near must be a number of at least 1 (a multiple of eps), not {near!r}")
        close = spec.get("close")
        if close is not None and (isinstance(close, bool) or not isinstance(close, (int, float)) or not 0 < close <= 1):
            raise RobauditError(f"attack '{name}': close must be a number in (0, 1] (a share of the clean margin), not {close!r}")
        stalled = spec.get("stalled", True)
        if not isinstance(stalled, bool):
            raise RobauditError(f"attack '{name}': stalled must be true or false, not {stalled!r}")
        if "stalled" in spec and close is None:
            raise RobauditError(f"attack '{name}': stalled only applies with close (it widens the close filter)")
        norms = spec.get("norms")
        if norms is not None and (
            not isinstance(norms, list) or not norms or not all(isinstance(v, str) and v in attack.norms for v in norms)
            or len(set(norms)) != len(norms)
        ):
            raise RobauditError(
                f"attack '{name}': norms must be a non-empty list of the norms it supports ({', '.join(attack.norms)}), "
                f"each once, not {norms!r}"
            )
        runs.append(
            AttackRun(
                attack, restarts=restarts, label=_label(spec, seen),
                near=None if near is None else float(near), close=None if close is None else float(close), stalled=stalled,
                norms=None if norms is None else tuple(norms),
            )
        )  # fmt: skip
    if not runs:
        raise RobauditError("the battery is empty: name at least one attack")
    return runs


def preset_specs(name: str) -> list[Spec]:
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise RobauditError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})") from None


def read_config(path: Path) -> dict[str, Any]:
    """Read an audit TOML file (docs/attacks.md; the [gate] table: docs/ci.md); unknown keys are errors, not silently ignored."""
    raw = load_toml(path)
    known = {"preset", "attacks", "threats", "gate"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RobauditError(f"config file {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if "preset" in raw and not isinstance(raw["preset"], str):
        raise RobauditError(f"config file {path}: 'preset' must be a string such as \"standard\" (known: {', '.join(PRESETS)})")
    if "preset" in raw:
        preset_specs(raw["preset"])  # an unknown name fails here, before any attack
    if "attacks" in raw and not (isinstance(raw["attacks"], list) and all(isinstance(a, dict) for a in raw["attacks"])):
        raise RobauditError(f"config file {path}: 'attacks' must be an array of tables ([[attacks]])")
    if "attacks" in raw:
        try:
            build_battery(raw["attacks"])  # checked even where --preset will override it: a broken file is an error
        except RobauditError as exc:
            raise RobauditError(f"config file {path}: {exc}") from None
    if "threats" in raw and not (
        isinstance(raw["threats"], list) and raw["threats"] and all(isinstance(t, str) for t in raw["threats"])
    ):  # fmt: skip
        raise RobauditError(f"config file {path}: 'threats' must be a non-empty list of strings such as \"linf:8/255\"")
    if "gate" in raw:  # thresholds and allowed drops (docs/ci.md), parsed into a GateSpec
        from robaudit.gate import parse_gate_table

        raw["gate"] = parse_gate_table(raw["gate"], path)
    return raw
