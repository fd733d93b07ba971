"""Starting the rank processes: torchrun (torch.distributed.run), locally or across nodes, or the
deepspeed launcher (`deepspeed_command`: one node, or the hosts of an MPI-style hostfile over ssh).

Rendezvous across nodes, chosen by `NodeArgs.rdzv_backend`:
    static  every node is told its node rank; node 0 hosts the store at master_addr:master_port.
    c10d    node ranks are assigned by the rendezvous (any order, any node may start first); the
            node whose address is the endpoint's hosts the store. This node's own address (what
            the other nodes and the ranks' MASTER_ADDR use) is `local_addr`, by default the
            address this node reaches the endpoint from, not the hostname: hostnames are often
            shared (containers, network namespaces) or resolve to an unreachable interface.
Gloo picks its interface from the hostname too unless GLOO_SOCKET_IFNAME is set; the ranks
inherit the environment, so set it on every node when the hostname is not routable.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RDZV_BACKENDS = ("static", "c10d")
DEFAULT_PORT = 29500


@dataclass
class NodeArgs:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0  # static rendezvous only
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_backend: str = "static"
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous (default master addr:port)
    rdzv_id: str = "sparseforge"  # the same on every node of one job
    local_addr: str | None = None  # c10d: this node's address (default: the one facing the endpoint)
    max_restarts: int = 0  # train.max_restarts: torchrun restarts every rank after a failure


def split_endpoint(endpoint: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """"host:port", "host" or "[v6 address]:port" -> (host, port); ValueError on a bad port."""
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        port = rest.lstrip(":")
    elif endpoint.count(":") == 1:
        host, port = endpoint.split(":")
    else:
        host, port = endpoint, ""  # no port, or a bare IPv6 address
    return host, int(port) if port else default_port


def is_local_address(host: str) -> bool:
    """Whether `host` is an address of this machine (of this network namespace): it can be bound."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def address_towards(host: str, port: int) -> str | None:
    """The local address the kernel routes from to reach host:port (no packet is sent)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return s.getsockname()[0]
    except OSError:
        return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def c10d_endpoint(nodes: NodeArgs) -> str:
    return nodes.rdzv_endpoint or f"{nodes.master_addr or '127.0.0.1'}:{nodes.master_port or DEFAULT_PORT}"


def c10d_node(nodes: NodeArgs) -> tuple[bool | None, str | None]:
    """(whether this node hosts the c10d store, None: let torchrun decide; this node's address)."""
    host, port = split_endpoint(c10d_endpoint(nodes))
    # torchrun decides "I host the store" by hostname, wrong when hosts share one; binding the
    # endpoint's address is the ground truth. Loopback endpoints (several node agents on one
    # machine) are left to torchrun's try-to-host-then-connect fallback.
    is_host = None if _is_loopback(host) else is_local_address(host)
    return is_host, nodes.local_addr or address_towards(host, port)


def rendezvous_args(nodes: NodeArgs, probe: bool = True) -> list[str]:
    """torchrun's node and rendezvous flags for `nodes`.

    `probe`: decide here (from this machine's addresses) whether this node hosts the c10d store
    and which address it shows the others. False for a command written into a script that runs
    on other machines (the SLURM launcher): torchrun decides there, by hostname.
    """
    if nodes.nnodes == 1 and nodes.master_addr is None and nodes.rdzv_endpoint is None:
        return ["--standalone"]  # a free local port each time: concurrent jobs do not collide
    if nodes.rdzv_backend == "static":
        return [f"--nnodes={nodes.nnodes}", f"--node-rank={nodes.node_rank}",
                f"--master-addr={nodes.master_addr or '127.0.0.1'}",
                f"--master-port={nodes.master_port or DEFAULT_PORT}"]
    args = [f"--nnodes={nodes.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={c10d_endpoint(nodes)}",
            f"--rdzv-id={nodes.rdzv_id}"]
    if not probe:
        return args
    is_host, local_addr = c10d_node(nodes)
    if is_host is not None:
        args.append(f"--rdzv-conf=is_host={'true' if is_host else 'false'}")
    if local_addr:
        args.append(f"--local-addr={local_addr}")
    return args


def torchrun_command(nodes: NodeArgs, config_path: str, run_dir: str, resume: str | None,
                     python: str = sys.executable, probe: bool = True) -> list[str]:
    """The torchrun command line of one node (`python`, `probe`: see `rendezvous_args`)."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nodes.nproc_per_node}",
           *rendezvous_args(nodes, probe)]
    if nodes.max_restarts > 0:  # every start resumes from the run directory's latest checkpoint
        cmd.append(f"--max-restarts={nodes.max_restarts}")
    cmd += ["-m", "trainer.entry", "--config", config_path, "--run-dir", run_dir]
    if resume:
        cmd += ["--resume", resume]
    return cmd


def describe(nodes: NodeArgs) -> str | None:
    """One line saying how this node joins a multi-node job (None on one node)."""
    if nodes.nnodes == 1:
        return None
    if nodes.rdzv_backend == "static":
        return (f"node {nodes.node_rank} of {nodes.nnodes}, static rendezvous at "
                f"{nodes.master_addr}:{nodes.master_port or DEFAULT_PORT}")
    is_host, local_addr = c10d_node(nodes)
    return (f"{nodes.nnodes} nodes, c10d rendezvous {nodes.rdzv_id!r} at {c10d_endpoint(nodes)}; this node "
            f"{local_addr or '(by hostname)'}{', hosting the store' if is_host else ''}")


def deepspeed_command(nodes: NodeArgs, config_path: str, run_dir: str, resume: str | None,
                      hostfile: str | None = None, python: str = sys.executable) -> list[str]:
    """The deepspeed launcher's command line (what the `deepspeed` script runs).

    One node: --num_gpus ranks here, on a free port unless --master-port is given. With a hostfile
    (MPI style, a `host slots=N` line per node) the runner starts --num_nodes of its hosts over
    pdsh/ssh, --num_gpus ranks on each; node 0's address is --master-addr or its `hostname -I`.
    The ranks run `python -m trainer.entry` (--module) and read LOCAL_RANK from the environment
    (--no_local_rank). On CPU DeepSpeed picks its cpu accelerator by itself and binds no cores
    (--bind_cores_to_rank is off); the trainer joins gloo, deepspeed.comm wraps it.
    """
    port = nodes.master_port or (DEFAULT_PORT if hostfile else _free_port())
    cmd = [python, "-m", "deepspeed.launcher.runner", f"--num_gpus={nodes.nproc_per_node}"]
    if hostfile:
        cmd += [f"--hostfile={hostfile}", f"--num_nodes={nodes.nnodes}"]
    if nodes.master_addr:
        cmd.append(f"--master_addr={nodes.master_addr}")
    cmd += [f"--master_port={port}", "--no_local_rank", "--module", "trainer.entry",
            "--config", config_path, "--run-dir", run_dir]
    if resume:
        cmd += ["--resume", resume]
    return cmd


def hostfile_problem(path: str, nnodes: int, nproc_per_node: int) -> str | None:
    """Why a deepspeed hostfile cannot hold nnodes x nproc_per_node ranks (None: it can)."""
    if not os.path.isfile(path):
        return f"--hostfile {path}: no such file"
    hosts = []
    with open(path) as f:
        for line in f:
            words = line.split("#")[0].split()
            if not words:
                continue
            slots = [w.split("=", 1)[1] for w in words[1:] if w.startswith("slots=")]
            if len(words) != 2 or not slots or not slots[0].isdigit():
                return f"--hostfile {path}: expected 'HOST slots=N' lines, got {line.strip()!r}"
            hosts.append((words[0], int(slots[0])))
    if len(hosts) < nnodes:
        return f"--hostfile {path}: {len(hosts)} hosts for --nnodes {nnodes}"
    short = [host for host, slots in hosts[:nnodes] if slots < nproc_per_node]
    if short:
        return f"--hostfile {path}: host {short[0]} has fewer slots than --nproc-per-node {nproc_per_node}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(nodes: NodeArgs) -> dict[str, str]:
    """The environment the launcher hands the ranks."""
    env = dict(os.environ)
    # The ranks import this checkout even when it is not pip-installed.
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # One id for this launch, inherited by torchrun's restarts and written into each checkpoint's
    # manifest: a restart resumes from this launch's own checkpoints, not --resume again
    # (trainer.checkpoint.LAUNCH_ID_ENV; not imported here, it would import torch).
    env["SPARSEFORGE_LAUNCH_ID"] = uuid.uuid4().hex
    if nodes.max_restarts > 0:
        # torchrun (2.5+) shares its rendezvous store with the ranks by default, and a restarted
        # round reads the previous round's gloo/nccl addresses from it: every restart fails to
        # connect (pytorch/pytorch#135712). A store per round avoids that.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if nodes.nproc_per_node > 1:
        # One intra-op thread per rank unless the user chose otherwise: ranks share the cores.
        cores = os.cpu_count() or 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nodes.nproc_per_node)))
    return env


def spawn_torchrun(nodes: NodeArgs, config_path: str, run_dir: str, resume: str | None) -> int:
    """Run torchrun in the foreground and return its exit code."""
    line = describe(nodes)
    if line:
        print(line, flush=True)
    return _run(torchrun_command(nodes, config_path, run_dir, resume), _rank_env(nodes))


def spawn_deepspeed(nodes: NodeArgs, config_path: str, run_dir: str, resume: str | None,
                    hostfile: str | None = None) -> int:
    """Run the deepspeed launcher in the foreground and return its exit code."""
    if hostfile:
        print(f"{nodes.nnodes} nodes of {hostfile} x {nodes.nproc_per_node} ranks, started by the deepspeed runner",
              flush=True)
    return _run(deepspeed_command(nodes, config_path, run_dir, resume, hostfile), _rank_env(nodes))


def _run(cmd: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()  # torchrun and the deepspeed launcher forward it to the ranks
        return proc.wait()
