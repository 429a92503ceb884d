"""Attack strength and cost: robaudit's presets against AutoAttack "standard", over attack seeds.

The acceptance question this answers: on the digits zoo (5 models x 4 threats) plus four
third-party ONNX fixtures, over several attack seeds, is robaudit ``standard`` never
weaker than AutoAttack on any row, and at what fraction of AutoAttack's model passes;
and is robaudit ``thorough`` on every row at least as strong as ``standard`` and
AutoAttack together, and at what cost.

Rows (a model, its samples, a threat):

* the digits zoo (benchmarks/zoo.py), a stratified sample of robaudit's bundled digits
  test split (``--n``, sampled once with ``--seed``), threats ``--threats``;
* with ``--fixtures``: four models of ../shared/fixtures on the first ``--fixture-n``
  images of their data file, with the normalization the fixtures' README gives
  (mnistfc_256x2 linf:0.03 and colt_mnist_0.1 linf:0.1 on MNIST, oval21_cifar_base_kw
  and cifar10_resnet_2b linf:2/255 on CIFAR-10).

Tools (columns), each run once per attack seed (``--seeds``) on the same samples:

* ``robaudit:<preset>`` for every ``--presets`` entry, through the Python API
  (``robaudit.api.build_config`` + ``robaudit.scan.scan``, = ``robaudit.audit``) on the
  model file (zoo: safetensors + ``--arch``; fixtures: the ONNX file + ``--mean/--std``)
  with the already-sampled (x, y) tensors, so robaudit's ``seed`` moves only its
  attacks' randomness, never the samples (asserted for every run);
* the original AutoAttack (github.com/fra31/auto-attack), ``version='standard'``,
  ``seed=<attack seed>``, ``run_standard_evaluation(x, y, bs=250)``, on its own freshly
  loaded copy of the same pixel-space torch function (fixtures: loaded and wrapped the
  way robaudit loads them, ``robaudit.models.load_model`` + ``wrap_model``);
* optionally torchattacks' AutoAttack copy (``--tools ... torchattacks``).

Every tool's adversarial examples are re-checked with a fresh forward pass of an
independently loaded copy (the referee, never handed to a tool), a float64 norm check
and a box check; robust accuracy is what survives that check.

Passes are counted with ``robaudit.attacks.counting.CountingModel`` for AutoAttack and
torchattacks (every forward/backward they make, clean pass and sanity checks included).
For robaudit the table shows the report's ``summary.forward_passes_per_sample`` /
``backward_passes_per_sample`` (attacks only, minimal-norm stage included); the JSON also
holds an all-inclusive count (clean pass, model probing, trust checks and
re-verification included) taken with a global module hook, and the summary prints both
ratios.

AutoAttack results are cached (``--aa-cache``, default benchmarks/.aa_cache/), keyed by
model (zoo name + weights sha256, or fixture file sha256 + normalization), threat,
samples (indices and a pixel hash), attack seed, AutoAttack version + source hash and
batch size: a rerun that changes only robaudit does not rerun AutoAttack.

    pip install git+https://github.com/fra31/auto-attack   # the reference
    pip install torchattacks                              # optional, --tools to add it
    python benchmarks/vs_autoattack.py --n 200            # zoo, robaudit standard vs AutoAttack, seed 0
    python benchmarks/vs_autoattack.py --n 200 --models cnn mlp --threats linf:0.1
    python benchmarks/vs_autoattack.py --tools autoattack --n 200 --fixtures --seeds 0 1 2   # fill the cache
    python benchmarks/vs_autoattack.py --n 200 --fixtures --seeds 0 1 2 --presets standard thorough
    python benchmarks/vs_autoattack.py --fixtures-only --fixture-n 20 --seeds 0
    python benchmarks/vs_autoattack.py --fixtures-only --fixture-rows eran_mnist_relu_9_200=linf:0.015 --seeds 0 1 2

Exit status 1 when robaudit ``standard``'s robust accuracy is higher than AutoAttack's
on any row for any seed (robaudit found fewer adversarial examples: the acceptance
rule is that it never may), or when a tool crashed. The ``thorough`` check and the
cost goal (standard at most 0.17x AutoAttack's passes) are reported, not gated.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmark the robaudit of this checkout, installed or not
    sys.path.insert(0, str(ROOT))

from robaudit.api import build_config  # noqa: E402
from robaudit.attacks.counting import CountingModel  # noqa: E402
from robaudit.battery import PRESETS  # noqa: E402
from robaudit.data import load_data  # noqa: E402
from robaudit.models import load_model, wrap_model  # noqa: E402
from robaudit.scan import PROBE_SIZE, scan, sha256_of  # noqa: E402
from robaudit.threats import Threat, parse_threat, perturbation_norms  # noqa: E402

# The referee's slack beyond eps, for every tool alike: AutoAttack's float32 outputs land up to about 1e-7
# of eps outside the ball (robaudit's own verification allows none; its candidates are moved inside).
REFEREE_RTOL = 1e-5

DEFAULT_THREATS = ["linf:0.1", "linf:0.2", "l2:0.5", "l2:1.0"]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "vs_autoattack.json"
DEFAULT_CACHE = ROOT / "benchmarks" / ".aa_cache"
DEFAULT_FIXTURES = ROOT.parent / "shared" / "fixtures"
TOOLS = ("robaudit", "autoattack", "torchattacks")
AA, STANDARD, THOROUGH = "autoattack", "robaudit:standard", "robaudit:thorough"
PASSES_GOAL = 0.17  # robaudit standard's total passes as a fraction of AutoAttack's
BOX_TOL = 1e-6
EPS = 1e-12
# (fixture model, threat): the four third-party rows of the acceptance question
FIXTURE_ROWS = (
    ("mnistfc_256x2", "linf:0.03"),
    ("colt_mnist_0.1", "linf:0.1"),
    ("oval21_cifar_base_kw", "linf:2/255"),
    ("cifar10_resnet_2b", "linf:2/255"),
)
FIXTURE_DATA = {"MNIST": "data/mnist_test_first100.npz", "CIFAR-10": "data/cifar10_test_first100.npz"}


def _zoo():
    spec = importlib.util.spec_from_file_location("robaudit_bench_zoo", Path(__file__).resolve().parent / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _require(tools: list[str]) -> None:
    """Exit with an install hint when a third-party tool that was asked for is missing."""
    missing = []
    if "autoattack" in tools:
        try:
            import autoattack  # noqa: F401
        except ImportError:
            missing.append("AutoAttack (the reference): pip install git+https://github.com/fra31/auto-attack")
    if "torchattacks" in tools:
        try:
            import torchattacks  # noqa: F401
        except ImportError as exc:
            missing.append(f"torchattacks ({exc}): pip install torchattacks, or leave it out of --tools")
    if missing:
        sys.exit("vs_autoattack.py needs:\n  " + "\n  ".join(missing))


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One model and its samples: what every tool attacks (each through its own fresh copy)."""

    name: str
    source: str  # "zoo" or "fixture"
    threats: list[Threat]
    x: torch.Tensor  # float32 pixels in [0, 1], the same for every tool and seed
    y: torch.Tensor
    indices: list[int]  # positions in the source (digits test split / fixture data file)
    fresh: Callable[[], torch.nn.Module]  # a newly loaded pixel-space copy
    robaudit_model: Path  # the file robaudit scans
    robaudit_options: dict  # arch or mean/std: what the CLI would get as flags
    model_id: dict  # identifies the network in the AutoAttack cache key
    counted_class: str  # class-name prefix of the root module count_all_passes counts for robaudit
    meta: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Hash of the exact pixels and labels: the samples every tool and seed must share."""
        h = hashlib.sha256()
        h.update(self.x.contiguous().numpy().tobytes())
        h.update(self.y.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


def zoo_targets(zoo, zoo_dir: Path, names: list[str], threats: list[Threat], n: int | None, seed: int) -> list[Target]:
    """The digits zoo, all models on one stratified sample (drawn once, with the sampling seed)."""
    if not names:
        return []
    data = load_data("digits", n=n, seed=seed)
    x, y = data.x.to(torch.float32), data.y.to(torch.int64)
    targets = []
    for name in names:
        _, weights, meta = zoo.load(name, zoo_dir, log=lambda m: print(m, file=sys.stderr))
        targets.append(Target(
            name=name, source="zoo", threats=threats, x=x, y=y, indices=[int(i) for i in data.indices],
            fresh=lambda name=name: zoo.load(name, zoo_dir, log=lambda m: None)[0],
            robaudit_model=weights, robaudit_options={"arch": meta["arch"]},
            model_id={"model": name, "weights_sha256": sha256_of(weights)}, counted_class="Zoo",
            meta={k: meta[k] for k in ("arch", "test_accuracy", "recipe")},
        ))  # fmt: skip
    return targets


def _norm(values: list[float], neutral: float) -> list[float] | None:
    """The README's mean/std as robaudit's --mean/--std, None where it is no normalization at all."""
    return None if list(values) == [neutral] else [float(v) for v in values]


def load_fixture(path: Path, probe: torch.Tensor, mean: list[float] | None, std: list[float] | None) -> torch.nn.Module:
    """An ONNX fixture as the pixel-space function robaudit attacks (its loader, normalization and reshape)."""
    raw = load_model(path)
    model, _ = wrap_model(raw, sample_shape=tuple(probe.shape[1:]), probe=probe, mean=mean, std=std, device="cpu")
    return model.eval()


def fixture_targets(root: Path, n: int, rows: tuple[tuple[str, str], ...] = FIXTURE_ROWS) -> list[Target]:
    """The third-party rows (default the four of the acceptance question), or none (with a
    message) when the fixtures folder is absent."""
    if not (root / "manifest.json").is_file():
        print(f"fixtures folder {root} is missing (or has no manifest.json): skipping the fixture rows", file=sys.stderr)
        return []
    manifest = json.loads((root / "manifest.json").read_text())["models"]
    targets = []
    for name, spec in rows:
        entry = manifest[name]
        path = root / entry["file"]
        data_file = root / FIXTURE_DATA[entry["dataset"]]
        with np.load(data_file) as npz:
            x = torch.from_numpy(np.asarray(npz["x"][:n], dtype=np.float32))
            y = torch.from_numpy(np.asarray(npz["y"][:n], dtype=np.int64))
        mean, std = _norm(entry["mean"], 0.0), _norm(entry["std"], 1.0)
        options = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        probe = x[:PROBE_SIZE].clone()
        targets.append(Target(
            name=name, source="fixture", threats=[parse_threat(spec)], x=x, y=y, indices=list(range(len(y))),
            fresh=lambda path=path, probe=probe, mean=mean, std=std: load_fixture(path, probe, mean, std),
            robaudit_model=path, robaudit_options=options,
            model_id={"model": name, "file_sha256": sha256_of(path), "mean": mean, "std": std},
            counted_class="AuditModel",
            meta={"file": entry["file"], "data": FIXTURE_DATA[entry["dataset"]], "data_sha256": sha256_of(data_file),
                  "mean": entry["mean"], "std": entry["std"], "input_shape": entry["input_shape"],
                  "readme_clean_accuracy_first100": entry.get("clean_accuracy_first100")},
        ))  # fmt: skip
    return targets


# --------------------------------------------------------------------------- checks


@torch.no_grad()
def verify(model: torch.nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, threat: Threat) -> dict:
    """Independent check of adversarial candidates (rows where the tool claims success or changed x).

    Returns per-sample ``fooled`` (misclassified, in the ball, in the box) and counts of
    rows that are misclassified but violate the ball or the box.
    """
    x_adv = x_adv.detach().to(torch.float32).cpu()
    pred = model(x_adv).argmax(1)
    size = perturbation_norms(x_adv.double() - x.double(), threat.norm)
    in_ball = size <= threat.eps * (1 + REFEREE_RTOL)
    flat = x_adv.flatten(1)
    in_box = (flat >= -BOX_TOL).all(1) & (flat <= 1 + BOX_TOL).all(1) & torch.isfinite(flat).all(1)
    wrong = pred != y
    return {
        "fooled": wrong & in_ball & in_box,
        "outside_ball": int((wrong & ~in_ball).sum()),
        "outside_box": int((wrong & ~in_box).sum()),
        "max_norm": float(size.max()) if len(size) else 0.0,
    }


@contextlib.contextmanager
def count_all_passes(prefix: str) -> Iterator[dict]:
    """Count every forward/backward of the root network (class name starting with `prefix`), whoever makes it.

    Zoo networks are classes named Zoo*; for an ONNX fixture the root is robaudit's
    AuditModel (one call = one pass of the whole graph, however it batches inside).
    """
    tally = {"forwards": 0, "backwards": 0}

    def hook(module, inputs, output):
        if type(module).__name__.startswith(prefix) and isinstance(output, torch.Tensor):
            batch = int(inputs[0].shape[0])
            tally["forwards"] += batch
            if output.requires_grad:
                output.register_hook(lambda grad: tally.__setitem__("backwards", tally["backwards"] + batch))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield tally
    finally:
        handle.remove()


# --------------------------------------------------------------------------- tools


def run_robaudit(referee: torch.nn.Module, target: Target, threat: Threat, preset: str, seed: int) -> dict:
    """robaudit `preset` on the target's file and samples; `seed` moves only the attacks (the samples are given)."""
    x, y = target.x, target.y
    config = build_config(
        target.robaudit_model, (x, y), threats=[threat], preset=preset, seed=seed, device="cpu",
        keep_adversarial=True, **target.robaudit_options,
    )  # fmt: skip
    with count_all_passes(target.counted_class) as tally:
        start = time.perf_counter()
        result = scan(config)
        seconds = time.perf_counter() - start
    assert torch.equal(result.data.y, y) and torch.equal(result.data.x, x), "robaudit attacked other samples"
    summary = result.report.summary
    outcome = result.outcomes[0]
    with torch.no_grad():
        clean = referee(x).argmax(1) == y
    # Independent re-verification of every adversarial example robaudit claims.
    idx = torch.nonzero(outcome.broken).flatten()
    check = verify(referee, outcome.x_adv[idx], x[idx], y[idx], threat)
    confirmed = torch.zeros(len(y), dtype=torch.bool)
    confirmed[idx[check["fooled"]]] = True
    robust = clean & ~confirmed
    threat_summary = summary.threats[0]
    return {
        "robust_accuracy": _fraction(robust),
        "reported_robust_accuracy": threat_summary.robust_accuracy,
        "reported_clean_accuracy": summary.clean_accuracy,
        "claimed_broken": len(idx),
        "reverify_failures": int(len(idx) - int(check["fooled"].sum())),
        "reverify_max_norm": check["max_norm"],
        "forward_passes_per_sample": summary.forward_passes_per_sample,
        "backward_passes_per_sample": summary.backward_passes_per_sample,
        "all_forward_passes_per_sample": tally["forwards"] / len(y),
        "all_backward_passes_per_sample": tally["backwards"] / len(y),
        "seconds": seconds,
        "stages": {
            **{
                f"minimal:{m.norm}": {d.name: {"broke": d.broke, "fwd": d.forward_passes, "bwd": d.backward_passes}
                                      for d in m.attack_details}
                for m in summary.minimal_norm
            },
            threat_summary.threat: {
                d.name: {"broke": d.broke, "robust_after": d.robust_accuracy_after, "fwd": d.forward_passes,
                         "bwd": d.backward_passes, **({"skipped": d.skipped} if d.skipped else {})}
                for d in threat_summary.attack_details
            },
        },  # fmt: skip
        "_robust": robust,
    }


