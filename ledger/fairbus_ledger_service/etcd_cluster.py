"""Start etcd members on loopback: for tests and for a one-machine replicated ledger.

``fairbus ledger etcd-cluster`` runs this; tests use :class:`EtcdCluster` directly. Each
member gets its own data directory and free client and peer ports on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fairbus.errors import FairbusError


class EtcdClusterError(FairbusError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_etcd() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if found is None:
        raise EtcdClusterError("etcd is not installed (apt-get install -y etcd-server)")
    return found


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> tuple[str, int]:
        return "127.0.0.1", self.client_port

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class EtcdCluster:
    """``size`` members named m0, m1, ... under ``root``. Use as a context manager."""

    root: Path
    size: int = 3
    binary: str = field(default_factory=find_etcd)
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.members:
            self.members = [
                Member(f"m{k}", free_port(), free_port(), self.root / f"m{k}")
                for k in range(self.size)
            ]

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [m.endpoint for m in self.members]

    def _argv(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        return [
            self.binary,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"http://127.0.0.1:{m.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{m.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"fairbus-{self.root.name}",
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
        ]  # fmt: skip

    def start(self, member: Member | None = None, timeout: float = 30.0) -> None:
        """Start every member (or one, e.g. after :meth:`kill`) and wait until healthy."""
        for m in [member] if member else self.members:
            m.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            log = open(self.root / f"{m.name}.log", "ab")  # noqa: SIM115 — owned by the child
            m.process = subprocess.Popen(self._argv(m), stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        for m in [member] if member else self.members:
            while not self._healthy(m):
                if not m.alive:
                    raise EtcdClusterError(f"etcd member {m.name} exited; see {self.root}")
                if time.monotonic() > deadline:
                    raise EtcdClusterError(f"etcd member {m.name} not healthy in {timeout} s")
                time.sleep(0.1)

    def _healthy(self, m: Member) -> bool:
        try:
            url = f"http://127.0.0.1:{m.client_port}/health"
            with urllib.request.urlopen(url, timeout=1) as reply:
                return b'"true"' in reply.read()
        except OSError:
            return False

    def leader(self) -> Member:
        """The member that is Raft leader now (etcd's v3 JSON gateway: maintenance/status)."""
        import json

        for m in self.members:
            if not m.alive:
                continue
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{m.client_port}/v3/maintenance/status", data=b"{}"
                )
                with urllib.request.urlopen(request, timeout=1) as reply:  # noqa: S310
                    status = json.loads(reply.read())
                if status["header"]["member_id"] == status["leader"]:
                    return m
            except (OSError, KeyError, ValueError):
                continue
        raise EtcdClusterError("no etcd member is leader")

    def kill(self, member: Member) -> None:
        """kill -9, as a crash would."""
        if member.process is not None and member.alive:
            member.process.send_signal(signal.SIGKILL)
            member.process.wait()

    def stop(self) -> None:
        for m in self.members:
            if m.alive:
                assert m.process is not None
                m.process.terminate()
        for m in self.members:
            if m.process is not None:
                try:
                    m.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    m.process.kill()
                    m.process.wait()

    def __enter__(self) -> EtcdCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
