"""Expert parallelism through the real CLI: 4 ranks on one node, and 2 hosts x 2 ranks of a cluster
in a box (network namespaces, rate-limited links, c10d rendezvous), with the same losses.

The multi-host tests skip, saying why, where network namespaces cannot be made (no root).
The global batch is the same in every run (4 ranks x micro batch 4), so the losses agree up to
the summation order of the reductions: relative tolerance 1e-5.
"""
import json
import os
import sys

import pytest

from launch.cli import main as cli_main
from launch.spawn import NodeArgs, rendezvous_args
from tests.helpers import cluster_box
from tests.helpers.cluster_box import ClusterBox, ClusterBoxUnavailable, own_namespaces, unavailable_reason
from tests.integration.test_cli import RECIPE, ROOT, SMALL, sparseforge

pytestmark = pytest.mark.integration

STEPS = 4
COMMON = ["--set", *SMALL, f"train.steps={STEPS}", "checkpoint.enabled=false", "eval.every=0"]
LINK_MBIT = 500
REL = 1e-5


def _needs_box():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def one_node_ep4(tmp_path_factory):
    """The reference: 4 ranks on this node, parallel.ep=4 (all-to-all over all of them)."""
    run_dir = tmp_path_factory.mktemp("one_node") / "ep4"
    proc, seconds = sparseforge("run", RECIPE, "--run-dir", str(run_dir), "--nproc-per-node", "4", *COMMON,
                                "parallel.ep=4")
    return proc, run_dir, seconds


def test_ep4_on_four_local_ranks(one_node_ep4):
    proc, run_dir, _ = one_node_ep4
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 4" in proc.stdout + proc.stderr and f"final: step {STEPS}" in proc.stdout
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(0 < v < 10 for v in losses.values()), losses


@pytest.mark.parametrize("args, message", [
    # Only a torchrun started from here needs node 0's address (a --dry-run plan and an sbatch
    # script do not); the check comes before anything is loaded or spawned.
    (["--nnodes", "2"], "--nnodes > 1 needs --master-addr (the address of node 0) or --rdzv-endpoint"),
    (["--dry-run", "--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:port"], "--rdzv-endpoint: expected HOST:PORT"),
    (["--dry-run", "--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:29400", "--node-rank", "1"],
     "c10d assigns the node ranks"),
    (["--dry-run", "--nnodes", "2", "--rdzv-backend", "static", "--rdzv-endpoint", "10.0.0.1:1"],
     "is for --rdzv-backend c10d"),
])
def test_multinode_arguments_are_checked(capsys, args, message):
    assert cli_main(["run", RECIPE, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparseforge: error: ") and message in err and "\n" not in err


def test_c10d_flags_for_torchrun():
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: this node joins, it does not host.
    flags = rendezvous_args(NodeArgs(2, 2, rdzv_backend="c10d", rdzv_endpoint="192.0.2.1:29400", rdzv_id="job"))
    assert flags[:4] == ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=192.0.2.1:29400", "--rdzv-id=job"]
    assert "--rdzv-conf=is_host=false" in flags
    local = rendezvous_args(NodeArgs(2, 2, rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:29400", rdzv_id="job"))
    assert not any(f.startswith("--rdzv-conf") for f in local)  # loopback: torchrun's own fallback
    assert "--local-addr=127.0.0.1" in local


def test_cluster_box_says_why_without_root(monkeypatch):
    monkeypatch.setattr(cluster_box, "_REASON", [])
    monkeypatch.setattr(cluster_box.os, "geteuid", lambda: 1000)
    assert "needs root" in unavailable_reason()
    with pytest.raises(ClusterBoxUnavailable, match="needs root"):
        with ClusterBox(num_hosts=2):
            pass


def test_cluster_box_limits_links_and_cleans_up():
    _needs_box()
    with pytest.raises(KeyError):
        with ClusterBox(num_hosts=2, link_mbit=100) as box:
            assert len(own_namespaces()) == 3
            across = box.measure_mbit(0, 1, megabytes=4)
            local = box.measure_mbit(0, 0, megabytes=16)  # two addresses of one host: loopback
            assert 70 < across < 110, across
            assert local > 5 * across, (local, across)
            box.popen(1, ["sleep", "600"])  # left running: close() must kill it
            raise KeyError("failure inside the box")
    assert own_namespaces() == []
    leftovers = os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []
    assert not [name for name in leftovers if name.startswith(box.name)]


@pytest.mark.parametrize("ep, overlap", [(4, "combinable"), (2, "none")])
def test_two_hosts_c10d_matches_one_node(tmp_path, one_node_ep4, ep, overlap):
    """`sparseforge run --nnodes 2` on each of 2 namespace hosts, 2 ranks each, c10d rendezvous.

    ep=4: the token all-to-all crosses the link; ep=2: each ep group stays on a host and the
    expert gradients are reduced across it. Either way the losses are the one-node ep=4 run's.
    """
    _needs_box()
    ref_proc, ref_dir, _ = one_node_ep4
    assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
    run_dir = tmp_path / f"ep{ep}"
    env = {"PYTHONPATH": ROOT, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    with ClusterBox(num_hosts=2, link_mbit=LINK_MBIT) as box:
        argv = [sys.executable, "-m", "launch.cli", "run", RECIPE, "--run-dir", str(run_dir), "--nnodes", "2",
                "--nproc-per-node", "2", "--rdzv-endpoint", f"{box.hosts[0].addr}:29400", *COMMON,
                f"parallel.ep={ep}", f"parallel.ep_overlap={overlap}"]
        results = box.run_on_hosts([argv, argv], env=env, timeout=240, cwd=ROOT)
        sent = box.link_tx_bytes()
    for host, proc in enumerate(results):
        assert proc.returncode == 0, f"host {host}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "2 nodes, c10d rendezvous" in proc.stdout
    assert sum("hosting the store" in p.stdout for p in results) == 1
    assert all(n > 100_000 for n in sent), sent  # the ranks did talk across the limited link
    want, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=REL), (step, got, want)


def test_a_lost_host_restarts_from_the_last_checkpoint_and_finishes(tmp_path):
    """The lost-node drill (tests/helpers/reliability_drills.py): host 1 of 2 killed and cut off
    mid-run; torchrun's restart and a replacement host resume from the last checkpoint; the losses
    equal a one-node run's and the steps computed twice agree."""
    _needs_box()
    from tests.helpers.reliability_drills import drill_lost_node

    result = drill_lost_node(str(tmp_path))
    details = {k: v for k, v in result.items() if k != "stderr"}
    assert result["passed"], f"{details}\n{result['stderr']}"
