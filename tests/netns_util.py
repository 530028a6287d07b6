"""Network namespaces for the partition suite: one namespace per node, real links
between them that the test can cut, slow down and restore.

Layout (``K`` is derived from the test process id so parallel runs do not clash):

- a bridge ``hs<pid>br`` in the root namespace with ``10.77.K.1/24``; each node
  namespace has a veth on it with ``10.77.K.<i+2>``: the test's control path to the
  node's operations API (never cut).
- each node has a service address ``10.77.<K+1>.<i+2>/32`` on its loopback: its
  replication URL, and so the SAN of its certificate.
- one veth pair per pair of nodes, with host routes to the other node's service
  address: replication traffic between two nodes uses only their own link, so cutting
  one link partitions exactly that pair.

Cutting a link sets both ends down (the kernel drops its routes; sends fail, nothing
is delivered); healing sets them up and puts the routes back. Everything is removed at
teardown, and leftovers of dead test processes are removed at setup.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.apt_util import apt_get
from tests.helpers import ADMIN, BaseNode, wait_for

OPS_PORT = 9925
REPL_PORT = 9933


def _install_iproute2() -> str:
    """On a root Debian/Ubuntu machine without ``ip`` (a fresh CI image), install
    iproute2 with apt-get; set HARPSYNC_NETNS_INSTALL=0 to forbid it. Returns what
    happened, for the skip reason if ``ip`` is still missing."""
    if os.environ.get("HARPSYNC_NETNS_INSTALL") == "0":
        return "install disabled by HARPSYNC_NETNS_INSTALL=0"
    if shutil.which("apt-get") is None:
        return "no apt-get to install it with"
    try:
        done = apt_get("install", "-y", "-q", "iproute2", timeout=300)
        if done.returncode != 0:  # a fresh image has no package lists yet
            apt_get("update", "-q", timeout=300)
            done = apt_get("install", "-y", "-q", "iproute2", timeout=300)
    except subprocess.TimeoutExpired:
        return "apt-get install iproute2 timed out"
    return f"apt-get install iproute2 exited {done.returncode}: {done.stderr.strip()[-200:]}"


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (None if they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, as CI does)"
    if shutil.which("ip") is None:
        attempt = _install_iproute2()
        if shutil.which("ip") is None:
            return f"iproute2's 'ip' is not installed ({attempt})"
    probe = f"hsprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Delete namespaces and bridges left by test processes that no longer run."""
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        match = re.match(r"hs(\d+)n\d+\b", line)
        if match and not _pid_alive(int(match.group(1))):
            _run(["ip", "netns", "del", line.split()[0]], check=False)
    bridges = _run(["ip", "-o", "link", "show", "type", "bridge"], check=False).stdout
    for line in bridges.splitlines():
        match = re.search(r": (hs(\d+)br)[:@]", line)
        if match and not _pid_alive(int(match.group(2))):
            _run(["ip", "link", "del", match.group(1)], check=False)


