"""Trust checks in the scan: find gradient masking and attack failure, adapt, and say so.

The stage runs in three steps around the attacks (docs/trust.md):

1. `TrustStage.open`, before the clean pass: repeated passes tell a randomized model,
   which is then attacked through `EOT` and judged by its worst of several draws;
2. `before_attacks`: output kind, gradient health and prediction stability on
   correctly classified points;
3. `after_attacks`: cheap probes on the points the battery left robust (FGSM, a
   score-based attack, a BPDA-surrogate transfer attack, a longer run, an unbounded
   run) and the silent-success count. Where any sign of masking shows, the adaptive
   battery (`robaudit.battery.ADAPTIVE`: scale-invariant, transfer, score- and
   decision-based attacks) runs on every point still robust.

Every probe and adaptive attack goes through the shared runner, so what they find is
re-verified and lowers the reported robust accuracy; the white-box-only figure is kept
beside it, flagged as untrustworthy when masking showed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robaudit.attacks.runner import AttackRun, ThreatOutcome, judge, run_threat
from robaudit.battery import ADAPTIVE, GRADIENT_FREE, RANDOMIZED, REPEATS, build_battery
from robaudit.checks import FAIL, CheckResult, attack_checks, model_checks, overall
from robaudit.checks.verdict import by_count
from robaudit.errors import RobauditError
from robaudit.models.randomized import EOT, detect_randomness
from robaudit.progress import prefixed
from robaudit.threats import Threat

TRUST_LABEL = "trust checks"  # progress label of every probe and adaptive attack
PROBE_POINTS = 32  # robust points each sampled probe attacks, per threat
UNBOUNDED_POINTS = 16
GRADIENT_POINTS = 64
PROBE_SQUARE_QUERIES = 300
PROBE_TRANSFER_STEPS = 50
PROBE_DECISION_QUERIES = 500  # per point, for the label-only probe (RayS for Linf, HopSkipJump for L2)
DECISION_PROBES = {"linf": "rays", "l2": "hsj"}
STABILITY_NOISE = 1e-3  # of the input range, and at most a tenth of the smallest eps
MASKING_CHECKS = ("gradients", "black_box", "decision", "single_step", "transfer", "unbounded")


@dataclass
class TrustReport:
    """What the stage found and did (becomes `summary.diagnostics`)."""

    checks: list[CheckResult] = field(default_factory=list)
    adaptations: list[str] = field(default_factory=list)
    white_box_robust_accuracy: dict[str, float] = field(default_factory=dict)
    masking: bool = False
    stochastic: bool = False
    passes: tuple[int, int] = (0, 0)  # forward, backward passes spent on probes and adaptive attacks

    @property
    def verdict(self) -> str:
        return overall(self.checks)

    def to_dict(self) -> dict[str, Any]:
        note = None
        if self.masking:
            note = (
                "gradient masking signs: the white-box robust accuracy is not trustworthy; the reported robust "
                "accuracy includes the adaptive attacks"
            )
        return {
            "verdict": self.verdict,
            "checks": [
                {"name": c.name, "threat": c.threat, "verdict": c.verdict, "summary": c.summary, "evidence": c.evidence}
                for c in self.checks
            ],
            "adaptations": self.adaptations,
            "white_box_robust_accuracy": self.white_box_robust_accuracy,
            "masking_suspected": self.masking,
            "note": note,
        }


class TrustStage:
    """Holds what the checks learn between the steps of the scan."""

    def __init__(self, preset: str, *, seed: int, lower: float, upper: float, num_classes: int, batch_size: int, device: torch.device) -> None:
        self.preset = preset if preset in ADAPTIVE else "standard"
        self.seed = seed
        self.kw = dict(lower=lower, upper=upper, num_classes=num_classes, batch_size=batch_size, device=device)
        self.report = TrustReport()
        self.surrogate = None
        self.surrogate_note: str | None = None
        self._surrogate_built = False

    def for_chunk(self, seed: int) -> TrustStage:
        """A stage for one chunk of the scan: its own seed and findings, the model-level state shared.

        What `open` learned (randomness) and the BPDA surrogate carry over; the chunk's
        checks start empty and are merged with the other chunks' afterwards.
        """
        stage = TrustStage.__new__(TrustStage)
        stage.__dict__.update(self.__dict__)
        stage.seed = seed
        stage.report = TrustReport(stochastic=self.report.stochastic)
        stage._parent = self
        return stage

    # 1. randomness ---------------------------------------------------------------------
    def open(self, model: nn.Module, x: torch.Tensor) -> nn.Module:
        """Return the model attacks and judgements use: `EOT` over the model when it is randomized."""
        evidence = detect_randomness(model, x[:PROBE_POINTS].to(self.kw["device"]))
        settings = RANDOMIZED[self.preset]
        self.report.checks.append(model_checks.randomness(evidence, settings["eot"], REPEATS))
        if not evidence.stochastic:
            return model
        if not evidence.seedable:
            raise RobauditError(
                "the model's outputs change from call to call and torch.manual_seed does not fix them, so no "
                "adversarial example found on it could be re-verified"
            )
        self.report.stochastic = True
        self.report.adaptations.append(
            f"randomized model: attacks use EOT gradients over {settings['eot']} draws; a prediction is the worst of "
            f"{REPEATS} draws; the Lp battery is AutoAttack's rand version (APGD-CE, APGD-DLR) unless attacks were given"
        )
        return EOT(model, settings["eot"], REPEATS, seed=self.seed)

    # 2. model checks -------------------------------------------------------------------
    def before_attacks(self, model: nn.Module, plain: nn.Module, output_kind: str, x: torch.Tensor, y: torch.Tensor,
                       clean_correct: torch.Tensor, threats: list[Threat]) -> None:  # fmt: skip
        """Output kind, gradients and stability on correctly classified points; build the surrogate."""
        device, lower, upper = self.kw["device"], self.kw["lower"], self.kw["upper"]
        idx = torch.nonzero(clean_correct).flatten()
        pick = _sample(clean_correct, GRADIENT_POINTS, self.seed)
        xs, ys = x[pick].to(device), y[pick].to(device)
        with torch.no_grad():
            probs = plain(xs).exp() if output_kind == "probabilities" else None
        one_hot = float((probs.amax(dim=1) == 1.0).float().mean()) if probs is not None and len(xs) else 0.0
        self.report.checks.append(model_checks.output_kind(output_kind, one_hot))
        if output_kind == "probabilities":
            self.report.adaptations.append("probability outputs: attacks work on log-probabilities")
        lp = [t for t in threats if not t.is_spatial]
        norm = min(lp, key=lambda t: t.eps).norm if lp else "linf"
        step = _gradient_step(lp, lower, upper)
        self.report.checks.append(model_checks.gradients(model, xs, ys, step, norm, lower, upper))
        size = min([STABILITY_NOISE * (upper - lower)] + [t.eps / 10 for t in lp if t.norm == "linf"])
        judged = lambda xb, yb: judge(model, xb, yb, self.kw["batch_size"], device)  # noqa: E731
        self.report.checks.append(
            model_checks.stability(judged, x[idx], y[idx], size, lower, upper, self.seed, randomized=self.report.stochastic)
        )
        self.ensure_surrogate(plain)

    def ensure_surrogate(self, plain: nn.Module) -> None:
        """Build the BPDA surrogate once per scan: every chunk attacks the same model."""
        parent = getattr(self, "_parent", self)
        if not parent._surrogate_built:
            parent.surrogate, parent.surrogate_note = _surrogate(plain)
            parent._surrogate_built = True
        self.surrogate, self.surrogate_note = parent.surrogate, parent.surrogate_note

    # 3. after the battery ----------------------------------------------------------------
    def after_attacks(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean_correct: torch.Tensor,
                      outcomes: list[ThreatOutcome], progress) -> None:  # fmt: skip
        """Probe each Lp threat's robust points; escalate to the adaptive battery on any sign of masking."""
        progress = prefixed(progress, TRUST_LABEL)  # labels say these are the checks' attacks
        lp = [o for o in outcomes if not o.threat.is_spatial]
        for outcome in lp:
            steps = self._probe(model, x, y, clean_correct, outcome, progress)
            self._finish_early_stop(model, x, y, clean_correct, outcome, steps, progress)
        fired = [c for c in self.report.checks if _masking_sign(c)]
        self.report.masking = bool(fired)
        if not fired or not lp:
            return
        names = ", ".join(sorted({c.name for c in fired}))
        self.adapt(model, x, y, clean_correct, outcomes, progress, f"gradient masking signs ({names})")

    def _finish_early_stop(self, model, x, y, clean_correct, outcome: ThreatOutcome, steps: int, progress) -> None:
        """The longer gradient run on every point still robust, where the probes show the battery stopped early.

        The probes attack a sample: when a clear share of it falls to more steps (check 5 at
        fail, or check 4's finds reached by gradients), the rest of the robust points would
        too, and the robust accuracy must not keep them.
        """
        name = outcome.threat.canonical
        fired = [c for c in self.report.checks if c.threat == name and _stopped_early(c)]
        if not fired:
            return
        runs = build_battery([{"attack": "apgd-dlr", "steps": steps}])
        self.report.adaptations.append(
            f"the battery stopped early ({', '.join(c.name for c in fired)}): ran {runs[0].label} with {steps} steps "
            f"on every point still robust under {name}"
        )
        self._run(model, x, y, clean_correct, outcome, runs, clean_correct & ~outcome.broken, "extend", progress, seed_shift=11)

    def adapt(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean_correct: torch.Tensor,
              outcomes: list[ThreatOutcome], progress, reason: str) -> None:  # fmt: skip
        """The adaptive battery on every point still robust under each Lp threat (``progress``: a factory)."""
        for outcome in [o for o in outcomes if not o.threat.is_spatial]:
            battery = [r for r in build_battery(ADAPTIVE[self.preset]) if self._fits(r, outcome.threat)]
            self.report.adaptations.append(
                f"{reason}: ran {', '.join(r.label for r in battery)} on every point still robust "
                f"under {outcome.threat.canonical}"
            )
            self._run(model, x, y, clean_correct, outcome, battery, clean_correct & ~outcome.broken, "adapt", progress)

    def _fits(self, run: AttackRun, threat: Threat) -> bool:
        """Decision-based attacks by norm (RayS for Linf, HopSkipJump for L2); transfer only with a surrogate."""
        if run.attack.name == "hsj":
            return threat.norm == "l2"
        if run.attack.name == "transfer" and self.surrogate is None:
            return False
        return run.supports(threat)

    def _probe(self, model, x, y, clean_correct, outcome: ThreatOutcome, progress) -> int:
        """The cheap probes on the outcome's robust points; returns the longer run's steps (check 5's)."""
        threat, name = outcome.threat, outcome.threat.canonical
        robust = clean_correct & ~outcome.broken
        self.report.white_box_robust_accuracy[name] = _white_box_accuracy(outcome, clean_correct)
        silent = {r.name: r.silent for r in outcome.records if _reports_crossing(r)}
        self.report.checks.append(attack_checks.silent_success(silent, int(clean_correct.sum()), self.report.stochastic, name))

        after_gradients = _gradient_free_tail(outcome)  # before the probes append their own records

        # 7. single step, on every robust point (one pass each)
        found, attacked = self._run(model, x, y, clean_correct, outcome, build_battery([{"attack": "fgsm"}]), robust, "probe", progress)
        self.report.checks.append(attack_checks.single_step(found, attacked, name))

        # 5's budget: twice the battery's longest fixed-radius attack (a minimal-norm attack's
        # steps are on another scale: FMN's 100 are not a 100-step APGD)
        steps = min(400, 2 * max([_steps(r) for r in outcome.records if not r.minimal] + [50]))

        # 4. black box beats white box: the battery's own score-based attacks, or a short Square probe;
        # what they broke is attacked again by the longer gradient run, which tells masking from a short battery
        if after_gradients:
            tail = {r.name for r in after_gradients}
            hits = torch.tensor([b in tail for b in outcome.broken_by], dtype=torch.bool) & outcome.broken
            found = sum(r.broke for r in after_gradients)
            attacked = max(r.attempted for r in after_gradients)
            attacks = [r.name for r in after_gradients]
        else:
            before = outcome.broken.clone()
            sample = _sample(clean_correct & ~outcome.broken, PROBE_POINTS, self.seed)
            square = build_battery([{"attack": "square", "n_queries": PROBE_SQUARE_QUERIES}])
            found, attacked = self._run(model, x, y, clean_correct, outcome, square, sample, "probe", progress)
            hits = outcome.broken & ~before
            attacks = [f"square ({PROBE_SQUARE_QUERIES} queries)"]
        confirm = build_battery([{"attack": "apgd-dlr", "steps": steps}])
        reached = self._reach(model, x, y, outcome.threat, confirm, hits, progress)
        self.report.checks.append(attack_checks.black_box(found, attacked, attacks, name, reached, f"{confirm[0].label} with {steps} steps"))

        # 10. labels only: what no gradient or score trick can hide
        self.report.checks.append(self._decision(model, x, y, clean_correct, outcome, progress))

        # 8. transfer from the BPDA surrogate
        if self.surrogate is None:
            self.report.checks.append(attack_checks.transfer(0, 0, None, self.surrogate_note, name))
        else:
            sample = _sample(clean_correct & ~outcome.broken, PROBE_POINTS, self.seed + 1)
            runs = build_battery([{"attack": "transfer", "steps": PROBE_TRANSFER_STEPS}])
            found, attacked = self._run(model, x, y, clean_correct, outcome, runs, sample, "probe", progress)
            self.report.checks.append(attack_checks.transfer(found, attacked, self.surrogate.changes, None, name))

        # 5. a longer run from a fresh start
        sample = _sample(clean_correct & ~outcome.broken, PROBE_POINTS, self.seed + 2)
        runs = build_battery([{"attack": "apgd-dlr", "steps": steps}])  # DLR falls back to margin below 3 classes
        found, attacked = self._run(model, x, y, clean_correct, outcome, runs, sample, "probe", progress, seed_shift=7)
        self.report.checks.append(attack_checks.optimization(found, attacked, runs[0].label, steps, name))

        # 6. unbounded: the whole box as budget (a separate threat: nothing merges into this one)
        self.report.checks.append(self._unbounded(model, x, y, clean_correct, threat, progress))
        return steps

    def _decision(self, model, x, y, clean_correct, outcome: ThreatOutcome, progress) -> CheckResult:
        name, attack = outcome.threat.canonical, DECISION_PROBES.get(outcome.threat.norm)
        if attack is None:
            return attack_checks.decision(0, 0, None, f"no label-only attack for {outcome.threat.norm}", name)
        if self.report.stochastic:  # one draw's label says little; the EOT battery's worst-of-draws verdicts decide
            return attack_checks.decision(0, 0, None, "a randomized model: attacks see the EOT model instead", name)
        sample = _sample(clean_correct & ~outcome.broken, PROBE_POINTS, self.seed + 4)
        runs = build_battery([{"attack": attack, "max_queries": PROBE_DECISION_QUERIES}])
        found, attacked = self._run(model, x, y, clean_correct, outcome, runs, sample, "probe", progress)
        return attack_checks.decision(found, attacked, f"{attack} ({PROBE_DECISION_QUERIES} queries)", "", name,
                                      strict=self.preset != "quick")  # fmt: skip

    def _unbounded(self, model, x, y, clean_correct, threat: Threat, progress) -> CheckResult:
        lower, upper = self.kw["lower"], self.kw["upper"]
        width = upper - lower
        norm = "linf" if threat.norm == "l1" else threat.norm  # the box is the same set; sparse L1 steps crawl across it
        eps = width if norm == "linf" else width * math.sqrt(x[0].numel())
        big = Threat(norm=norm, eps=eps)
        sample = _sample(clean_correct, UNBOUNDED_POINTS, self.seed + 3)
        # Both runs start at x: at the whole box a random start is a random image, which alone flips most
        # points of most models and would hide a model whose gradients lead nowhere. APGD-DLR (adaptive
        # steps, scale-invariant loss) runs only on what PGD left: from x, sign-gradient PGD can end in a
        # corner of the box that the class owns (7 of 100 MNIST images of a plain MLP; docs/trust.md).
        runs = lambda: build_battery([  # noqa: E731
            {"attack": "pgd", "steps": 50, "step_size": 0.05, "loss": "margin", "random_init": False},
            {"attack": "apgd-dlr", "steps": 50, "start": "clean"},
        ])  # fmt: skip
        result = run_threat(model, x, y, sample, big, runs(), seed=self.seed, progress=progress(), **self.kw)
        self._count(result)
        left, linf_broken = sample & ~result.broken, 0
        if norm == "l2" and bool(left.any()):  # the same box by sign steps, which box clipping does not stall
            box = Threat(norm="linf", eps=width)
            linf = run_threat(model, x, y, left, box, runs(), seed=self.seed, progress=progress(), **self.kw)
            self._count(linf)
            linf_broken = int(linf.broken.sum())
        return attack_checks.unbounded(int(result.broken.sum()), int(sample.sum()), eps, norm, threat.canonical, linf_broken)

    def _reach(self, model, x, y, threat: Threat, battery: list[AttackRun], points: torch.Tensor, progress) -> int:
        """How many of `points` (broken already, by a gradient-free attack) `battery` breaks from x too.

        Nothing merges: the points count as broken either way; this only says whether gradients reach them.
        """
        if not bool(points.any()):
            return 0
        result = run_threat(model, x, y, points, threat, battery, seed=self.seed + 5, progress=progress(), **self.kw)
        self._count(result)
        return int(result.broken.sum())

    def _run(self, model, x, y, clean_correct, outcome: ThreatOutcome, battery: list[AttackRun], eligible: torch.Tensor,
             prefix: str, progress, seed_shift: int = 0) -> tuple[int, int]:  # fmt: skip
        """Run `battery` on the `eligible` points under the outcome's threat and merge what it verifiably broke."""
        for run in battery:
            if run.attack.name == "transfer":
                run.attack.surrogate = None if self.surrogate is None else self.surrogate.module
        attacked = int(eligible.sum())
        if attacked == 0 or not battery:
            return 0, attacked
        extra = run_threat(
            model, x, y, eligible, outcome.threat, battery, seed=self.seed + seed_shift, progress=progress(), **self.kw
        )  # fmt: skip
        self._count(extra)
        return merge(outcome, extra, clean_correct, eligible, prefix), attacked

    def _count(self, result: ThreatOutcome) -> None:
        f, b = self.report.passes
        self.report.passes = (f + sum(r.forwards for r in result.records), b + sum(r.backwards for r in result.records))


