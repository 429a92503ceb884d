"""Real ground truth: VNN-COMP verification verdicts on the fixture models (slow marker).

At each instance's own Linf eps, the `standard` battery must find an adversarial
example for every `violated` instance (several defeat plain PGD) and must never report
one for a `holds` instance (verifiers proved none exists). CI runs every violated
instance with the full standard battery, and a sample of the holds ones
(`ROBAUDIT_HOLDS_SAMPLE`, default 2 per model) with Square's budget cut to
`ROBAUDIT_HOLDS_QUERIES` (default 500): a holds instance survives every attack, so it
pays the whole battery. `ROBAUDIT_HOLDS_SAMPLE=100 ROBAUDIT_HOLDS_QUERIES=5000` runs all.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import fixtures_dir
from robaudit.attacks.runner import run_minimal, run_threat
from robaudit.battery import build_battery, preset_specs
from robaudit.models import load_model, wrap_model
from robaudit.threats import Threat

HOLDS_SAMPLE = int(os.environ.get("ROBAUDIT_HOLDS_SAMPLE", "2"))
HOLDS_QUERIES = int(os.environ.get("ROBAUDIT_HOLDS_QUERIES", "500"))
MODELS = ["mnistfc_256x2", "verivital_convnet_maxpool", "verivital_convnet_avgpool", "oval21_cifar_base_kw"]


def _broken(name: str, pick: np.ndarray, square_queries: int = 5000) -> dict[float, tuple[np.ndarray, torch.Tensor]]:
    """Run the standard battery on the picked instances, grouped by their eps."""
    root = fixtures_dir()
    entry = json.loads((root / "manifest.json").read_text())["models"][name]
    instances = np.load(root / "vnncomp" / f"{name}.npz")
    x_all = torch.from_numpy(instances["x"]).float()
    y_all = torch.from_numpy(instances["y"]).long()
    raw = load_model(root / entry["file"])
    mean = None if entry["mean"] == [0.0] else entry["mean"]
    std = None if entry["std"] == [1.0] else entry["std"]
    model, info = wrap_model(raw, sample_shape=tuple(x_all.shape[1:]), probe=x_all[:4], mean=mean, std=std)
    specs = preset_specs("standard")
    for spec in specs:
        if spec["attack"] == "square":
            spec["n_queries"] = square_queries
    battery = build_battery(specs)
    results = {}
    for eps in sorted(set(instances["eps"][pick].tolist())):
        idx = np.nonzero(pick & (instances["eps"] == eps))[0]
        x, y = x_all[idx], y_all[idx]
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        kw = dict(lower=0.0, upper=1.0, num_classes=info.num_classes, batch_size=64, device=torch.device("cpu"), seed=0)
        runs = [r for r in battery if r.attack.kind == "minimal" and r.attack.supports(Threat("linf", eps))]
        minimal = run_minimal(model, x, y, correct, "linf", eps, runs, **kw) if runs else None
        outcome = run_threat(model, x, y, correct, Threat("linf", eps), battery, minimal=minimal, **kw)
        results[eps] = (idx, outcome.broken | ~correct)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_standard_battery_matches_verifier_verdicts(name: str) -> None:
    instances = np.load(fixtures_dir() / "vnncomp" / f"{name}.npz")
    verdict = instances["verdict"]
    holds = np.nonzero(verdict == "holds")[0]
    rng = np.random.default_rng(0)
    sampled = np.zeros(len(verdict), dtype=bool)
    sampled[rng.choice(holds, size=min(HOLDS_SAMPLE, len(holds)), replace=False)] = True
    checks = [(verdict == "violated", 5000), (sampled, HOLDS_QUERIES)]
    for pick, queries in checks:
        for eps, (idx, broken) in _broken(name, pick, queries).items():
            for i, b in zip(idx.tolist(), broken.tolist()):
                if verdict[i] == "holds":
                    assert not b, f"{name} instance {i} (eps {eps}) was proved robust but reported broken"
                else:
                    assert b, f"{name} instance {i} (eps {eps}) is violated but the standard battery missed it"