def run_autoattack(referee: torch.nn.Module, model: torch.nn.Module, threat: Threat, x, y, seed: int, bs: int) -> dict:
    """AutoAttack on `model` (a private copy); `referee` (never handed to a tool) re-checks the result."""
    from autoattack import AutoAttack

    counted = CountingModel(model).eval()
    norm = {"linf": "Linf", "l2": "L2", "l1": "L1"}[threat.norm]
    # Defaults of the reference implementation; device='cpu' because its default is 'cuda',
    # verbose=False only silences its log lines.
    adversary = AutoAttack(counted, norm=norm, eps=threat.eps, version="standard", seed=seed, device="cpu", verbose=False)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        x_adv = adversary.run_standard_evaluation(x.clone(), y.clone(), bs=bs)
    seconds = time.perf_counter() - start
    return _finish(referee, counted, threat, x, y, x_adv, seconds, log.getvalue())


def run_torchattacks(referee: torch.nn.Module, model: torch.nn.Module, threat: Threat, x, y, seed: int, bs: int) -> dict:
    """torchattacks on `model` (a private copy; torchattacks switches train/eval modes); `referee` re-checks."""
    import torchattacks

    # eval() before wrapping: torchattacks restores the mode it found on the wrapper
    # afterwards, and a fresh nn.Module wrapper is in training mode.
    counted = CountingModel(model).eval()
    norm = {"linf": "Linf", "l2": "L2"}[threat.norm]
    n_classes = int(referee(x[:1]).shape[1])
    attack = torchattacks.AutoAttack(counted, norm=norm, eps=threat.eps, version="standard", n_classes=n_classes, seed=seed)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        x_adv = torch.cat([attack(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)])
    seconds = time.perf_counter() - start
    return _finish(referee, counted, threat, x, y, x_adv, seconds, log.getvalue())