def merge(outcome: ThreatOutcome, extra: ThreatOutcome, clean_correct: torch.Tensor, eligible: torch.Tensor, prefix: str) -> int:
    """Add the verified breaks of `extra` (run on `eligible`, all robust in `outcome`) to `outcome`."""
    before = int((clean_correct & ~outcome.broken).sum())
    hits = torch.nonzero(extra.broken & ~outcome.broken).flatten()
    outcome.broken[hits] = True
    outcome.x_adv[hits] = extra.x_adv[hits]
    outcome.distance[hits] = extra.distance[hits]
    for i in hits.tolist():
        outcome.broken_by[i] = f"{prefix}:{extra.broken_by[i]}"
    pool = int(eligible.sum())
    for record in extra.records:
        record.name = f"{prefix}:{record.name}"
        record.robust_after = before - (pool - record.robust_after)
        outcome.records.append(record)
    return len(hits)


def _masking_sign(check: CheckResult) -> bool:
    """Gradient trouble of any degree, or a probe beating the battery clearly (a `fail`).

    A probe's `warn` (one point, or a small share) is what a short battery misses on a
    healthy model too: counted in the robust accuracy, but no reason to call it masking.
    """
    if check.name == "gradients":
        return check.fired
    return check.name in MASKING_CHECKS and check.verdict == FAIL