class NetLab:
    """``n`` namespaces joined pairwise, plus a control bridge to the root namespace."""

    def __init__(self, n: int = 3) -> None:
        pid = os.getpid()
        self.n = n
        self.tag = f"hs{pid}"
        k = 10 + 2 * (pid % 100)
        self.control_net = f"10.77.{k}"
        self.service_net = f"10.77.{k + 1}"
        self.bridge = f"{self.tag}br"
        self.namespaces = [f"{self.tag}n{i}" for i in range(n)]
        self.slowed: set[tuple[int, int]] = set()
        self.cut_links: set[tuple[int, int]] = set()
        self.slow_kind = ""

    # -- addresses ---------------------------------------------------------------------
    def control_ip(self, i: int) -> str:
        return f"{self.control_net}.{i + 2}"

    def service_ip(self, i: int) -> str:
        return f"{self.service_net}.{i + 2}"

    def link(self, i: int, j: int) -> str:
        """The name, inside namespace ``i``, of its end of the link to ``j``."""
        return f"{self.tag}p{i}{j}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    # -- build and remove --------------------------------------------------------------
    def setup(self) -> NetLab:
        remove_leftovers()
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def _build(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.control_net}.1/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for i, ns in enumerate(self.namespaces):
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.service_ip(i)}/32", "dev", "lo"])
            host_end, ns_end = f"{self.tag}h{i}", f"{self.tag}c{i}"
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end])
            _run(["ip", "link", "set", ns_end, "netns", ns])
            _run(["ip", "link", "set", host_end, "master", self.bridge])
            _run(["ip", "link", "set", host_end, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.control_ip(i)}/24", "dev", ns_end])
            _run(["ip", "-n", ns, "link", "set", ns_end, "up"])
        for i in range(self.n):
            for j in range(i + 1, self.n):
                _run(["ip", "link", "add", self.link(i, j), "netns", self.namespaces[i],
                      "type", "veth", "peer", "name", self.link(j, i),
                      "netns", self.namespaces[j]])
                self.heal(i, j)

    def teardown(self) -> None:
        for ns in self.namespaces:
            _run(["ip", "netns", "del", ns], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)
        for i in range(self.n):
            _run(["ip", "link", "del", f"{self.tag}h{i}"], check=False)

    # -- faults ------------------------------------------------------------------------
    def _ends(self, i: int, j: int) -> list[tuple[int, int]]:
        return [(i, j), (j, i)]

    def cut(self, i: int, j: int) -> None:
        """Take the link between ``i`` and ``j`` down at both ends."""
        for a, b in self._ends(i, j):
            _run(["ip", "-n", self.namespaces[a], "link", "set", self.link(a, b), "down"])
        self.cut_links.add((min(i, j), max(i, j)))

    def heal(self, i: int, j: int) -> None:
        """Bring the link up and restore the host routes over it."""
        for a, b in self._ends(i, j):
            ns, dev = self.namespaces[a], self.link(a, b)
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "route", "replace", f"{self.service_ip(b)}/32", "dev", dev,
                  "src", self.service_ip(a)])
        self.cut_links.discard((min(i, j), max(i, j)))

    def isolate(self, i: int) -> None:
        for j in range(self.n):
            if j != i:
                self.cut(i, j)

    def heal_all(self) -> None:
        for i, j in sorted(self.cut_links):
            self.heal(i, j)
        for i, j in sorted(self.slowed):
            self.unslow(i, j)

    def slow(self, i: int, j: int) -> str:
        """Slow the link: ``netem delay 50ms`` if the kernel has netem, else a token
        bucket of 256 kbit/s (queueing delay). Returns the qdisc used."""
        if shutil.which("tc") is None:
            self.slow_kind = "not slowed: no tc (iproute2) here"
            return self.slow_kind
        for a, b in self._ends(i, j):
            args = ["tc", "-n", self.namespaces[a], "qdisc", "replace", "dev", self.link(a, b),
                    "root"]
            done = _run(args + ["netem", "delay", "50ms"], check=False)
            if done.returncode == 0:
                self.slow_kind = "netem delay 50ms"
            else:
                _run(args + ["tbf", "rate", "256kbit", "burst", "8kb", "latency", "200ms"])
                self.slow_kind = "tbf rate 256kbit (netem missing from this kernel)"
        self.slowed.add((min(i, j), max(i, j)))
        return self.slow_kind

    def unslow(self, i: int, j: int) -> None:
        for a, b in self._ends(i, j):
            _run(["tc", "-n", self.namespaces[a], "qdisc", "del", "dev", self.link(a, b),
                  "root"], check=False)
        self.slowed.discard((min(i, j), max(i, j)))


class NetnsNode(BaseNode):
    """``harpsync run`` inside namespace ``index`` of a ``NetLab``: it binds its own
    ports on the namespace's addresses (nothing to hand over across namespaces)."""

    def __init__(self, lab: NetLab, index: int, name: str, root: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.lab = lab
        self.index = index
        self.name = name
        self.root = root
        self.extra_env = extra_env or {}
        self.client = httpx.Client(timeout=30.0, trust_env=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root.parent / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://{self.lab.control_ip(self.index)}:{OPS_PORT}/"

    @property
    def repl_url(self) -> str:
        return f"wss://{self.lab.service_ip(self.index)}:{REPL_PORT}"

    def env(self) -> dict[str, str]:
        return {
            "REPLICATION_HOSTNAME": self.name,
            "REPLICATION_URL": self.repl_url,
            "REPLICATION_HOST": "0.0.0.0",
            "REPLICATION_PORT": str(REPL_PORT),
            "OPERATIONSAPI_NETWORK_HOST": self.lab.control_ip(self.index),
            "OPERATIONSAPI_NETWORK_PORT": str(OPS_PORT),
            "HDB_ADMIN_USERNAME": ADMIN[0],
            "HDB_ADMIN_PASSWORD": ADMIN[1],
            # The ops API is on a test-only bridge; its no-TLS warning is expected.
            "LOGGING_LEVEL": "error",
            "REPLICATION_PINGINTERVAL": "200",
        }

    def start(self) -> NetnsNode:
        env = {**os.environ, **self.env(), **self.extra_env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.lab.exec_prefix(self.index)
                + [sys.executable, "-m", "harpsync.cli", "run", "--root", str(self.root)],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=30, message=f"{self.name} to start")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
        return self.client.get(self.url + "health", timeout=2).status_code == 200

    def kill(self) -> None:
        """SIGKILL (``ip netns exec`` execs the node, so this is the node's pid)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self.client.close()

    def post(self, body: Any, auth: tuple[str, str] | None = ADMIN, **kw: Any) -> httpx.Response:
        return self.client.post(self.url, json=body, auth=auth, **kw)


__all__ = ["OPS_PORT", "REPL_PORT", "NetLab", "NetnsNode", "remove_leftovers",
           "unavailable_reason"]
