"""Joining the chunks of a scan into one set of results, in chunk order.

Each chunk was audited on its own (`robaudit.stages.chunk`); here per-sample tensors are
concatenated, attack counts summed, trust checks reduced to their worst verdict, and the
certificate and indicator summaries recomputed over all samples. With one chunk every
function returns what that chunk had, so a small scan reads exactly as before chunking.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from robaudit.attacks.runner import AttackRecord, MinimalOutcome, ThreatOutcome
from robaudit.checks.verdict import _RANK, CheckResult
from robaudit.stages.certify import CertifyResult, _summary_of, unavailable
from robaudit.stages.chunk import ChunkAttacks, ChunkFinal
from robaudit.stages.measure import IndicatorResult
from robaudit.stages.trust import TrustReport
from robaudit.threats import Threat


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _cat_adv(tensors: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Adversarial inputs of every chunk, or an empty tensor when any chunk dropped them (to save memory)."""
    if any(t.dim() == 0 or len(t) != n for t, n in zip(tensors, sizes)):
        return torch.empty(0)
    return _cat(tensors)


def merge_records(per_chunk: list[list[AttackRecord]], robust_before: list[int]) -> list[AttackRecord]:
    """One record per attack (in order of first appearance) with counts summed over the chunks.

    ``robust_after`` of a chunk that did not run an attack (an adaptive attack runs only
    where masking showed) is that chunk's count after its previous attack.
    """
    if len(per_chunk) == 1:
        return per_chunk[0]
    keyed = [_keyed(records) for records in per_chunk]
    order = list(dict.fromkeys(key for records in keyed for key in records))
    merged = []
    last = list(robust_before)
    for key in order:
        present = [(i, records[key]) for i, records in enumerate(keyed) if key in records]
        first = present[0][1]
        out = replace(first, attempted=0, broke=0, robust_after=0, forwards=0, backwards=0, seconds=0.0, silent=0)
        out.skipped = first.skipped if all(r.skipped is not None for _, r in present) else None
        for i, records in enumerate(keyed):
            record = records.get(key)
            if record is not None:
                out.attempted += record.attempted
                out.broke += record.broke
                out.forwards += record.forwards
                out.backwards += record.backwards
                out.seconds += record.seconds
                out.silent += record.silent
                last[i] = record.robust_after
            out.robust_after += last[i]
        merged.append(out)
    return merged


def _keyed(records: list[AttackRecord]) -> dict[tuple[str, int], AttackRecord]:
    seen: dict[str, int] = {}
    out = {}
    for record in records:
        count = seen.get(record.name, 0)
        seen[record.name] = count + 1
        out[(record.name, count)] = record
    return out


def merge_outcomes(parts: list[ChunkAttacks], y: torch.Tensor) -> list[ThreatOutcome]:
    """One `ThreatOutcome` per threat over every sample."""
    sizes = [p.n for p in parts]
    correct = [int((p.clean_pred == y[p.start : p.stop]).sum()) for p in parts]
    merged = []
    for t, first in enumerate(parts[0].outcomes):
        pieces = [p.outcomes[t] for p in parts]
        transforms = [o.transform for o in pieces]
        merged.append(
            ThreatOutcome(
                threat=first.threat,
                broken=_cat([o.broken for o in pieces]),
                broken_by=[b for o in pieces for b in o.broken_by],
                distance=_cat([o.distance for o in pieces]),
                x_adv=_cat_adv([o.x_adv for o in pieces], sizes),
                records=merge_records([o.records for o in pieces], correct),
                transform=None if transforms[0] is None else _cat(transforms),  # type: ignore[arg-type]
            )
        )
    return merged


def merge_minimal(parts: list[ChunkAttacks], y: torch.Tensor) -> dict[str, MinimalOutcome]:
    """One `MinimalOutcome` per norm over every sample."""
    sizes = [p.n for p in parts]
    correct = [int((p.clean_pred == y[p.start : p.stop]).sum()) for p in parts]
    merged = {}
    for norm in parts[0].minimal:
        pieces = [p.minimal[norm] for p in parts]
        merged[norm] = MinimalOutcome(
            norm=norm,
            distance=_cat([m.distance for m in pieces]),
            found_by=[b for m in pieces for b in m.found_by],
            x_adv=_cat_adv([m.x_adv for m in pieces], sizes),
            records=merge_records([m.records for m in pieces], correct),
        )
    return merged