def _fraction(mask: torch.Tensor) -> float:
    return int(mask.sum()) / len(mask)


@torch.no_grad()
def _finish(model, counted, threat, x, y, x_adv, seconds, log) -> dict:
    clean = model(x).argmax(1) == y
    check = verify(model, x_adv, x, y, threat)
    robust = clean & ~check["fooled"]
    return {
        "robust_accuracy": _fraction(robust),
        "invalid_outside_ball": check["outside_ball"],
        "invalid_outside_box": check["outside_box"],
        "max_norm": check["max_norm"],
        "forward_passes_per_sample": counted.forwards / len(y),
        "backward_passes_per_sample": counted.backwards / len(y),
        "seconds": seconds,
        "left_model_in_training_mode": counted.model.training,
        **({"log": log[-2000:]} if log.strip() else {}),
        "_robust": robust,
    }


# --------------------------------------------------------------------------- AutoAttack cache


def autoattack_identity() -> dict:
    """Version and a hash of the installed AutoAttack's source: a changed AutoAttack must not hit old entries."""
    import autoattack

    folder = Path(autoattack.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"version": _version("autoattack"), "source_sha256": h.hexdigest()[:16]}


class AutoAttackCache:
    """AutoAttack's per-sample outcome, re-verification figures, passes and seconds, one JSON file per run.

    AutoAttack is the fixed reference and by far the slowest part; caching it lets a run
    that changes only robaudit compare against the same AutoAttack results in minutes.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.identity = autoattack_identity() if folder is not None else {}

    def key(self, target: Target, threat: Threat, seed: int, bs: int) -> dict:
        return {
            "tool": "autoattack",
            "autoattack": self.identity,
            **target.model_id,
            "threat": threat.canonical,
            "eps": repr(threat.eps),
            "n": len(target.y),
            "indices_sha256": hashlib.sha256(json.dumps(target.indices).encode()).hexdigest()[:16],
            "samples_sha256": target.digest[:16],
            "attack_seed": seed,
            "bs": bs,
        }

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        threat = key["threat"].replace(":", "-").replace("/", "_")
        return self.folder / f"{key['model']}__{threat}__n{key['n']}__s{key['attack_seed']}__{digest}.json"

    def get(self, key: dict) -> dict | None:
        if self.folder is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        entry = json.loads(path.read_text())
        if entry.get("key") != key:  # a hash collision or a hand-edited file: not this run
            return None
        result = dict(entry["result"])
        result["_robust"] = torch.tensor([bool(v) for v in result.pop("robust_mask")])
        result["cached"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        return result

    def put(self, key: dict, result: dict, threads: int) -> None:
        if self.folder is None:
            return
        plain = {k: v for k, v in result.items() if not k.startswith("_")}
        plain["robust_mask"] = [int(v) for v in result["_robust"].tolist()]
        entry = {
            "key": key,
            "result": plain,
            "environment": {"torch": torch.__version__, "threads": threads, "cpu": _cpu_name(),
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        }  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, indent=1) + "\n")
        tmp.replace(path)  # atomic: a killed fill never leaves half an entry


# --------------------------------------------------------------------------- comparison


def compare_seed(per: dict) -> None:
    """One seed of one row: standard vs AutoAttack, thorough vs both, and the per-sample disagreement."""
    tools = per["tools"]
    aa = tools.get(AA)
    per["broken_only_by_autoattack"], per["broken_only_by_tool"] = {}, {}
    for tool, r in tools.items():
        if tool == AA or aa is None:
            continue
        aa_only = torch.nonzero(r["_robust"] & ~aa["_robust"]).flatten().tolist()  # AutoAttack broke, this tool did not
        tool_only = torch.nonzero(aa["_robust"] & ~r["_robust"]).flatten().tolist()
        per["broken_only_by_autoattack"][tool] = {"count": len(aa_only), "positions": aa_only}
        per["broken_only_by_tool"][tool] = {"count": len(tool_only), "positions": tool_only}
    std = tools.get(STANDARD)
    if std is not None and aa is not None:
        diff = std["robust_accuracy"] - aa["robust_accuracy"]
        per["standard_minus_autoattack"] = diff
        per["standard_weaker"] = diff > EPS
    th = tools.get(THOROUGH)
    refs = [t for t in (STANDARD, AA) if t in tools]
    if th is not None and refs:
        both = torch.stack([tools[t]["_robust"] for t in refs]).all(0)  # robust under every reference tool
        missed = torch.nonzero(th["_robust"] & ~both).flatten().tolist()
        per["thorough_check"] = {
            "reference": " & ".join(refs),
            "reference_robust_accuracy": _fraction(both),
            "thorough_robust_accuracy": th["robust_accuracy"],
            "ok": th["robust_accuracy"] <= _fraction(both) + EPS,
            "missed_count": len(missed),  # broken by a reference tool, not by thorough
            "missed_positions": missed,
        }
    problems = []
    for tool, r in tools.items():
        if r.get("reverify_failures"):
            problems.append(f"{r['reverify_failures']} {tool} examples FAILED re-verification")
        if tool.startswith("robaudit:") and (
            abs(r["reported_robust_accuracy"] - r["robust_accuracy"]) > EPS
            or abs(r["reported_clean_accuracy"] - per["clean_accuracy"]) > EPS
        ):
            problems.append(f"{tool}'s report disagrees with the re-check")
        if r.get("invalid_outside_ball") or r.get("invalid_outside_box"):
            problems.append(f"{tool} returned misclassified points outside the ball/box")
    if problems:
        per["problems"] = problems


def summarize_row(row: dict, columns: list[str]) -> None:
    """Means over seeds per tool, the standard and thorough checks over seeds, and the row's verdict."""
    seeds = row["seeds"]
    row["mean"] = {}
    for tool in columns:
        got = [p["tools"][tool] for p in seeds if tool in p["tools"]]
        if not got:
            continue
        mean = lambda k: sum(r[k] for r in got) / len(got)  # noqa: E731
        row["mean"][tool] = {
            "seeds": len(got),
            "robust_accuracy_per_seed": {str(p["seed"]): p["tools"][tool]["robust_accuracy"]
                                         for p in seeds if tool in p["tools"]},
            "robust_accuracy": mean("robust_accuracy"),
            "forward_passes_per_sample": mean("forward_passes_per_sample"),
            "backward_passes_per_sample": mean("backward_passes_per_sample"),
            "seconds": mean("seconds"),
            **({"all_forward_passes_per_sample": mean("all_forward_passes_per_sample"),
                "all_backward_passes_per_sample": mean("all_backward_passes_per_sample")}
               if "all_forward_passes_per_sample" in got[0] else {}),
        }  # fmt: skip
    verdict = []
    paired = [p for p in seeds if "standard_weaker" in p]
    if paired:
        weaker = [p for p in paired if p["standard_weaker"]]
        row["standard_weaker_seeds"] = [p["seed"] for p in weaker]
        std_ra = [p["tools"][STANDARD]["robust_accuracy"] for p in paired]
        aa_ra = [p["tools"][AA]["robust_accuracy"] for p in paired]
        row["standard_worst_case"] = {  # information: robaudit's luckiest-for-the-model seed vs AutoAttack's best
            "max_standard_robust_accuracy": max(std_ra),
            "min_autoattack_robust_accuracy": min(aa_ra),
            "difference": max(std_ra) - min(aa_ra),
        }
        if weaker:
            worst = max(weaker, key=lambda p: p["standard_minus_autoattack"])
            verdict.append(f"WEAKER on seed(s) {','.join(str(p['seed']) for p in weaker)} "
                           f"(up to {100 * worst['standard_minus_autoattack']:.1f} pt)")  # fmt: skip
        else:
            verdict.append("ok")
        only = [p["broken_only_by_autoattack"][STANDARD]["count"] for p in paired]
        if any(only):
            verdict[-1] += f" (AA-only {'/'.join(map(str, only))})"
    checked = [p for p in seeds if "thorough_check" in p]
    if checked:
        bad = [p for p in checked if not p["thorough_check"]["ok"]]
        row["thorough_failed_seeds"] = [p["seed"] for p in bad]
        verdict.append("thorough ok" if not bad else f"thorough MISSES on seed(s) {','.join(str(p['seed']) for p in bad)}")
    problems = sorted({m for p in seeds for m in p.get("problems", [])})
    verdict += problems
    row["verdict"] = "; ".join(verdict) if verdict else "-"


