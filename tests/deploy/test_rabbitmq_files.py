"""deploy/rabbitmq/: definitions.json is rendered from the plan and grants least
privilege; rabbitmq.conf and enabled_plugins name things RabbitMQ 3.10 knows.

(The plan's exchanges and queues are compared with definitions.json in
tests/integration/test_topology.py; the permissions are exercised on a real
broker in test_rabbitmq_users.py and the whole config is booted in
test_broker_boot.py.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from schemas.settings import TopologySettings, WorkerSettings
from schemas.topology import plan
from workers.upstream import MAX_RESPONSE_BYTES

RABBIT = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq"
# Debian's rabbitmq-server package (what scripts/ensure-rabbitmq installs).
SERVER = Path("/usr/lib/rabbitmq/lib")
TOPO = TopologySettings()


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    return json.loads((RABBIT / "definitions.json").read_text())  # type: ignore[no-any-return]


def perms(definitions: dict[str, Any], user: str) -> dict[str, str]:
    [entry] = [p for p in definitions["permissions"] if p["user"] == user]
    return entry  # type: ignore[no-any-return]


def matches(pattern: str, name: str) -> bool:
    """RabbitMQ's check: the regex matches somewhere in the resource name."""
    return re.search(pattern, name) is not None


def test_the_file_is_what_the_renderer_writes(render_definitions: ModuleType) -> None:
    """Regenerate with `python deploy/rabbitmq/render_definitions.py` after changing the
    topology plan or the roles."""
    expected = render_definitions.dumps(render_definitions.render())
    assert (RABBIT / "definitions.json").read_text() == expected


def test_users_have_hashes_of_their_documented_dev_passwords(
    definitions: dict[str, Any], render_definitions: ModuleType
) -> None:
    roles = {r.name: r for r in render_definitions.roles()}
    assert {u["name"] for u in definitions["users"]} == set(roles)
    for user in definitions["users"]:
        assert "password" not in user, "plain passwords never go in the file"
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        raw = base64.b64decode(user["password_hash"])
        salt, digest = raw[:4], raw[4:]
        password = roles[user["name"]].dev_password
        assert digest == hashlib.sha256(salt + password.encode()).digest(), user["name"]
    assert {u["name"]: u["tags"] for u in definitions["users"]} == {
        "llmq-admin": ["administrator"],
        "llmq-producer": [],
        "llmq-gateway": [],
        "llmq-worker": [],
        "llmq-operator": ["management"],
        "llmq-monitor": ["management"],
    }


