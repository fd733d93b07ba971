"""Starting the rank processes: torchrun (torch.distributed.run), locally or across nodes."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class NodeArgs:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def torchrun_command(nodes: NodeArgs, config_path: str, run_dir: str, resume: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nodes.nproc_per_node}"]
    if nodes.nnodes == 1 and nodes.master_addr is None:
        cmd.append("--standalone")  # a free local port each time: concurrent jobs do not collide
    else:
        cmd += [f"--nnodes={nodes.nnodes}", f"--node-rank={nodes.node_rank}",
                f"--master-addr={nodes.master_addr or '127.0.0.1'}", f"--master-port={nodes.master_port or 29500}"]
    cmd += ["-m", "trainer.entry", "--config", config_path, "--run-dir", run_dir]
    if resume:
        cmd += ["--resume", resume]
    return cmd


def spawn_torchrun(nodes: NodeArgs, config_path: str, run_dir: str, resume: str | None) -> int:
    """Run torchrun in the foreground and return its exit code."""
    env = dict(os.environ)
    # The ranks import this checkout even when it is not pip-installed.
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if nodes.nproc_per_node > 1:
        # One intra-op thread per rank unless the user chose otherwise: ranks share the cores.
        cores = os.cpu_count() or 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nodes.nproc_per_node)))
    proc = subprocess.Popen(torchrun_command(nodes, config_path, run_dir, resume), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()  # torchrun forwards it to the ranks
        return proc.wait()
