"""The compose broker's own files boot a real RabbitMQ 3.10 node.

A private node (its own name, ports, data and log directories under a temp
dir; the machine's broker is not touched) starts with deploy/rabbitmq/
rabbitmq.conf (only ports and the definitions path rewritten), enabled_plugins
and definitions.json. So RabbitMQ itself validates every config key and
imports the definitions at boot, as the compose service does. Then:

* the consumer timeout in force is the file's;
* KEDA's HTTP query, with the ScaledObject's own queue regex and the
  llmq-monitor user, counts ready *and* unacknowledged jobs;
* `llmq status`'s management query works for llmq-operator, the producer and
  gateway users have no management API at all, and the monitor can read no
  message over HTTP;
* every rabbitmq_* series the Grafana dashboard queries is exported.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote, urlencode

import aio_pika
import pytest

from schemas.settings import TopologySettings
from schemas.topology import plan

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVER_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's package, without its `su` wrapper
BOOT_TIMEOUT_S = 90
METRIC = re.compile(r"\brabbitmq_[a-z0-9_]+\b")
TOPO = TopologySettings()


@dataclass(frozen=True)
class Node:
    name: str
    home: Path
    amqp_port: int
    http_port: int
    prometheus_port: int
    vhost: str
    passwords: dict[str, str]

    def amqp_url(self, user: str) -> str:
        vhost = quote(self.vhost, safe="")
        return f"amqp://{user}:{self.passwords[user]}@127.0.0.1:{self.amqp_port}/{vhost}"

    def api(self, user: str, path: str, *, method: str = "GET", body: Any = None) -> Any:
        """(status, decoded JSON) of a management API call as ``user``."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/api/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": "Basic "
                + base64.b64encode(f"{user}:{self.passwords[user]}".encode()).decode(),
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def scrape(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.prometheus_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SERVER_BIN / "rabbitmqctl"), "-q", "-n", self.name, *args],
            env={**os.environ, "HOME": str(self.home)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"RabbitMQ is required in CI: {reason}")
    pytest.skip(f"no RabbitMQ server to boot: {reason}")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _config(amqp: int, http: int, prometheus: int) -> str:
    """deploy/rabbitmq/rabbitmq.conf with its ports and definitions path made private."""
    replaced = {
        "definitions.local.path": str(DEPLOY / "rabbitmq" / "definitions.json"),
        "listeners.tcp.default": f"127.0.0.1:{amqp}",
        "management.tcp.port": str(http),
        "prometheus.tcp.port": str(prometheus),
    }
    lines, seen = [], set()
    for line in (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in replaced and not line.lstrip().startswith("#"):
            line = f"{key} = {replaced[key]}"
            seen.add(key)
        lines.append(line)
    assert seen == set(replaced), f"rabbitmq.conf lacks {set(replaced) - seen}"
    return "\n".join(lines) + "\n"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # 401 without credentials: the listener is up
    except OSError:  # URLError included: nothing listens yet
        return False


@pytest.fixture(scope="module")
def node(render_definitions: ModuleType) -> Iterator[Node]:
    server = SERVER_BIN / "rabbitmq-server"
    if not server.exists():
        _unavailable(f"{server} is not installed")
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    amqp, http, prometheus, dist = _free_ports(4)
    tmp = Path(tempfile.mkdtemp(prefix="llmq-node-"))
    for sub in ("home", "mnesia", "log"):
        (tmp / sub).mkdir()
    (tmp / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one
    (tmp / "rabbitmq.conf").write_text(_config(amqp, http, prometheus))
    shutil.copy(DEPLOY / "rabbitmq" / "enabled_plugins", tmp / "enabled_plugins")
    name = f"llmqdeploy{uuid.uuid4().hex[:8]}@localhost"
    env = {
        **os.environ,
        "HOME": str(tmp / "home"),
        "RABBITMQ_CONF_ENV_FILE": str(tmp / "rabbitmq-env.conf"),
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_CONFIG_FILE": str(tmp / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(tmp / "mnesia"),
        "RABBITMQ_LOG_BASE": str(tmp / "log"),
    }
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(server)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not (
            _answers(f"http://127.0.0.1:{prometheus}/metrics")
            and _answers(f"http://127.0.0.1:{http}/api/overview")  # 401 is an answer too
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (tmp / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"the deploy config did not boot RabbitMQ:\n{tail}")
            time.sleep(0.5)
        yield Node(
            name=name,
            home=tmp / "home",
            amqp_port=amqp,
            http_port=http,
            prometheus_port=prometheus,
            vhost=definitions["vhosts"][0]["name"],
            passwords={r.name: r.dev_password for r in render_definitions.roles()},
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _conf_value(key: str) -> str:
    for line in (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text().splitlines():
        if line.split("=", 1)[0].strip() == key:
            return line.split("=", 1)[1].strip()
    raise KeyError(key)


def test_the_deploy_config_boots_with_its_settings_and_definitions(node: Node) -> None:
    evaluated = node.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.strip() == f"{{ok,{_conf_value('consumer_timeout')}}}"
    status, queues = node.api("llmq-admin", f"queues/{quote(node.vhost, safe='')}")
    assert status == 200
    types = {q.name: q.arguments["x-queue-type"] for q in plan(TOPO).queues}
    assert {q["name"]: q["type"] for q in queues} == types  # quorum, and the spend stream
    status, exchanges = node.api("llmq-admin", f"exchanges/{quote(node.vhost, safe='')}")
    assert {e.name for e in plan(TOPO).exchanges} <= {e["name"] for e in exchanges}
    status, users = node.api("llmq-admin", "users")
    assert {u["name"] for u in users} == set(node.passwords), "no guest, only llmq's users"


async def test_keda_counts_jobs_workers_hold(
    node: Node, yaml_docs: Callable[[Path], list[Any]]
) -> None:
    """The ScaledObject's query (http, regex, llmq-monitor) sees ready + unacked."""
    [_, scaled] = yaml_docs(DEPLOY / "k8s" / "worker-scaledobject.yaml")
    meta = scaled["spec"]["triggers"][0]["metadata"]
    query = urlencode(
        {"page": 1, "page_size": 100, "use_regex": meta["useRegex"], "name": meta["queueName"]}
    )
    producer = await aio_pika.connect(node.amqp_url("llmq-producer"))
    worker = await aio_pika.connect(node.amqp_url("llmq-worker"))
    try:
        channel = await producer.channel(publisher_confirms=True)
        jobs = await channel.get_exchange(TOPO.jobs_exchange, ensure=False)
        for i in range(3):
            await jobs.publish(aio_pika.Message(b"{}", message_id=f"j{i}"), routing_key="batch")
        held: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            held.append(message)  # never acked: a job a worker is busy with

        consuming = await worker.channel()
        await consuming.set_qos(prefetch_count=2)
        queue = await consuming.get_queue(TOPO.queue_name("batch"), ensure=False)
        await queue.consume(hold, no_ack=False)
        total = ready = -1
        for _ in range(60):  # the management API's statistics refresh every 5 s
            status, page = await asyncio.to_thread(
                node.api, "llmq-monitor", f"queues/{quote(meta['vhostName'], safe='')}?{query}"
            )
            assert status == 200, page
            total = sum(q.get("messages", 0) for q in page["items"])
            ready = sum(q.get("messages_ready", 0) for q in page["items"])
            if (total, ready, len(held)) == (3, 1, 2):
                break
            await asyncio.sleep(0.5)
        assert {q["name"] for q in page["items"]} == {TOPO.queue_name(c) for c in TOPO.classes}
        assert (total, ready, len(held)) == (3, 1, 2), "KEDA must count the 2 held jobs"
    finally:
        await worker.close()
        await producer.close()


def test_management_api_rights_per_user(node: Node) -> None:
    vhost = quote(node.vhost, safe="")
    columns = "columns=name,messages_ready,messages_unacknowledged,consumers"
    status, _ = node.api("llmq-operator", f"queues/{vhost}?{columns}")
    assert status == 200, "`llmq status` reads queue depths as llmq-operator"
    for user in ("llmq-producer", "llmq-gateway"):
        status, _ = node.api(user, f"queues/{vhost}")
        assert status == 401, f"{user}: producers are no management users"
    get = {"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"}
    for user in ("llmq-monitor", "llmq-operator"):
        work = quote(TOPO.queue_name("interactive"), safe="")
        status, _ = node.api(user, f"queues/{vhost}/{work}/get", method="POST", body=get)
        assert status in (401, 403), f"{user} must not read jobs over HTTP"
    status, _ = node.api("llmq-monitor", "definitions")
    assert status == 401


def test_every_rabbitmq_series_on_the_dashboard_is_exported(
    node: Node, yaml_docs: Callable[[Path], list[Any]]
) -> None:
    [prom] = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")
    exported: set[str] = set()
    for job in prom["scrape_configs"]:
        if not job["job_name"].startswith("rabbitmq"):
            continue
        query = urlencode(job.get("params", {}), doseq=True)
        path = job.get("metrics_path", "/metrics") + (f"?{query}" if query else "")
        for line in node.scrape(path).splitlines():
            if line and not line.startswith("#"):
                exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "llmq.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in METRIC.findall(target["expr"])
    }
    assert len(used) >= 8
    assert sorted(used - exported) == []