def _passes(r: dict, inclusive: bool = False) -> float:
    if inclusive and "all_forward_passes_per_sample" in r:
        return r["all_forward_passes_per_sample"] + r["all_backward_passes_per_sample"]
    return r["forward_passes_per_sample"] + r["backward_passes_per_sample"]


def totals(rows: list[dict], columns: list[str], seeds: list[int]) -> dict:
    """Passes per sample summed over rows (mean over seeds), only over rows where every tool ran every seed."""
    complete = [r for r in rows if all(r["mean"].get(t, {}).get("seeds") == len(seeds) for t in columns)]
    out: dict = {"rows": len(complete), "rows_left_out": [f"{r['model']} {r['threat']}" for r in rows if r not in complete]}
    for tool in columns:
        got = [r["mean"][tool] for r in complete]
        if not got:
            continue
        out[tool] = {
            "forward_passes_per_sample": sum(r["forward_passes_per_sample"] for r in got),
            "backward_passes_per_sample": sum(r["backward_passes_per_sample"] for r in got),
            "seconds": sum(r["seconds"] for r in got),
        }
        if "all_forward_passes_per_sample" in got[0]:
            out[tool]["all_forward_passes_per_sample"] = sum(r["all_forward_passes_per_sample"] for r in got)
            out[tool]["all_backward_passes_per_sample"] = sum(r["all_backward_passes_per_sample"] for r in got)
    if AA in out:
        aa = out[AA]
        for tool in columns:
            if tool == AA or tool not in out:
                continue
            r = out[tool]
            out[f"ratio_{tool}_over_autoattack"] = {
                "passes": _passes(r) / max(_passes(aa), EPS),
                "passes_all_inclusive": _passes(r, inclusive=True) / max(_passes(aa), EPS),
                "forward_passes": r["forward_passes_per_sample"] / max(aa["forward_passes_per_sample"], EPS),
                "backward_passes": r["backward_passes_per_sample"] / max(aa["backward_passes_per_sample"], EPS),
                "wall_time": r["seconds"] / max(aa["seconds"], EPS),
            }
    return out


