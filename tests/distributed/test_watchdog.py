"""The watchdog names the rank that did not arrive at a collective, and why (parallel/watchdog.py).

Two gloo ranks, groups with a 2 s timeout: rank 1 first sleeps in another phase (alive), then
stops itself with SIGSTOP (not responding); each time rank 0's all-reduce times out and the error
it raises names rank 1, its step and phase, within a few seconds of the timeout."""
import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from parallel.watchdog import CollectiveError, Watchdog, is_collective_error
from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed

TIMEOUT_S = 2.0


def _late_peer(rank: int, world_size: int, how: str, watchdog: Watchdog):
    group = dist.new_group(list(range(world_size)), timeout=timedelta(seconds=TIMEOUT_S))
    watchdog.mark(5, "train step")
    dist.barrier()  # both in the same step and phase
    time.sleep(2 * watchdog.interval)  # and both heartbeats published
    if rank == 1:
        watchdog.mark(5, "data loading")
        if how == "sleep":
            time.sleep(TIMEOUT_S + 3 * watchdog.interval + 1.5)  # past rank 0's timeout and watch window
        else:
            os.kill(os.getpid(), signal.SIGSTOP)  # rank 0 continues it once it has explained
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(3), group=group)
    except RuntimeError as e:
        assert is_collective_error(e), e
        explained = watchdog.explain(e)
        elapsed = time.monotonic() - start
        if how == "stop":
            os.kill(watchdog._read()[1]["pid"], signal.SIGCONT)
        return str(explained), elapsed, isinstance(explained, CollectiveError)
    raise AssertionError("the all-reduce did not time out")


def _both_cases(rank: int, world_size: int):
    out = []
    for how in ("sleep", "stop"):
        watchdog = Watchdog.start(rank, world_size, TIMEOUT_S)
        try:
            out.append(_late_peer(rank, world_size, how, watchdog))
        finally:
            watchdog.stop()
        dist.barrier()  # the world group is unaffected by the timed-out one
    return out


def test_timeout_names_the_rank_that_did_not_arrive():
    results = run_distributed(_both_cases, 2, timeout_s=120)[0]
    for (message, elapsed, typed), expected in zip(results, ["rank 1 (alive, at step 5 in 'data loading'",
                                                             "rank 1 (not responding, dead or stopped"]):
        assert typed
        assert message.startswith("rank 0: collective failed at step 5 in 'train step', "), message
        assert "(parallel.timeout_s=2): Timed out waiting 2000ms" in message, message
        assert f"did not arrive: {expected}" in message, message
        assert "\n" not in message
        # The timeout, then at most the watch window (3 heartbeat intervals, >= 1 s) and some slack.
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.0 + 3.0, (elapsed, message)


def test_other_errors_are_left_alone():
    assert not is_collective_error(ValueError("bad shape"))
    assert not is_collective_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert is_collective_error(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
