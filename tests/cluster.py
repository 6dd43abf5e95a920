"""A three-node RabbitMQ cluster for the cluster fault suite: start it, kill,
stop and start its nodes, ask which node leads a queue (wraps scripts/cluster).

Nodes are numbered 1..3. The cluster is the machine's own: one per version
(4: AMQP 5691-5693, 3.10: 5686-5688), started once and shared; each test
works in a vhost of its own (:meth:`Cluster.add_vhost`). Needs root, like
scripts/cluster.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster"
NODES = (1, 2, 3)


class ClusterError(Exception):
    """A cluster command failed; its output says why."""


@dataclass(frozen=True)
class Cluster:
    version: str = "4"
    """``4`` (RabbitMQ 4.0.5 from scripts/rabbitmq4's root) or ``3.10``."""
    timeout_s: float = 600.0

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``scripts/cluster VERSION ARGS``; raises :class:`ClusterError` when
        it fails and ``check`` is set."""
        try:
            done = subprocess.run(
                [str(SCRIPT), self.version, *args],
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"cluster {' '.join(args)}: no answer in {self.timeout_s} s") from e
        if check and done.returncode != 0:
            raise ClusterError(f"cluster {' '.join(args)}: {done.stderr.strip() or done.stdout}")
        return done

    def start(self) -> None:
        """Start every node (building the 4.x root the first time) and cluster them."""
        self.run("start")

    def stop(self) -> None:
        self.run("stop")

    def ports(self) -> list[int]:
        return [int(url.rsplit(":", 1)[1].split("/")[0]) for url in self.urls()]

    def urls(self, vhost: str = "/") -> list[str]:
        """One AMQP URL per node, in node order."""
        return [f"{url.rsplit('/', 1)[0]}/{quote(vhost, safe='')}" for url in self._urls()]

    def _urls(self) -> list[str]:
        return self.run("urls").stdout.split()

    def ctl(self, node: int, *args: str) -> str:
        """rabbitmqctl against one node; its output."""
        return self.run("ctl", str(node), *args).stdout

    def pid(self, node: int) -> int | None:
        """The OS pid of the node's beam, None when it is down."""
        out = self.run("pid", str(node)).stdout.strip()
        return int(out) if out else None

    def kill(self, node: int) -> None:
        """kill -9 the node's beam (returns once it is gone)."""
        self.run("kill", str(node))

    def stop_node(self, node: int) -> None:
        self.run("stop-node", str(node))

    def start_node(self, node: int) -> None:
        """Start a stopped or killed node again (returns once it has booted)."""
        self.run("start-node", str(node))

    def stop_app(self, node: int) -> None:
        """``rabbitmqctl stop_app``: the Erlang node stays up, RabbitMQ stops."""
        self.run("stop-app", str(node))

    def start_app(self, node: int) -> None:
        self.run("start-app", str(node))

    def leader(self, vhost: str, queue: str) -> int:
        """The node (1..3) that leads a quorum queue."""
        return int(self.run("leader", vhost, queue).stdout.strip())

    def add_vhost(self, vhost: str) -> None:
        """A vhost on the whole cluster, guest with full permissions."""
        self.run("add-vhost", vhost)

    def delete_vhost(self, vhost: str) -> None:
        self.run("delete-vhost", vhost)