def test_real_passwords_render_with_random_salts(
    render_definitions: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for role in render_definitions.roles():
        monkeypatch.setenv(f"RABBITMQ_PASSWORD_{role.short.upper()}", f"s3cret-{role.short}")
    out = tmp_path / "definitions.json"
    assert render_definitions.main(["--passwords-from-env", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    for user in doc["users"]:
        raw = base64.b64decode(user["password_hash"])
        secret = f"s3cret-{user['name'].removeprefix('llmq-')}"
        assert raw[4:] == hashlib.sha256(raw[:4] + secret.encode()).digest()
    with pytest.raises(SystemExit, match="never go in the repository"):
        render_definitions.main(["--passwords-from-env"])


def test_one_vhost_and_every_object_in_it(definitions: dict[str, Any]) -> None:
    [vhost] = [v["name"] for v in definitions["vhosts"]]
    for key in ("permissions", "topic_permissions", "exchanges", "queues", "bindings"):
        assert {entry["vhost"] for entry in definitions[key]} == {vhost}, key


def test_permissions_are_least_privilege(definitions: dict[str, Any]) -> None:
    """What each regex admits, for the names llmq uses (the broker test shows the same
    on a real broker)."""
    work = [TOPO.queue_name(c) for c in sorted(TOPO.classes)]
    dead, jobs, dlx = TOPO.dead_queue, TOPO.jobs_exchange, TOPO.dead_exchange
    state, spend = TOPO.state_exchange, TOPO.spend_stream
    everything = [*work, dead, jobs, dlx, state, spend, "amq.default", "llmq.reply.0a1b", "x"]

    def admitted(user: str, kind: str) -> set[str]:
        return {n for n in everything if matches(perms(definitions, user)[kind], n)}

    assert admitted("llmq-producer", "configure") == {"llmq.reply.0a1b"}
    assert admitted("llmq-producer", "write") == {jobs}
    assert admitted("llmq-producer", "read") == {"llmq.reply.0a1b"}

    assert admitted("llmq-worker", "configure") == set()  # plus its own llmq.state.<id>
    assert admitted("llmq-worker", "write") == {"amq.default", dlx, state}
    assert admitted("llmq-worker", "read") == {*work, state, spend}

    assert admitted("llmq-operator", "configure") == set()
    assert admitted("llmq-operator", "write") == {jobs}
    assert admitted("llmq-operator", "read") == {dead, state}

    for kind in ("configure", "write", "read"):
        assert admitted("llmq-gateway", kind) == admitted("llmq-producer", kind)
        assert admitted("llmq-monitor", kind) == set()
        assert perms(definitions, "llmq-admin")[kind] == ".*"
    for user in ("llmq-worker", "llmq-operator"):
        own = f"{state}.0123456789abcdef"
        assert matches(perms(definitions, user)["configure"], own)
        assert matches(perms(definitions, user)["read"], own)


def test_the_gateway_has_exactly_the_producers_rights(definitions: dict[str, Any]) -> None:
    """A user of its own (workers believe its tenant header), allowed no more and no
    less than a producer: same patterns, same topic permission, no tags."""

    def rights(user: str) -> tuple[Any, ...]:
        [tags] = [u["tags"] for u in definitions["users"] if u["name"] == user]
        [topic] = [
            {k: v for k, v in t.items() if k != "user"}
            for t in definitions["topic_permissions"]
            if t["user"] == user
        ]
        own = {k: v for k, v in perms(definitions, user).items() if k != "user"}
        return own, topic, tags

    assert rights("llmq-gateway") == rights("llmq-producer")
    gateway = next(u for u in definitions["users"] if u["name"] == "llmq-gateway")
    producer = next(u for u in definitions["users"] if u["name"] == "llmq-producer")
    assert gateway["password_hash"] != producer["password_hash"]


def test_topic_permissions_limit_job_routing_keys_to_the_sla_classes(
    definitions: dict[str, Any],
) -> None:
    keys = {b.routing_key for b in plan(TOPO).bindings if b.exchange == TOPO.jobs_exchange}
    publishers = {p["user"] for p in definitions["topic_permissions"]}
    assert publishers == {"llmq-producer", "llmq-gateway", "llmq-operator"}
    for entry in definitions["topic_permissions"]:
        assert entry["exchange"] == TOPO.jobs_exchange
        for key in keys:
            assert matches(entry["write"], key)
        for key in ("", "job.interactive", "interactive.x", "batchy"):
            assert not matches(entry["write"], key), key


def _schema_mappings() -> list[re.Pattern[str]]:
    schemas = sorted(SERVER.glob("rabbitmq_server-3.10*/plugins/*/priv/schema/*.schema"))
    if not schemas:
        pytest.skip(
            f"no RabbitMQ 3.10 config schemas under {SERVER} (rabbitmq-server not installed)"
        )
    keys = []
    for schema in schemas:
        for key in re.findall(r'\{mapping,\s*"([^"]+)"', schema.read_text(errors="replace")):
            parts = [r"[^.]+" if p.startswith("$") else re.escape(p) for p in key.split(".")]
            keys.append(re.compile(r"\.".join(parts) + r"\Z"))
    return keys


def test_rabbitmq_conf_uses_only_keys_of_rabbitmq_3_10() -> None:
    mappings = _schema_mappings()
    lines = [
        line.strip()
        for line in (RABBIT / "rabbitmq.conf").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    config = dict(line.split(" = ", 1) for line in lines)
    assert len(config) == len(lines), "one `key = value` per line, no duplicates"
    unknown = [k for k in config if not any(m.match(k) for m in mappings)]
    assert unknown == []
    assert config["definitions.import_backend"] == "local_filesystem"
    assert int(config["consumer_timeout"]) > 30 * 60 * 1000  # above the 30 min default
    # A bound on what a worker holds, and room for the largest message llmq writes:
    # a dead letter with the job and an undelivered reply.
    largest_own = WorkerSettings().max_body_bytes + MAX_RESPONSE_BYTES + 64 * 1024
    assert largest_own <= int(config["max_message_size"]) <= 16 * 1024 * 1024


def test_enabled_plugins_are_the_management_and_prometheus_plugins() -> None:
    text = (RABBIT / "enabled_plugins").read_text().strip()
    match = re.fullmatch(r"\[([a-z_,\s]*)\]\.", text)
    assert match, "an Erlang list of atoms ending with a dot"
    plugins = [p.strip() for p in match.group(1).split(",")]
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= set(plugins)
    installed = list(SERVER.glob("rabbitmq_server-3.10*/plugins"))
    if installed:
        for plugin in plugins:
            assert list(installed[0].glob(f"{plugin}-*")), f"{plugin} is not a 3.10 plugin"
