"""Write deploy/rabbitmq/definitions.json: llmq's broker objects, users and permissions.

The exchanges, queues and bindings come from ``schemas.topology.plan`` (the
same plan ``llmq topology apply`` declares); the users and their permissions
are below. Run it from the repository root after changing either:

    .venv/bin/python deploy/rabbitmq/render_definitions.py            # rewrite the file
    .venv/bin/python deploy/rabbitmq/render_definitions.py --check    # exit 1 if stale

The committed file holds the *development* passwords of docs/operations.md
("Users and permissions"), as salted hashes. For a real broker, render a
private copy with your own passwords, read from the environment
(``RABBITMQ_PASSWORD_ADMIN``, ``..._PRODUCER``, ``..._GATEWAY``,
``..._WORKER``, ``..._OPERATOR``, ``..._MONITOR``) and hashed with a random salt:

    .venv/bin/python deploy/rabbitmq/render_definitions.py \\
        --passwords-from-env --out /secure/place/definitions.json

Permissions are regular expressions on resource names, matched by RabbitMQ
as: configure = declare or delete; write = publish to an exchange, or bind a
queue; read = consume, get or purge a queue, or bind from an exchange.
A passive declare needs none. Publishing to the default exchange needs write
on ``amq.default``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from schemas.settings import TopologySettings  # noqa: E402
from schemas.topology import Topology, plan  # noqa: E402

OUT = Path(__file__).with_name("definitions.json")
RABBIT_VERSION = "3.10.8"
VHOST = "llmq"
NOTHING = "^$"


def _any(*patterns: str) -> str:
    """One anchored alternation of (already escaped) patterns."""
    return "^(" + "|".join(patterns) + ")$"


@dataclass(frozen=True)
class Role:
    """One broker user: what it is for, and what it may touch in the vhost."""

    name: str
    purpose: str
    configure: str
    write: str
    read: str
    tags: tuple[str, ...] = ()
    jobs_routing_keys: bool = False
    """Whether it publishes jobs: then a topic permission limits its routing keys."""

    @property
    def short(self) -> str:
        return self.name.removeprefix("llmq-")

    @property
    def dev_password(self) -> str:
        """The development password (docs/operations.md): ``llmq-worker`` → ``worker-dev``."""
        return f"{self.short}-dev"


def roles(topo: TopologySettings | None = None) -> list[Role]:
    """The users llmq needs, each with the least it must be allowed."""
    t = topo or TopologySettings()
    jobs, dlx, dead = re.escape(t.jobs_exchange), re.escape(t.dead_exchange), t.dead_queue
    work = re.escape(t.queue_prefix) + ".+"
    # LlmqClient (and so the gateway and `llmq submit`) names its reply queue
    # llmq.reply.<uuid4 hex>: unguessable, and invisible to a user without a
    # management tag, so sharing one producer user does not expose replies.
    reply = r"llmq\.reply\..+"
    # The live-status channel (workers/state.py): workers and `llmq status`
    # publish to the state fanout exchange and each read it through an exclusive
    # queue of their own named <state exchange>.<uuid hex>.
    state_name = getattr(t, "state_exchange", "llmq.state")
    state_exchange = re.escape(state_name)
    state_queue = re.escape(state_name) + r"\..+"
    # The spend stream (workers/spend_store.py): workers read it, and write it
    # through the default exchange (write on amq.default, which they have).
    spend = re.escape(t.spend_stream)
    producer = Role(
        name="llmq-producer",
        purpose="services, `llmq submit`: publish jobs, read own replies",
        configure=_any(reply),
        write=_any(jobs),
        read=_any(reply),
        jobs_routing_keys=True,
    )
    return [
        Role(
            name="llmq-admin",
            purpose="people and `llmq topology apply`: management UI, everything",
            configure=".*",
            write=".*",
            read=".*",
            tags=("administrator",),
        ),
        producer,
        # The producer's rights exactly, under a name of its own: workers believe
        # the `tenant` header of this user's jobs ([tenancy] trust_header_from),
        # which must never be true of every service sharing llmq-producer.
        replace(
            producer,
            name="llmq-gateway",
            purpose="`llmq gateway`: a producer whose `tenant` header workers believe",
        ),
        Role(
            name="llmq-worker",
            purpose="`llmq worker --no-declare`: consume work, publish replies and dead letters",
            configure=_any(state_queue),
            write=_any(r"amq\.default", dlx, state_exchange, state_queue),
            read=_any(work, state_exchange, state_queue, spend),
        ),
        Role(
            name="llmq-operator",
            purpose="`llmq dlq` and `llmq status`: read dead letters, replay them as jobs",
            configure=_any(state_queue),
            write=_any(jobs, state_queue),
            read=_any(re.escape(dead), state_exchange, state_queue),
            tags=("management",),
            jobs_routing_keys=True,
        ),
        Role(
            name="llmq-monitor",
            purpose="KEDA and dashboards: the management API's queue lengths, no messages",
            configure=NOTHING,
            write=NOTHING,
            read=NOTHING,
            tags=("management",),
        ),
    ]


def password_hash(password: str, salt: bytes) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    if len(salt) != 4:
        raise ValueError("RabbitMQ salts are 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def dev_salt(name: str) -> bytes:
    """A fixed salt per user, so the committed file re-renders byte for byte."""
    return hashlib.sha256(f"llmq-dev-salt:{name}".encode()).digest()[:4]


def _topology(topo: Topology, vhost: str) -> dict[str, list[dict[str, Any]]]:
    return {
        "exchanges": [
            {
                "name": ex.name,
                "vhost": vhost,
                "type": ex.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for ex in topo.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": dict(q.arguments),
            }
            for q in topo.queues
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.queue,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topo.bindings
        ],
    }


def render(
    passwords: dict[str, str] | None = None,
    *,
    random_salt: bool = False,
    vhost: str = VHOST,
    settings: TopologySettings | None = None,
) -> dict[str, Any]:
    """The whole definitions document. ``passwords`` maps user name to password
    (default: the development passwords, with fixed salts)."""
    t = settings or TopologySettings()
    topo = plan(t)
    users, permissions, topic_permissions = [], [], []
    job_keys = sorted({b.routing_key for b in topo.bindings if b.exchange == t.jobs_exchange})
    for role in roles(t):
        password = (passwords or {}).get(role.name, role.dev_password)
        salt = os.urandom(4) if random_salt else dev_salt(role.name)
        users.append(
            {
                "name": role.name,
                "password_hash": password_hash(password, salt),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": list(role.tags),
                "limits": {},
            }
        )
        permissions.append(
            {
                "user": role.name,
                "vhost": vhost,
                "configure": role.configure,
                "write": role.write,
                "read": role.read,
            }
        )
        if role.jobs_routing_keys:
            topic_permissions.append(
                {
                    "user": role.name,
                    "vhost": vhost,
                    "exchange": t.jobs_exchange,
                    "write": _any(*(re.escape(k) for k in job_keys)),
                    "read": NOTHING,
                }
            )
    return {
        "rabbit_version": RABBIT_VERSION,
        "rabbitmq_version": RABBIT_VERSION,
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        **_topology(topo, vhost),
    }


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def _env_passwords() -> dict[str, str]:
    found, missing = {}, []
    for role in roles():
        var = f"RABBITMQ_PASSWORD_{role.short.upper()}"
        value = os.environ.get(var, "")
        if value:
            found[role.name] = value
        else:
            missing.append(var)
    if missing:
        raise SystemExit(f"set {', '.join(missing)} (one password per user)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--out", type=Path, default=OUT, help="output (default: %(default)s)")
    parser.add_argument(
        "--passwords-from-env",
        action="store_true",
        help="real passwords from RABBITMQ_PASSWORD_<ROLE>, random salts",
    )
    parser.add_argument("--vhost", default=VHOST, help="virtual host (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.passwords_from_env:
        if args.out.resolve() == OUT.resolve():
            raise SystemExit("real passwords never go in the repository: pass --out elsewhere")
        text = dumps(render(_env_passwords(), random_salt=True, vhost=args.vhost))
    else:
        text = dumps(render(vhost=args.vhost))
    if args.check:
        if args.out.read_text() != text:
            print(f"{args.out} is stale: run {Path(__file__).relative_to(ROOT)}", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
