"""Batch sizes that back off on CUDA out-of-memory: the attack stage completes with the
results it would have had at the smaller size, and the report note says what happened."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import bundled_digits, demo_classifier
from robaudit.attacks import PGD, AttackRun, run_threat
from robaudit.attacks.runner import predict, run_minimal, run_spatial
from robaudit.attacks.spatial import SpatialGrid
from robaudit.attacks.square import Square
from robaudit.batching import AdaptiveBatch
from robaudit.battery import build_battery
from robaudit.errors import RobauditError
from robaudit.threats import Threat, parse_threat

CPU = torch.device("cpu")


class SmallGPU(nn.Module):
    """A real model on a pretend GPU that holds at most `limit` inputs: a bigger batch
    raises CUDA's out-of-memory error, as the forward pass of a large batch would."""

    def __init__(self, net: nn.Module, limit: int) -> None:
        super().__init__()
        self.net = net
        self.limit = limit
        self.failures = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} inputs")
        return self.net(x)


def digits(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = bundled_digits()
    return torch.tensor(x[:n], dtype=torch.float32) / 255.0, torch.tensor(y[:n], dtype=torch.long)


def attack_stage(model: nn.Module, batch_size: int | AdaptiveBatch, battery: list[AttackRun], threat: str):
    """The scan's attack stage on the demo model: clean pass, minimal-norm stage, fixed-eps battery."""
    x, y = digits()
    kw = dict(lower=0.0, upper=1.0, num_classes=10, batch_size=batch_size, device=CPU, seed=3)
    correct = predict(model, x, batch_size, CPU) == y
    parsed = parse_threat(threat)
    minimal = run_minimal(model, x, y, correct, parsed.norm, parsed.eps, [r for r in battery if r.attack.kind == "minimal"], **kw)
    outcome = run_threat(model, x, y, correct, parsed, battery, minimal=minimal, **kw)
    return correct, minimal, outcome


def battery() -> list[AttackRun]:
    """Random starts and random search: a retried chunk that did not restart from its own
    generator state would draw different noise and end elsewhere."""
    return [
        *build_battery([{"attack": "fmn", "steps": 10}]),
        AttackRun(PGD(steps=5), restarts=2),
        AttackRun(Square(n_queries=30)),
    ]


def test_attack_stage_after_out_of_memory_matches_a_run_at_the_smaller_size(one_thread) -> None:
    net = demo_classifier()
    reference = attack_stage(SmallGPU(net, limit=4), 4, battery(), "linf:0.1")
    small_gpu = SmallGPU(net, limit=4)
    batch = AdaptiveBatch(16)
    correct, minimal, outcome = attack_stage(small_gpu, batch, battery(), "linf:0.1")

    assert small_gpu.failures >= 2  # 16 -> 8 -> 4
    assert batch.size == 4
    assert batch.note == "batch size reduced from 16 to 4 after CUDA out-of-memory"
    ref_correct, ref_minimal, ref_outcome = reference
    assert torch.equal(correct, ref_correct)
    assert torch.equal(minimal.distance, ref_minimal.distance) and minimal.found_by == ref_minimal.found_by
    assert torch.equal(outcome.broken, ref_outcome.broken) and outcome.broken_by == ref_outcome.broken_by
    assert torch.equal(outcome.distance.nan_to_num(-1), ref_outcome.distance.nan_to_num(-1))
    assert torch.equal(outcome.x_adv, ref_outcome.x_adv)
    assert 0 < int(outcome.broken.sum()) < int(correct.sum())  # the comparison is not vacuous
    counts = [(r.name, r.broke, r.forwards, r.backwards) for r in [*minimal.records, *outcome.records]]
    assert counts == [(r.name, r.broke, r.forwards, r.backwards) for r in [*ref_minimal.records, *ref_outcome.records]]


@pytest.mark.parametrize("first", [AttackRun(PGD(steps=5), restarts=2), AttackRun(Square(n_queries=30))])
def test_a_random_attack_retries_its_chunk_from_the_chunk_start_state(one_thread, first: AttackRun) -> None:
    """The first out-of-memory comes inside a random attack, after it drew its starting noise."""
    net = demo_classifier()
    x, y = digits()
    correct = predict(net, x, 64, CPU) == y
    kw = dict(lower=0.0, upper=1.0, num_classes=10, device=CPU, seed=5)
    threat = parse_threat("linf:0.1")
    reference = run_threat(SmallGPU(net, limit=4), x, y, correct, threat, [first], batch_size=4, **kw)
    batch = AdaptiveBatch(16)
    outcome = run_threat(SmallGPU(net, limit=4), x, y, correct, threat, [first], batch_size=batch, **kw)
    assert batch.size == 4
    assert torch.equal(outcome.broken, reference.broken) and torch.equal(outcome.x_adv, reference.x_adv)
    record, ref = outcome.records[0], reference.records[0]
    assert (record.broke, record.forwards, record.backwards) == (ref.broke, ref.forwards, ref.backwards)


def test_spatial_stage_backs_off_too(one_thread) -> None:
    net = demo_classifier()
    x, y = digits(12)
    threat = parse_threat("spatial:20,1")
    runs = [AttackRun(SpatialGrid(rotations=5, shifts=3))]
    kw = dict(lower=0.0, upper=1.0, num_classes=10, device=CPU, seed=0)
    correct = predict(net, x, 4, CPU) == y
    reference = run_spatial(SmallGPU(net, limit=4), x, y, correct, threat, runs, batch_size=4, **kw)
    batch = AdaptiveBatch(8)
    outcome = run_spatial(SmallGPU(net, limit=4), x, y, correct, threat, runs, batch_size=batch, **kw)
    assert batch.size == 4
    assert torch.equal(outcome.broken, reference.broken)
    assert torch.equal(outcome.transform.nan_to_num(-99), reference.transform.nan_to_num(-99))


def test_predict_keeps_the_reduced_size_for_later_calls() -> None:
    net = demo_classifier()
    x, _ = digits(40)
    batch = AdaptiveBatch(32)
    model = SmallGPU(net, limit=10)
    assert torch.equal(predict(model, x, batch, CPU), predict(net, x, 40, CPU))
    assert batch.size == 8 and model.failures == 2  # 32 -> 16 -> 8
    predict(model, x, batch, CPU)
    assert model.failures == 2  # the next call starts at 8


def test_out_of_memory_at_batch_size_one_is_a_clear_error() -> None:
    x, _ = digits(3)
    with pytest.raises(RobauditError, match="out of GPU memory even at batch size 1"):
        predict(SmallGPU(demo_classifier(), limit=0), x, 4, CPU)


def test_chunks_after_a_failure_cover_every_index_once_in_order() -> None:
    seen: list[tuple[int, int]] = []

    def fn(start: int, stop: int) -> int:
        if stop - start > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        seen.append((start, stop))
        return stop - start

    batch = AdaptiveBatch(12)
    assert sum(batch.run(11, fn)) == 11  # the first chunk (11) fails, then 6, then 3 fits
    assert seen == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert batch.note == "batch size reduced from 12 to 3 after CUDA out-of-memory"


def test_restore_runs_before_the_retry_and_other_errors_pass_through() -> None:
    state = {"value": 0, "restored": 0}

    def checkpoint():
        saved = state["value"]

        def restore() -> None:
            state["value"] = saved
            state["restored"] += 1

        return restore

    def fn(start: int, stop: int) -> None:
        state["value"] += 100  # partial work of a chunk that then runs out of memory
        if stop - start > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        state["value"] -= 99

    AdaptiveBatch(4).run(4, fn, checkpoint)
    assert state == {"value": 2, "restored": 1}
    with pytest.raises(ValueError):
        AdaptiveBatch(4).run(4, lambda start, stop: (_ for _ in ()).throw(ValueError("not memory")))
    with pytest.raises(RobauditError, match="at least 1"):
        AdaptiveBatch(0)


def test_plain_batch_sizes_still_work_for_library_callers() -> None:
    x, y = digits(20)
    outcome = run_threat(
        demo_classifier(), x, y, torch.ones(20, dtype=torch.bool), Threat(norm="linf", eps=0.05), [AttackRun(PGD(steps=2))],
        lower=0.0, upper=1.0, num_classes=10, batch_size=7, device=CPU, seed=0,
    )  # fmt: skip
    assert outcome.records[0].attempted == 20