def _stopped_early(check: CheckResult) -> bool:
    """A longer gradient run broke a clear share of the sampled robust points (not masking: gradients work)."""
    if check.name == "optimization":
        return check.verdict == FAIL
    if check.name == "black_box" and check.evidence.get("gradient_confirmed"):
        reached, attacked = check.evidence["gradient_confirmed"], check.evidence["attacked"]
        return by_count(reached, attacked, attack_checks.BEATS_FAIL_SHARE) == FAIL
    return False


def _sample(mask: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    idx = torch.nonzero(mask).flatten()
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:size]]
    out = torch.zeros_like(mask)
    out[pick] = True
    return out


def _white_box_accuracy(outcome: ThreatOutcome, clean_correct: torch.Tensor) -> float:
    """Robust accuracy counting only what gradient attacks broke."""
    free = set(GRADIENT_FREE)
    white = [b is not None and b.split("#")[0] not in free for b in outcome.broken_by]
    broken = torch.tensor(white, dtype=torch.bool) & outcome.broken
    return float((clean_correct & ~broken).sum()) / len(clean_correct)


def _gradient_free_tail(outcome: ThreatOutcome) -> list:
    """The battery's gradient-free attacks that ran after its last gradient attack."""
    ran = [r for r in outcome.records if r.skipped is None]
    tail = []
    for record in reversed(ran):
        if record.name.split("#")[0] not in GRADIENT_FREE:
            break
        tail.append(record)
    return list(reversed(tail))


def _reports_crossing(record) -> bool:
    return record.skipped is None and record.name.split("#")[0].split("[")[0] in ("apgd-ce", "apgd-dlr", "apgd-t", "pgd")


def _steps(record) -> int:
    steps = record.params.get("steps")
    return int(steps) if isinstance(steps, int) else 0


def _gradient_step(lp: list[Threat], lower: float, upper: float) -> float:
    """A small step for the gradient-ascent test: a quarter of the smallest eps (or 1% of the box)."""
    if not lp:
        return 0.01 * (upper - lower)
    return min(t.eps for t in lp) / 4


def _surrogate(plain: nn.Module):
    """The BPDA surrogate of the model, or None and why."""
    from robaudit.models.surrogate import build_surrogate

    try:
        surrogate = build_surrogate(plain)
    except Exception as exc:  # noqa: BLE001 - a surrogate is optional: never fail the scan for it
        return None, f"no surrogate: {type(exc).__name__}: {exc}".splitlines()[0]
    if surrogate is None:
        return None, "no surrogate: the graph has no rounding, clamping, saturating, random or squashing op to smooth (or cannot be traced)"
    return surrogate, None

