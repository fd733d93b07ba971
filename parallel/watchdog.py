"""No silent hangs: a heartbeat per rank through the c10d store, and failed collectives explained.

Every collective has a timeout already (parallel.timeout_s, given to init_process_group): gloo
raises "Timed out waiting 600000ms for recv operation", nccl's watchdog aborts. Neither says which
rank did not arrive nor where the job was. This module adds that:

    1. every rank runs a daemon thread that writes its heartbeat to the job's c10d store every
       `interval` seconds: a counter, and where the main thread is (step, phase);
    2. the training loop marks its phases (`mark`: two attribute writes, no I/O on the hot path);
    3. when a collective fails on a rank (timeout, peer gone), `explain` marks the rank failed,
       watches the peers' heartbeats for a few intervals and names the peers that did not fail
       with it: a peer whose counter stopped is dead or stopped (SIGKILL, SIGSTOP, a lost node), a
       peer whose counter moves is alive elsewhere (another phase, or stuck inside this one);
    4. the rank raises `CollectiveError` with that line; the entry point exits non-zero and
       torchrun ends (or, with train.max_restarts, restarts) the job.

Under torchrun the store is the agent's (TORCHELASTIC_USE_AGENT_STORE), so it outlives any rank;
heartbeats are keyed by torchrun's restart count, so a restarted job never reads stale ones.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

_TRANSPORT_HINTS = ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe",
                    "socket", "peer")


class CollectiveError(RuntimeError):
    """A collective failed; the message names the phase, the step and the ranks that did not arrive."""


def is_collective_error(error: BaseException) -> bool:
    """Distributed errors (torch's DistError family) and the RuntimeErrors gloo/nccl raise."""
    if isinstance(error, CollectiveError):
        return False  # explained already
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(hint in text for hint in _TRANSPORT_HINTS)


def heartbeat_interval(timeout_s: float) -> float:
    """A tenth of the collective timeout, within [0.1, 5] s: a stopped peer is told apart from a live
    one well within the timeout, and a large job's store sees world_size / 5 writes per second."""
    return min(max(timeout_s / 10.0, 0.1), 5.0)


class Watchdog:
    """The heartbeat thread and the failure explanation of one rank (see the module docstring).

    Args:
        rank, world_size: this rank and the job's size.
        timeout_s: parallel.timeout_s, quoted in messages and setting the heartbeat interval.
        store: a c10d store every rank reaches; default: a client of MASTER_ADDR:MASTER_PORT.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = heartbeat_interval(timeout_s)
        self.step, self.phase, self._phase_start = 0, "setup", time.monotonic()
        self._failed = False
        self._beats = 0
        self._prefix = f"sparseforge/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._store = store if store is not None else _store_client(self.interval)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the store client is shared by the thread and `explain`
        self._thread = threading.Thread(target=self._run, name="sparseforge-heartbeat", daemon=True)

    @classmethod
    def start(cls, rank: int, world_size: int, timeout_s: float, store=None) -> "Watchdog | NullWatchdog":
        """A running watchdog, or one that does nothing on a single process (no peers to wait for)."""
        if world_size <= 1:
            return NullWatchdog()
        watchdog = cls(rank, world_size, timeout_s, store)
        watchdog._publish()
        watchdog._thread.start()
        return watchdog

    def mark(self, step: int, phase: str) -> None:
        """The main thread enters `phase` of `step` (published with the next heartbeat)."""
        self.step, self.phase, self._phase_start = step, phase, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _state(self) -> dict:
        return {"beat": self._beats, "time": time.time(), "step": self.step, "phase": self.phase,
                "in_phase_s": round(time.monotonic() - self._phase_start, 3), "failed": self._failed,
                "host": socket.gethostname(), "pid": os.getpid()}

    def _publish(self) -> None:
        self._beats += 1
        with self._lock:
            self._store.set(self._prefix + str(self.rank), json.dumps(self._state()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the rank; the next beat retries
                pass

    def _read(self) -> dict[int, dict]:
        """The peers' latest heartbeats (peers that never wrote one are absent)."""
        out = {}
        with self._lock:
            for peer in range(self.world_size):
                key = self._prefix + str(peer)
                if peer != self.rank and self._store.check([key]):
                    out[peer] = json.loads(self._store.get(key))
        return out

    def explain(self, error: BaseException) -> CollectiveError | None:
        """For a failed collective: the error naming the peers that did not arrive (None for other errors).

        Peers that fail within the watch window waited in the same collective and are not named.
        The window lasts until every peer has failed, at most max(3 intervals, 1 s), so a stopped
        peer's heartbeat is seen not to move.
        """
        if not is_collective_error(error):
            return None
        in_phase = time.monotonic() - self._phase_start
        self._failed = True
        try:
            self._publish()
            first = self._read()
            deadline = time.monotonic() + max(3 * self.interval, 1.0)
            latest = first
            while time.monotonic() < deadline and not all(latest.get(p, {}).get("failed") for p in self._peers()):
                time.sleep(self.interval / 2)
                latest = self._read()
            missing = [self._describe(p, first.get(p), latest.get(p)) for p in self._peers()
                       if not latest.get(p, {}).get("failed")]
        except Exception as e:  # noqa: BLE001 - the store is gone too: say so, keep the original error
            missing = [f"unknown (the c10d store did not answer: {_first_line(e)})"]
        where = (f"rank {self.rank}: collective failed at step {self.step} in '{self.phase}', {in_phase:.1f} s into it "
                 f"(parallel.timeout_s={self.timeout_s:g}): {_first_line(error)}")
        if missing:
            return CollectiveError(f"{where}; did not arrive: {'; '.join(missing)}")
        return CollectiveError(f"{where}; every other rank failed in it too (a network or store problem?)")

    def _peers(self) -> list[int]:
        return [p for p in range(self.world_size) if p != self.rank]

    def _describe(self, peer: int, first: dict | None, latest: dict | None) -> str:
        if latest is None:
            return f"rank {peer} (never sent a heartbeat)"
        where = f"at step {latest['step']} in '{latest['phase']}'"
        age = time.time() - latest["time"]
        if first is not None and latest["beat"] == first["beat"]:
            return f"rank {peer} (not responding, dead or stopped: last heartbeat {age:.1f} s ago, {where}, " \
                   f"pid {latest['pid']} on {latest['host']})"
        return f"rank {peer} (alive, {where} for {latest['in_phase_s']:.1f} s)"


class NullWatchdog:
    """One process: nothing to watch."""

    step, phase = 0, "start"

    def mark(self, step: int, phase: str) -> None:
        pass

    def stop(self) -> None:
        pass

    def explain(self, error: BaseException) -> None:
        return None


def _store_client(interval: float):
    """A store client of its own (not the process group's), so a heartbeat never waits on the main
    thread's store traffic; short timeout: a store that does not answer is reported, not waited on."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if host and port:
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=max(5.0, 4 * interval)),
                             wait_for_workers=False)
    return dist.distributed_c10d._get_default_store()  # initialised by other means (a file store...)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", line)  # gloo's "[.../pair.cc:123] " source prefix
    return line if len(line) <= 300 else line[:297] + "..."
