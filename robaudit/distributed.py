"""Sharing one scan among the processes `torchrun` starts (torch.distributed).

`torchrun --nproc-per-node N -m robaudit scan ...` (or ``--nnodes`` for several machines)
starts N copies of the same command with RANK / WORLD_SIZE / LOCAL_RANK in their
environment. Each copy loads the model and the data's index list, audits the chunks
k with k % WORLD_SIZE == RANK, and sends its results to rank 0, which merges them, writes
the report and decides the exit code. Results do not depend on the number of ranks:
every chunk is audited alone with its own seed (`robaudit.stages.chunk`).

The process group uses gloo for the few small messages (per-chunk results, cost sums)
and NCCL beside it when the ranks use GPUs. A rank that stops (crash, kill, lost
machine) makes the others fail at the next exchange; `RankFailure` turns that into one
line and a non-zero exit, and nothing is written as a final report.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from robaudit.errors import RobauditError

EXCHANGE_TIMEOUT = timedelta(hours=24)  # a rank may audit its shard for hours before the next exchange
ERROR_KEY = "robaudit/error"  # a rank's one-line error, under this key plus its rank, in torchrun's store


class RankFailure(RobauditError):
    """Another rank of a torchrun scan stopped: this one cannot finish the scan either."""

    exit_code = 3


@dataclass
class Cluster:
    """This process's place among the scan's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) of every rank, to name one that died
    terminated: str | None = None  # why the launcher's SIGTERM stopped this rank, once it has

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, chunks: int) -> list[int]:
        """The chunks this rank audits: every world-th one, starting at its rank."""
        return list(range(self.rank, chunks, self.world))

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere).

        The scan's last exchange, so it ends with a barrier: no rank goes on to tear down its
        connections (`close`) while rank 0 may still be receiving. Without it a sending rank
        that finished first was once aborted by gloo ("terminate called without an active
        exception", SIGABRT) in CI's resumed two-rank scan.
        """
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        self._exchange(lambda: torch.distributed.gather_object(obj, out, dst=0), "sending results to rank 0")
        self.barrier("sending results to rank 0")
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks, known to every rank."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        self._exchange(lambda: torch.distributed.all_reduce(tensor), "summing the ranks' costs")
        return tensor.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        self._exchange(lambda: torch.distributed.broadcast_object_list(box, src=0), "receiving rank 0's decision")
        return box[0]

    def agree(self, facts: dict[str, Any]) -> None:
        """Every rank loaded the same model, data and settings as rank 0, or every rank stops with one line.

        Ranks on several machines run the same command on their own copies: a copy with
        other pixels or other weights would be merged into one report without a word.
        """
        if not self.distributed:
            return
        everyone: list[Any] = [None] * self.world
        self._exchange(lambda: torch.distributed.all_gather_object(everyone, facts), "comparing what each rank loaded")
        for rank, other in enumerate(everyone[1:], start=1):
            differs = sorted(k for k in set(everyone[0]) | set(other) if everyone[0].get(k) != other.get(k))
            if differs:
                raise RobauditError(
                    f"rank {rank} loaded other inputs than rank 0 (they differ in: {', '.join(differs)}); every rank must "
                    "run the same command on identical copies of the model and data"
                )

    def barrier(self, what: str) -> None:
        """Wait for every rank; name the ones that stopped (gloo's monitored barrier does)."""
        if self.distributed:
            self._exchange(lambda: torch.distributed.monitored_barrier(timeout=EXCHANGE_TIMEOUT), what)

    def _exchange(self, action, what: str) -> None:
        try:
            action()
        except RuntimeError as exc:  # gloo/NCCL errors: a peer closed its connection or timed out
            raise RankFailure(f"{self.stopped()} while {what}; no report written") from exc

    def dead_ranks(self) -> list[int]:
        """Ranks on this machine whose process is gone (other machines' ranks cannot be checked from here)."""
        host = socket.gethostname()
        dead = []
        for rank, (peer_host, pid) in enumerate(self.peers):
            if rank == self.rank or peer_host != host:
                continue
            if not _alive(pid):
                dead.append(rank)
        return dead

    def report_error(self, message: str) -> None:
        """Leave this rank's one-line error in the launcher's store, so the ranks it stops can name it.

        Best effort: the store is torchrun's rendezvous store (on every machine of the run);
        without it the others still stop, only with a vaguer line.
        """
        if not self.distributed:
            return
        try:
            store = torch.distributed.distributed_c10d._get_default_store()
            store.set(f"{ERROR_KEY}/{self.rank}", message)
        except Exception:  # noqa: BLE001 - a missing store must not hide the error itself
            pass

    def peer_error(self) -> tuple[int, str] | None:
        """(rank, its one-line error) of another rank that stopped on an error it reported, if any."""
        try:
            store = torch.distributed.distributed_c10d._get_default_store()
            for rank in range(self.world):
                key = f"{ERROR_KEY}/{rank}"
                if rank != self.rank and store.check([key]):
                    return rank, store.get(key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store may be gone with the launcher
            return None
        return None

    def stopped(self) -> str:
        """Why this rank cannot go on, naming the rank that stopped (and its error) or died where it can."""
        reported = self.peer_error()
        if reported is not None:
            return f"rank {reported[0]} of {self.world} stopped: {reported[1]}; so rank {self.rank} stopped too"
        dead = self.dead_ranks()
        for _ in range(10):  # a killed peer's sockets close a moment before the OS marks it dead
            if dead:
                break
            time.sleep(0.1)
            dead = self.dead_ranks()
        if dead:
            named = ", ".join(f"rank {r} (pid {self.peers[r][1]})" for r in dead)
            return f"{named} of {self.world} died, so rank {self.rank} stopped too"
        return f"another rank of {self.world} stopped, so rank {self.rank} stopped too"

    def on_terminate(self, signum: int, frame) -> None:
        """torchrun ends the other ranks with SIGTERM when one fails: one line, no report, non-zero exit.

        The exception is raised wherever the main thread is. Library code that swallows broad
        exceptions (an import guard inside torch, say) may turn it into another error later,
        so the reason is kept too: `failure` reports it whatever surfaces.
        """
        self.terminated = f"{self.stopped()} (the launcher sent SIGTERM); no report written"
        raise RankFailure(self.terminated)

    def failure(self, exc: BaseException) -> BaseException:
        """The error to report for `exc`: the rank failure when the launcher has stopped this rank."""
        if self.terminated is None or isinstance(exc, RankFailure):
            return exc
        return RankFailure(self.terminated)

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _alive(pid: int) -> bool:
    """Whether a process runs: gone, or a zombie its launcher has not reaped yet, counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def join(device: str) -> Cluster:
    """The cluster this process belongs to: torchrun's environment, or a cluster of one."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Cluster()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group(backend=backend, timeout=EXCHANGE_TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise RankFailure(f"rank {rank} of {world}: cannot join the other ranks ({reason})") from exc
    cluster = Cluster(rank=rank, world=world, local_rank=local_rank)
    peers: list = [None] * world
    cluster._exchange(lambda: torch.distributed.all_gather_object(peers, (socket.gethostname(), os.getpid())), "starting")
    cluster.peers = peers
    signal.signal(signal.SIGTERM, cluster.on_terminate)
    return cluster
