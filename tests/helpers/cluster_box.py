"""Cluster in a box: N simulated hosts as Linux network namespaces on one switch, rate-limited links.

Used by tests/integration/test_multinode.py and benchmarks/ep_overlap.py:

    from tests.helpers.cluster_box import ClusterBox, unavailable_reason

    if (reason := unavailable_reason()) is not None:
        ...skip, printing reason...
    with ClusterBox(num_hosts=2, link_mbit=200) as box:
        procs = [box.popen(h, box.torchrun_argv(h, 2, ["train.py"])) for h in range(2)]
        results = box.wait_all(procs, timeout=300)

Topology (every name below lives inside the box's own namespaces; the root namespace only sees
the namespace names, which carry the creator's pid and a random suffix so concurrent boxes never
collide):
    <prefix>-sw    the switch: bridge `br0`, one port `p<i>` per host
    <prefix>-h<i>  host i: `lo` up (ranks of one host talk over it) and `eth0`, the veth peer of
                   `p<i>`, with address 198.18.0.<i+1>/24 (RFC 2544 benchmarking range; no route
                   leaves the box, so boxes may reuse it)
Rate limit: a `tc` token bucket (tbf) on both ends of every host link, egress of `eth0` (the
host's upload) and egress of `p<i>` (its download), so a host sends and receives at most
`link_mbit` across hosts. Traffic between two addresses of one host goes over `lo` (the kernel
routes local addresses through the loopback), unlimited.

Processes run with `ip netns exec` and share the file system: run directories work as on a
cluster with a shared FS. `GLOO_SOCKET_IFNAME=eth0` is set for them, so gloo binds to the host's
link address. Multi-node torchrun: `torchrun_argv` gives a real c10d rendezvous at host 0.

Cleanup guarantees: `close()` (run by `__exit__`, also when setup itself fails half way) kills
every process started through the box (process group, then any process left in its namespaces)
and deletes the namespaces, which destroys the veths, the bridge and the qdiscs with them, and
the hosts' /etc/netns/<netns>/ directories (their /etc/hosts naming the box's hosts).
While a box is open, SIGTERM raises SystemExit in the main thread so the cleanup runs; a box
left behind by a SIGKILLed creator is swept by the next box made on this machine (its creator
pid is gone).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

PREFIX = "sfbox"
IFNAME = "eth0"
SUBNET = "198.18.0"  # hosts are .1, .2, ...; inside 198.18.0.0/15
RDZV_PORT = 29400
ETC_NETNS = "/etc/netns"  # per-namespace /etc overrides of `ip netns exec`
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-(sw|h\d+)$")


class ClusterBoxUnavailable(RuntimeError):
    """This machine cannot make network namespaces (no root, no `ip`, or the kernel refuses)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


_REASON: list = []  # cached result of unavailable_reason()