def merge_trust(opened: TrustReport, parts: list[ChunkAttacks]) -> TrustReport:
    """The scan's trust report: the model-level checks, then each chunk check at its worst verdict."""
    reports = [p.trust for p in parts if p.trust is not None]
    n = sum(p.n for p in parts)
    merged = TrustReport(checks=list(opened.checks), adaptations=list(opened.adaptations), stochastic=opened.stochastic)
    grouped: dict[tuple[str, str | None], list[CheckResult]] = {}
    for report in reports:
        for check in report.checks:
            grouped.setdefault((check.name, check.threat), []).append(check)
    for checks in grouped.values():
        worst = max(checks, key=lambda c: _RANK[c.verdict])  # the first chunk with the worst verdict
        if len(reports) > 1:
            worst = replace(worst, summary=f"{worst.summary} (worst of {len(reports)} chunks)")
        merged.checks.append(worst)
    for report in reports:
        merged.adaptations.extend(a for a in report.adaptations if a not in merged.adaptations)
    threats = dict.fromkeys(k for r in reports for k in r.white_box_robust_accuracy)
    for key in threats:
        total = sum(r.white_box_robust_accuracy.get(key, 0.0) * p.n for r, p in zip(reports, parts))
        merged.white_box_robust_accuracy[key] = total / n if len(reports) > 1 else reports[0].white_box_robust_accuracy[key]
    merged.masking = any(r.masking for r in reports)
    forwards = sum(r.passes[0] for r in reports) + opened.passes[0]
    backwards = sum(r.passes[1] for r in reports) + opened.passes[1]
    merged.passes = (forwards, backwards)
    return merged


def merge_certified(
    finals: list[ChunkFinal], clean_correct: torch.Tensor, l2_threats: list[tuple[str, float]], budget: str
) -> CertifyResult | None:
    """The certificate over every sample: unavailable if any chunk's was."""
    results = [f.certified for f in finals]
    if all(r is None for r in results):
        return None
    if any(r is None for r in results):
        raise RuntimeError("internal error: some chunks were certified and others not")
    seconds = sum(r.seconds for r in results)  # type: ignore[union-attr]
    adversarial_l2 = _cat([r.adversarial_l2 for r in results])  # type: ignore[union-attr]
    missing = next((r for r in results if r.radius is None), None)  # type: ignore[union-attr]
    if missing is not None:
        return unavailable(missing.summary.reason or "certificate unavailable", budget, adversarial_l2, seconds)
    if len(results) == 1:
        return results[0]
    radius = _cat([r.radius for r in results])  # type: ignore[union-attr, misc]
    method = [m for r in results for m in r.method]  # type: ignore[union-attr]
    notes = _chunk_notes([r.summary.notes for r in results])  # type: ignore[union-attr]
    summary = _summary_of(radius, method, clean_correct, adversarial_l2, l2_threats, budget, notes)
    return CertifyResult(summary=summary, radius=radius, method=method, adversarial_l2=adversarial_l2, seconds=seconds)


def _chunk_notes(chunk_notes: list[list[str]]) -> list[str]:
    """Every chunk's certificate notes in order, each once (one chunk alone may have certified a ball its
    ONNX check notes), with the count of samples at radius 0 summed over the chunks."""
    from robaudit.certify.certificate import radius_zero_counts, radius_zero_note

    counts = [c for notes in chunk_notes for c in map(radius_zero_counts, notes) if c is not None]
    notes = list(dict.fromkeys(n for chunk in chunk_notes for n in chunk if radius_zero_counts(n) is None))
    if counts:
        notes.append(radius_zero_note(sum(c[0] for c in counts), sum(c[1] for c in counts)))
    return notes


def merge_indicator(finals: list[ChunkFinal], sizes: list[int], threats: list[Threat]) -> IndicatorResult | None:
    """The indicator over every sample: per-sample values joined, the model-level score recomputed."""
    from robaudit.measures.indicator import SampleIndicator
    from robaudit.measures.score import aggregate

    results = [f.indicator for f in finals]
    if all(r is None for r in results):
        return None
    if any(r is None for r in results):
        raise RuntimeError("internal error: the indicator ran on some chunks and not on others")
    if len(results) == 1:
        return results[0]
    samples = [s for r in results for s in r.samples]  # type: ignore[union-attr]
    model_level = aggregate([SampleIndicator(**s) for s in samples], [t for t in threats if not t.is_spatial])
    first = results[0].summary  # type: ignore[union-attr]
    n = sum(sizes)

    def weighted(key: str) -> float:
        return sum(r.summary[key] * size for r, size in zip(results, sizes)) / n  # type: ignore[union-attr]

    model_level.zero_threshold = first["zero_threshold"]
    model_level.curvature_scale = first["curvature_scale"]
    model_level.curvature_scales = first["curvature_scales"]
    model_level.hvp_per_sample = math.ceil(weighted("hvp_per_sample"))
    model_level.forwards_per_sample = weighted("forwards_per_sample")
    model_level.backwards_per_sample = weighted("backwards_per_sample")
    summary = model_level.to_dict()
    summary.pop("seconds", None)
    return IndicatorResult(summary=summary, samples=samples, seconds=sum(r.seconds for r in results))  # type: ignore[union-attr]
