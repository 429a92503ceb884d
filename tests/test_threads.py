"""--threads: the default follows the affinity mask, the count reaches torch, bad values are user errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from robaudit.errors import RobauditError
from robaudit.threads import apply_threads, default_threads, quiet_openmp


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_apply_threads_sets_torch_threads(restore_threads) -> None:
    assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    count = default_threads()
    assert apply_threads(None) == count and torch.get_num_threads() == count


@pytest.mark.parametrize("bad", [0, -3])
def test_threads_below_one_are_a_one_line_user_error(bad: int, restore_threads) -> None:
    with pytest.raises(RobauditError, match="--threads must be at least 1") as caught:
        apply_threads(bad)
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks on this OS")
def test_default_threads_follows_a_restricted_affinity_mask() -> None:
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from robaudit.threads import apply_threads, default_threads; import torch; "
        "print(default_threads(), apply_threads(None), torch.get_num_threads())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["1", "1", "1"]


def test_quiet_openmp_sets_passive_waiting_before_torch_loads_and_keeps_a_user_setting() -> None:
    code = (
        "import os, sys; from robaudit.threads import quiet_openmp; loaded = 'torch' in sys.modules; "
        "print(loaded, quiet_openmp(), os.environ['OMP_WAIT_POLICY'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env)
    assert done.stdout.split() == ["False", "True", "PASSIVE"]  # importing robaudit.threads does not load torch
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env={**env, "OMP_WAIT_POLICY": "ACTIVE"}
    )
    assert done.stdout.split() == ["False", "True", "ACTIVE"]


def test_quiet_openmp_is_a_no_op_once_torch_is_loaded(monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert quiet_openmp() is False and "OMP_WAIT_POLICY" not in os.environ