def unavailable_reason() -> str | None:
    """None when cluster boxes can be made here; otherwise why not (one line, for a skip)."""
    if _REASON:
        return _REASON[0]
    reason = None
    if not sys.platform.startswith("linux"):
        reason = "cluster box needs Linux network namespaces"
    elif os.geteuid() != 0:
        reason = "cluster box needs root (ip netns, veth, tc); run as root to enable multi-node tests"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        reason = "cluster box needs iproute2 (`ip` and `tc`)"
    else:
        probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-h0"
        try:
            _ip("netns", "add", probe)
            _ip("-n", probe, "link", "add", "br0", "type", "bridge")
            subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit",
                            "burst", "128kb", "latency", "50ms"], capture_output=True, text=True, check=True)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
            reason = f"cluster box: cannot make a network namespace with a bridge and tc here ({detail})"
        finally:
            _ip("netns", "del", probe, check=False)
    _REASON.append(reason)
    return reason


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(netns: str) -> None:
    """SIGKILL whatever still runs inside one of our namespaces (started there by a box)."""
    pids = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def sweep_stale() -> list[str]:
    """Delete namespaces of boxes whose creator process is gone (e.g. SIGKILLed); returns them."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_namespace_processes(name)
            _ip("netns", "del", name, check=False)
            shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
            removed.append(name)
    return removed


def own_namespaces() -> list[str]:
    """Namespaces of boxes in this process (for tests of the cleanup)."""
    names = (line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip())
    return [n for n in names if n.startswith(f"{PREFIX}-{os.getpid()}-")]


@dataclass
class Host:
    index: int
    netns: str
    addr: str
    ifname: str = IFNAME


class ClusterBox:
    """N hosts (network namespaces) on one switch, each link limited to `link_mbit` both ways.

    Args:
        num_hosts: N.
        link_mbit: rate of every host's link in Mbit/s each way (None: unlimited veth speed).
        queue_ms: how long a packet may wait in a link's queue (tbf `latency`; the queue holds
            about rate x queue_ms). Short, as in a switch port, so small messages do not wait behind
            tens of ms of bulk data; throughput needs no more (checked both ways at once).

    Raises ClusterBoxUnavailable from `__enter__` when namespaces cannot be made here.
    """

    def __init__(self, num_hosts: int = 2, link_mbit: float | None = None, queue_ms: float = 5.0):
        if num_hosts < 1 or num_hosts > 250:
            raise ValueError(f"num_hosts must be in 1..250, got {num_hosts}")
        self.num_hosts, self.link_mbit, self.queue_ms = num_hosts, link_mbit, queue_ms
        self.name = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.name}-sw"
        self.hosts = [Host(i, f"{self.name}-h{i}", f"{SUBNET}.{i + 1}") for i in range(num_hosts)]
        self._made: list[str] = []  # namespaces created so far, deleted in reverse
        self._procs: list[subprocess.Popen] = []
        self._old_sigterm = None

    # -- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> "ClusterBox":
        reason = unavailable_reason()
        if reason is not None:
            raise ClusterBoxUnavailable(reason)
        sweep_stale()
        self._catch_sigterm()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for h in self.hosts:
            self._add_netns(h.netns)
            # Both ends are created directly in their namespaces: nothing appears in the root one.
            _ip("link", "add", h.ifname, "netns", h.netns, "type", "veth", "peer", "name", f"p{h.index}",
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{h.index}", "master", "br0", "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
        if self.link_mbit is not None:
            self.set_link(self.link_mbit)
        self._write_hosts_files()

    def _write_hosts_files(self) -> None:
        """/etc/netns/<netns>/hosts, which `ip netns exec` mounts over /etc/hosts: the hosts know
        each other's names, so reverse lookups (c10d logs the peer's name) answer at once."""
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        for h in self.hosts:  # and as IPv4-mapped IPv6: torch's stores listen dual-stack
            lines += [f"{h.addr} {h.netns}", f"::ffff:{h.addr} {h.netns}"]
        for h in self.hosts:
            path = os.path.join(ETC_NETNS, h.netns)
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "hosts"), "w") as f:
                f.write("\n".join(lines) + "\n")

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def close(self) -> None:
        """Kill the box's processes and delete its namespaces (idempotent, never raises)."""
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        for netns in reversed(self._made):
            _kill_namespace_processes(netns)
            proc = _ip("netns", "del", netns, check=False)
            shutil.rmtree(os.path.join(ETC_NETNS, netns), ignore_errors=True)
            if proc.returncode != 0:
                print(f"cluster box: could not delete namespace {netns}: {proc.stderr.strip()}", file=sys.stderr)
        self._made.clear()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _catch_sigterm(self) -> None:
        """Turn SIGTERM into SystemExit while the box is open, so `finally` blocks clean up."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def _exit(signum, frame):
                raise SystemExit(128 + signum)

            self._old_sigterm = signal.signal(signal.SIGTERM, _exit)

    # -- links -------------------------------------------------------------------------------

    def set_link(self, mbit: float | None) -> None:
        """(Re)limit every host link to `mbit` Mbit/s in both directions; None removes the limit."""
        for h in self.hosts:
            for netns, dev in ((h.netns, h.ifname), (self.switch, f"p{h.index}")):
                if mbit is None:
                    subprocess.run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
                    continue
                # The bucket must hold at least one 64 KiB GSO segment, and ~5 ms of traffic so
                # the timer granularity does not cap the rate.
                burst = max(128 * 1024, int(mbit * 1e6 / 8 * 0.005))
                _tc(netns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                    "burst", str(burst), "latency", f"{self.queue_ms}ms")
        self.link_mbit = mbit

    def link_tx_bytes(self) -> list[int]:
        """Bytes each host has sent across its link so far (tc counters of `eth0`)."""
        out = []
        for h in self.hosts:
            stats = _tc(h.netns, "-s", "qdisc", "show", "dev", h.ifname).stdout
            m = re.search(r"Sent (\d+) bytes", stats)
            out.append(int(m.group(1)) if m else 0)
        return out

    def take_down(self, host: int) -> None:
        """A whole host lost: every process in its namespace SIGKILLed (sockets closed as a
        crashed machine's would be, by the peers' timeouts or resets), then its link cut."""
        _kill_namespace_processes(self.hosts[host].netns)
        _ip("-n", self.switch, "link", "set", f"p{self.hosts[host].index}", "down")

    def bring_up(self, host: int) -> None:
        """The host's link back (a replacement machine at the same address); start processes on
        it again with `popen`."""
        _ip("-n", self.switch, "link", "set", f"p{self.hosts[host].index}", "up")

    # -- processes ---------------------------------------------------------------------------

    def env(self, host: int, extra: dict | None = None) -> dict:
        """The environment of a process on `host`: ours, gloo bound to the host's link, `extra`."""
        env = dict(os.environ)
        env["GLOO_SOCKET_IFNAME"] = self.hosts[host].ifname
        env.update(extra or {})
        return env

    def popen(self, host: int, argv: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start `argv` on `host` (in its own process group, killed by `close`)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].netns, *argv],
                                env=self.env(host, env), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def run_on_hosts(self, argvs: list[list[str]], env: dict | None = None, timeout: float = 600,
                     cwd: str | None = None) -> list[subprocess.CompletedProcess]:
        """Run argvs[i] on host i concurrently; wait for all (stdout/stderr captured as text).

        On timeout every one is killed and TimeoutError names the hosts still running.
        """
        procs = [self.popen(h, argv, env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for h, argv in enumerate(argvs)]
        return self.wait_all(procs, timeout)

    def wait_all(self, procs: list[subprocess.Popen], timeout: float,
                 grace_after_failure: float = 30.0) -> list[subprocess.CompletedProcess]:
        """Wait for every process (output collected when piped). When one fails, the others get
        `grace_after_failure` seconds (their peers are gone: they would wait for their timeouts);
        then, or at `timeout`, the ones still running are killed and TimeoutError shows every
        host's output tail."""
        import threading

        outs: list = [None] * len(procs)

        def _collect(i):
            outs[i] = procs[i].communicate()

        threads = [threading.Thread(target=_collect, args=(i,), daemon=True) for i in range(len(procs))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace_after_failure)
            time.sleep(0.2)
        running = [i for i, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            _stop(p)
        for t in threads:
            t.join(10)
        if running:
            tails = "\n".join(f"--- host {i} (exit {p.returncode}) ---\n{(outs[i] or ('', ''))[0] or ''}"
                              f"{((outs[i] or ('', ''))[1] or '')[-3000:]}" for i, p in enumerate(procs))
            raise TimeoutError(f"hosts {running} were still running after {timeout:.0f}s or after another "
                               f"failed; killed\n{tails}")
        return [subprocess.CompletedProcess(p.args, p.returncode, *(o or ("", ""))) for p, o in zip(procs, outs)]

    def torchrun_argv(self, host: int, nproc_per_node: int, script_argv: list[str], rdzv_id: str = "box",
                      python: str = sys.executable) -> list[str]:
        """torchrun on `host` joining a c10d rendezvous hosted at host 0 (all hosts, nproc each).

        torchrun's own guess of "am I the rendezvous host" and of this node's address goes by the
        hostname, which every namespace shares, so both are given explicitly.
        """
        h = self.hosts[host]
        return [python, "-m", "torch.distributed.run", f"--nnodes={self.num_hosts}",
                f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.hosts[0].addr}:{RDZV_PORT}", f"--rdzv-id={rdzv_id}",
                f"--rdzv-conf=is_host={'true' if host == 0 else 'false'}", f"--local-addr={h.addr}",
                *script_argv]

    def measure_mbit(self, src: int = 0, dst: int = 1, megabytes: int = 16) -> float:
        """Throughput of one TCP stream from host `src` to host `dst` (Mbit/s), as a check."""
        code = ("import socket,sys,time\n"
                "mode,addr,n=sys.argv[1],sys.argv[2],int(sys.argv[3])*2**20\n"
                "if mode=='s':\n"
                " s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                " s.bind((addr,5201));s.listen(1);print('ready',flush=True)\n"
                " c,_=s.accept();got=0;t=time.perf_counter()\n"
                " while got<n:\n"
                "  b=c.recv(1<<20)\n"
                "  if not b:break\n"
                "  got+=len(b)\n"
                " print(got*8/(time.perf_counter()-t)/1e6)\n"
                "else:\n"
                " c=socket.create_connection((addr,5201));buf=b'x'*(1<<20)\n"
                " for _ in range(n>>20):c.sendall(buf)\n"
                " c.close()\n")
        addr = self.hosts[dst].addr
        server = self.popen(dst, [sys.executable, "-c", code, "s", addr, str(megabytes)],
                            stdout=subprocess.PIPE, text=True)
        server.stdout.readline()  # "ready"
        client = self.popen(src, [sys.executable, "-c", code, "c", addr, str(megabytes)])
        client.wait(120)
        out, _ = server.communicate(timeout=120)
        return float(out.strip())


def _tc(*args: str) -> subprocess.CompletedProcess:
    netns_args = ["-n", args[0]]
    proc = subprocess.run(["tc", *netns_args, *args[1:]], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`tc {' '.join(netns_args + list(args[1:]))}` failed: {proc.stderr.strip()}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after 5 s."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