# --------------------------------------------------------------------------- report


def _short(tool: str) -> str:
    return {AA: "AutoAttack"}.get(tool, tool.removeprefix("robaudit:"))


def table(rows: list[dict], columns: list[str], seeds: list[int]) -> str:
    """Markdown: robust accuracy per seed, passes (mean over seeds), passes ratio, AA-only per seed, verdict."""
    ra_cols = [f"{_short(t)} RA % (seeds {','.join(map(str, seeds))})" for t in columns]
    pass_cols = [f"{_short(t)} passes f+b" for t in columns]
    ratio_cols = [f"{_short(t)}/AA" for t in columns if t != AA and AA in columns]
    only_cols = [f"AA-only vs {_short(t)}" for t in columns if t != AA and AA in columns]
    head = ["model", "threat", "n", "clean %", *ra_cols, *pass_cols, *ratio_cols, *only_cols, "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 3) + ["---"]) + "|"]
    for row in rows:
        cells = [row["model"], row["threat"], str(row["n"]), f"{100 * row['clean_accuracy']:.1f}"]
        for tool in columns:
            per = [p["tools"].get(tool) for p in row["seeds"]]
            cells.append(" / ".join("-" if r is None else f"{100 * r['robust_accuracy']:.1f}" for r in per))
        for tool in columns:
            m = row["mean"].get(tool)
            cells.append("-" if m is None else f"{m['forward_passes_per_sample']:.0f}+{m['backward_passes_per_sample']:.0f}")
        aa = row["mean"].get(AA)
        for tool in columns:
            if tool == AA or AA not in columns:
                continue
            m = row["mean"].get(tool)
            cells.append("-" if m is None or aa is None or not _passes(aa) else f"{_passes(m) / _passes(aa):.3f}x")
        for tool in columns:
            if tool == AA or AA not in columns:
                continue
            counts = [p.get("broken_only_by_autoattack", {}).get(tool, {}).get("count") for p in row["seeds"]]
            cells.append("/".join("-" if c is None else str(c) for c in counts))
        cells.append(row["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    """The answer to the acceptance question, in a few lines."""
    t, rows = result["totals"], result["rows"]
    lines = [f"\nTotals over {t['rows']} complete rows (passes per sample summed over rows, mean over seeds "
             f"{', '.join(map(str, result['attack_seeds']))}):"]  # fmt: skip
    if t["rows_left_out"]:
        lines.append(f"  left out (a tool or seed missing): {'; '.join(t['rows_left_out'])}")
    for tool in result["tools"]:
        if tool not in t:
            continue
        r = t[tool]
        fwd, bwd = r["forward_passes_per_sample"], r["backward_passes_per_sample"]
        line = f"  {tool:18s} {fwd:.0f} + {bwd:.0f} = {_passes(r):.0f} passes, {r['seconds']:.0f} s"
        ratio = t.get(f"ratio_{tool}_over_autoattack")
        if ratio:
            line += (f"  -> {ratio['passes']:.3f}x AutoAttack's passes "
                     f"(all-inclusive count {ratio['passes_all_inclusive']:.3f}x; fwd {ratio['forward_passes']:.3f}x, "
                     f"bwd {ratio['backward_passes']:.3f}x; wall {ratio['wall_time']:.2f}x)")  # fmt: skip
            if tool == STANDARD:
                line += f" [goal <= {PASSES_GOAL}: {'met' if ratio['passes'] <= PASSES_GOAL else 'NOT met'}]"
        lines.append(line)
    if STANDARD in result["tools"] and AA in result["tools"]:
        weaker = result["standard_weaker_than_autoattack"]
        lines.append("standard never weaker than AutoAttack (seed by seed): "
                     + ("yes" if not weaker else f"NO: {'; '.join(weaker)}"))  # fmt: skip
        worst = [f"{r['model']} {r['threat']} (+{100 * r['standard_worst_case']['difference']:.1f} pt)"
                 for r in rows if r.get("standard_worst_case", {}).get("difference", 0) > EPS]  # fmt: skip
        lines.append("  worst case over seeds (max standard RA vs min AutoAttack RA), information only: "
                     + ("never above" if not worst else "; ".join(worst)))  # fmt: skip
    if THOROUGH in result["tools"]:
        bad = result["thorough_weaker_than_reference"]
        lines.append("thorough at least as strong as standard and AutoAttack together: "
                     + ("yes" if not bad else f"NO: {'; '.join(bad)}"))  # fmt: skip
    if result["failed"]:
        lines.append(f"FAIL: a tool crashed on: {'; '.join(result['failed'])} (see 'errors' in the JSON)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=None, help="zoo cache folder (default benchmarks/.zoo/)")
    parser.add_argument("--models", nargs="+", default=None, help="zoo models to run (default: all; 'none' for no zoo rows)")
    parser.add_argument("--threats", nargs="+", default=DEFAULT_THREATS,
                        help="zoo threats, robaudit syntax (default: %(default)s)")  # fmt: skip
    parser.add_argument("--n", type=int, default=None, help="stratified sample of the 360 digits test samples (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed of the digits sample (default 0); the samples never move with --seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="attack seeds: every tool runs once per seed on the same samples (default: 0)")  # fmt: skip
    parser.add_argument("--presets", nargs="+", default=["standard"], choices=list(PRESETS),
                        help="robaudit presets, one column each (default: standard)")  # fmt: skip
    parser.add_argument("--fixtures", action="store_true", help="add the four third-party fixture rows")
    parser.add_argument("--fixtures-only", action="store_true", help="only the fixture rows (no zoo)")
    parser.add_argument("--fixtures-dir", type=Path, default=DEFAULT_FIXTURES, help="default ../shared/fixtures")
    parser.add_argument("--fixture-n", type=int, default=100, help="first N images of each fixture data file (default 100)")
    parser.add_argument("--fixture-rows", nargs="+", metavar="MODEL=THREAT",
                        help="other fixture rows instead of the four default ones (e.g. held-out models: "
                             "eran_mnist_relu_9_200=linf:0.015)")  # fmt: skip
    parser.add_argument("--bs", type=int, default=250, help="batch size for AutoAttack/torchattacks (AutoAttack's default, 250)")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=["robaudit", "autoattack"])
    parser.add_argument("--aa-cache", type=Path, default=DEFAULT_CACHE, help="AutoAttack result cache (default %(default)s)")
    parser.add_argument("--no-aa-cache", action="store_true", help="always run AutoAttack, read and write no cache")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every tool (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default %(default)s)")
    args = parser.parse_args()

    _require(args.tools)
    args.git_state = _git()  # the robaudit that is imported now is the one measured
    torch.set_num_threads(args.threads)
    columns = [f"robaudit:{p}" for p in dict.fromkeys(args.presets) if "robaudit" in args.tools]
    columns += [t for t in ("autoattack", "torchattacks") if t in args.tools]
    seeds = list(dict.fromkeys(args.seeds))
    cache = AutoAttackCache(None if args.no_aa_cache or AA not in columns else args.aa_cache)

    zoo = _zoo()
    zoo_dir = args.zoo or zoo.DEFAULT_ZOO
    names = [] if args.fixtures_only or args.models == ["none"] else (args.models or list(zoo.RECIPES))
    unknown = sorted(set(names) - set(zoo.RECIPES))
    if unknown:
        sys.exit(f"unknown zoo model(s) {', '.join(unknown)} (known: {', '.join(zoo.RECIPES)}, or none)")
    targets = zoo_targets(zoo, zoo_dir, names, [parse_threat(t) for t in args.threats], args.n, args.seed)
    if args.fixtures or args.fixtures_only:
        rows = FIXTURE_ROWS
        if args.fixture_rows:
            if any("=" not in r for r in args.fixture_rows):
                sys.exit("--fixture-rows takes MODEL=THREAT entries, e.g. eran_mnist_relu_9_200=linf:0.015")
            rows = tuple(tuple(r.split("=", 1)) for r in args.fixture_rows)
            manifest = args.fixtures_dir / "manifest.json"
            known = json.loads(manifest.read_text())["models"] if manifest.is_file() else {}
            unknown = sorted({name for name, _ in rows} - set(known)) if known else []
            if unknown:
                sys.exit(f"--fixture-rows: unknown fixture model(s) {', '.join(unknown)} (known: {', '.join(known)})")
        targets += fixture_targets(args.fixtures_dir, args.fixture_n, rows)
    if not targets:
        sys.exit("nothing to run: no zoo models and no fixture rows")
    print(f"{len(targets)} models; tools: {', '.join(columns)}; attack seeds {seeds}; torch threads {args.threads}; "
          f"AutoAttack cache: {cache.folder or 'off'}", file=sys.stderr)  # fmt: skip

    rows: list[dict] = []
    meta: dict = {}
    for target in targets:
        # The referee re-checks every tool's examples and is never handed to a tool; each
        # third-party tool attacks its own fresh copy (so none can leave state for another).
        referee = target.fresh()
        with torch.no_grad():
            clean = referee(target.x).argmax(1) == target.y
        meta[target.name] = {"source": target.source, "n": len(target.y), "sample_indices": target.indices,
                             "samples_sha256": target.digest, "clean_accuracy": _fraction(clean), **target.meta}  # fmt: skip
        expected = target.meta.get("readme_clean_accuracy_first100")
        if expected is not None and len(target.y) == 100 and abs(_fraction(clean) - expected) > EPS:
            print(f"WARNING: {target.name} clean accuracy {_fraction(clean):.2f} here, {expected:.2f} in the fixtures' README",
                  file=sys.stderr)  # fmt: skip
        for threat in target.threats:
            row = {"model": target.name, "source": target.source, "threat": threat.spec, "threat_canonical": threat.canonical,
                   "n": len(target.y), "clean_accuracy": _fraction(clean), "seeds": []}  # fmt: skip
            for seed in seeds:
                per = {"seed": seed, "clean_accuracy": row["clean_accuracy"], "tools": {}}
                for tool in columns:
                    try:
                        result = _run_tool(tool, target, referee, threat, seed, args, cache)
                    except Exception as exc:  # noqa: BLE001 - a crash of one tool is a result, not the end of the run
                        print(f"  {tool} seed {seed} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                        row.setdefault("errors", {})[f"{tool} seed {seed}"] = f"{type(exc).__name__}: {exc}"
                        continue
                    per["tools"][tool] = result
                    assert not any(m.training for m in referee.modules()), "the referee model left eval mode"
                compare_seed(per)
                print(
                    f"  {target.name} {threat.spec} seed {seed}: clean {row['clean_accuracy']:.3f} | "
                    + " | ".join(f"{t} {r['robust_accuracy']:.3f} ({r['forward_passes_per_sample']:.0f}+"
                                 f"{r['backward_passes_per_sample']:.0f} passes, {r['seconds']:.1f} s"
                                 f"{', cached' if r.get('cached') else ''})"
                                 for t, r in per["tools"].items()),
                    file=sys.stderr, flush=True,
                )  # fmt: skip
                for r in per["tools"].values():
                    r.pop("_robust", None)
                row["seeds"].append(per)
            summarize_row(row, columns)
            print(f"  -> {row['verdict']}", file=sys.stderr, flush=True)
            rows.append(row)
            _write(args, columns, seeds, cache, meta, rows)  # partial results survive an interrupted run

    result = _write(args, columns, seeds, cache, meta, rows)
    print(table(rows, columns, seeds))
    print(summary_text(result))
    print(f"\nresults written to {args.out}", file=sys.stderr)
    return 1 if result["standard_weaker_than_autoattack"] or result["failed"] else 0


def _run_tool(tool: str, target: Target, referee, threat: Threat, seed: int, args, cache: AutoAttackCache) -> dict:
    """One tool, one seed; AutoAttack from the cache when this exact run is there."""
    print(f"{target.name} {threat.spec} seed {seed} {tool} ...", file=sys.stderr, flush=True)
    torch.manual_seed(seed)
    if tool.startswith("robaudit:"):
        return run_robaudit(referee, target, threat, tool.split(":", 1)[1], seed)
    if tool == AA:
        key = cache.key(target, threat, seed, args.bs)
        hit = cache.get(key)
        if hit is not None:
            return hit
        result = run_autoattack(referee, target.fresh(), threat, target.x, target.y, seed, args.bs)
        cache.put(key, result, args.threads)
        return result
    return run_torchattacks(referee, target.fresh(), threat, target.x, target.y, seed, args.bs)


def _write(args, columns: list[str], seeds: list[int], cache: AutoAttackCache, meta: dict, rows: list[dict]) -> dict:
    weaker = [f"{r['model']} {r['threat']} seed {s}" for r in rows for s in r.get("standard_weaker_seeds", [])]
    thorough_bad = [f"{r['model']} {r['threat']} seed {s}" for r in rows for s in r.get("thorough_failed_seeds", [])]
    failed = [f"{r['model']} {r['threat']} {what}" for r in rows for what in r.get("errors", {})]
    result = {
        "benchmark": "vs_autoattack",
        "command": "python benchmarks/vs_autoattack.py " + " ".join(sys.argv[1:]),
        "tools": columns,
        "sampling_seed": args.seed,
        "attack_seeds": seeds,
        "autoattack_cache": str(cache.folder) if cache.folder else None,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "autoattack": cache.identity or _version("autoattack"),
            "torchattacks": _version("torchattacks"),
            **args.git_state,
        },
        "models": meta,
        "rows": rows,
        "totals": totals(rows, columns, seeds),
        "standard_weaker_than_autoattack": weaker,
        "thorough_weaker_than_reference": thorough_bad,
        "failed": failed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _git() -> dict:
    """Which robaudit was measured: the commit and the robaudit/ files changed since it."""
    import subprocess

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    changed = [line[3:] for line in git("status", "--porcelain", "--", "robaudit").splitlines()]
    return {"robaudit_commit": commit, "robaudit_uncommitted_changes": changed}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
