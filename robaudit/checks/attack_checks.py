"""Checks on what the attacks did: did another kind of attack find what the battery missed?

The probe attacks themselves run in `robaudit.stages.trust` (through the shared runner,
so everything they find is re-verified and counted in the robust accuracy); these
functions turn their counts into verdicts.
"""

from __future__ import annotations

from robaudit.checks.verdict import FAIL, PASS, SKIPPED, WARN, CheckResult, by_count

BEATS_FAIL_SHARE = 0.05  # a probe breaking this share of the points the battery left robust: masking
MORE_STEPS_FAIL_SHARE = 0.10
# The label-only probe: a short battery (`quick`'s 50-step APGD) leaves points near the boundary that RayS finds
# on healthy models too (2 to 3 of 32, measured); the masked models it exists for lose 10 to 15 of 32.
DECISION_FAIL_SHARE = 0.10


def _extra_breaks(name: str, found: int, attacked: int, fail_share: float, text: str, evidence: dict, threat: str,
                  none_left: str = "no robust point left to try") -> CheckResult:  # fmt: skip
    """The shared shape of checks 4, 5, 7 and 8: an extra attack on the points the battery left robust."""
    evidence = {**evidence, "attacked": attacked, "broken": found}
    if attacked == 0:
        return CheckResult(name, SKIPPED, none_left, evidence, threat)
    return CheckResult(name, by_count(found, attacked, fail_share), text, evidence, threat)


def black_box(found: int, attacked: int, attacks: list[str], threat: str, reached: int = 0,
              confirm: str | None = None) -> CheckResult:  # fmt: skip
    """Check 4: score- or decision-based attacks broke points the gradient attacks missed.

    ``reached``: how many of the ``found`` points a longer gradient attack (``confirm``) from
    a fresh start breaks too. Those points tell of a battery that stopped early (check 5's
    business), not of gradients that lead nowhere: only the others count towards a failure.
    """
    text = f"{', '.join(attacks)} broke {found} of {attacked} points the gradient attacks left robust"
    evidence = {"attacks": attacks, "gradient_confirmed": reached, "confirm_attack": confirm}
    if found and confirm is not None:
        text += f"; {confirm} from a fresh start broke {reached} of those {found} too"
    result = _extra_breaks("black_box", found, attacked, BEATS_FAIL_SHARE, text, evidence, threat,
                           none_left="no point was left robust by the gradient attacks")  # fmt: skip
    if found and result.verdict != SKIPPED:
        unreached = by_count(found - reached, attacked, BEATS_FAIL_SHARE)
        result.verdict = WARN if unreached == PASS else unreached  # what the probe found is still a sign
    return result


def decision(found: int, attacked: int, attack: str | None, why_not: str, threat: str, strict: bool = False) -> CheckResult:
    """Check 10: an attack that reads labels only broke points the battery left robust.

    Gradient tricks (a detached smooth copy, high-frequency terms) and score tricks (decoy
    scores over the true decisions) mislead every gradient- and score-based attack, the
    probes above included; a label-only attack sees only the decisions. ``strict`` (the
    long batteries of `standard` and `thorough`): one such point fails. A 500-query
    label-only attack that beats those batteries at all is no short battery's miss: it
    broke none of the healthy controls' points, and a decoy gradient whose probe broke
    1-3 of 32 (a warning below the share) left 5 of 64 points counted robust.
    """
    if attack is None:
        return CheckResult("decision", SKIPPED, why_not, {"attack": None}, threat)
    text = f"{attack}, reading labels only, broke {found} of {attacked} points the battery left robust"
    result = _extra_breaks("decision", found, attacked, DECISION_FAIL_SHARE, text, {"attack": attack}, threat)
    if strict and found and result.verdict == WARN:
        result = CheckResult("decision", FAIL, text + " (the full battery leaves none on healthy models)",
                             result.evidence, threat)  # fmt: skip
    return result


def single_step(found: int, attacked: int, threat: str) -> CheckResult:
    """Check 7: one FGSM step broke points the multi-step attacks missed."""
    text = f"FGSM broke {found} of {attacked} points the battery left robust"
    return _extra_breaks("single_step", found, attacked, BEATS_FAIL_SHARE, text, {}, threat)


def transfer(found: int, attacked: int, changes: list[str] | None, why_not: str | None, threat: str) -> CheckResult:
    """Check 8: attacks on a smoothed surrogate (BPDA) broke points the direct attacks missed."""
    if changes is None:
        return CheckResult("transfer", SKIPPED, why_not or "no surrogate", {"surrogate": None}, threat)
    text = f"APGD on a surrogate ({'; '.join(changes)}) broke {found} of {attacked} points the battery left robust"
    return _extra_breaks("transfer", found, attacked, BEATS_FAIL_SHARE, text, {"surrogate_changes": changes}, threat)


def optimization(found: int, attacked: int, attack: str, steps: int, threat: str) -> CheckResult:
    """Check 5: a longer run from a fresh start keeps breaking points (the battery stopped too early)."""
    text = f"{attack} with {steps} steps from a fresh start broke {found} of {attacked} points the battery left robust"
    return _extra_breaks("optimization", found, attacked, MORE_STEPS_FAIL_SHARE, text, {"attack": attack, "steps": steps}, threat)


def unbounded(broken: int, attacked: int, eps: float, norm: str, threat: str, linf_broken: int = 0) -> CheckResult:
    """Check 6: with the whole input box as budget, a gradient attack must break every point.

    ``linf_broken``: points that Linf steps broke after the ``norm`` attack left them (an L2
    ball holding the whole box is the same set as the box; L2 steps clipped by the box crawl
    on robust models, sign steps do not).
    """
    evidence = {"norm": norm, "eps": eps, "attacked": attacked, "broken": broken + linf_broken}
    if attacked == 0:
        return CheckResult("unbounded", SKIPPED, "no correctly classified point to try", evidence, threat)
    text = f"gradient attack at {norm} eps {eps:.3g} (the whole input box) broke {broken} of {attacked} points"
    if linf_broken:
        evidence["linf_broken"] = linf_broken
        text += f", Linf steps in the same box the other {linf_broken}" if broken + linf_broken == attacked else \
            f", Linf steps in the same box {linf_broken} more"
    broken += linf_broken
    verdict = PASS if broken == attacked else FAIL
    if verdict == FAIL:
        text += ": it cannot change decisions even without a budget"
    return CheckResult("unbounded", verdict, text, evidence, threat)


def silent_success(silent: dict[str, int], attacked: int, stochastic: bool, threat: str) -> CheckResult:
    """Check 9: an attack saw a point misclassified but the point it returned does not verify."""
    total = sum(silent.values())
    evidence = {"per_attack": silent, "attacked": attacked, "silent": total}
    if not silent:
        return CheckResult("silent_success", SKIPPED, "no attack in the battery reports its own successes", evidence, threat)
    if total == 0:
        return CheckResult("silent_success", PASS, "every point an attack saw misclassified re-verified", evidence, threat)
    text = f"{total} point(s) seen misclassified during an attack did not re-verify ({', '.join(f'{k}: {v}' for k, v in silent.items() if v)})"
    if stochastic:
        return CheckResult("silent_success", WARN, text + ", as expected when outputs are random", evidence, threat)
    verdict = FAIL if total >= 2 and total > 0.01 * max(1, attacked) else WARN
    return CheckResult("silent_success", verdict, text, evidence, threat)
