"""The cluster deploy files: deploy/compose.cluster.yaml (three RabbitMQ 4.x nodes
under compose.yaml), deploy/rabbitmq/cluster/cluster.conf and deploy/k8s/broker/
(a RabbitmqCluster of three replicas), checked offline like the rest of deploy/."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from schemas.settings import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RABBIT = DEPLOY / "rabbitmq"
NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")
LLMQ_USERS = {"worker": "llmq-worker", "gateway": "llmq-gateway", "ops": "llmq-operator"}
# What the Cluster Operator writes itself; everything else of our files must be
# in the RabbitmqCluster's additionalConfig, with the same value.
OPERATOR_OWNED = re.compile(
    r"(listeners|management|prometheus)\.tcp\..*|log\..*|total_memory_available_override_value"
    r"|cluster_formation\..*|definitions\.local\.path"
)


def conf(path: Path) -> dict[str, str]:
    """A rabbitmq.conf (sysctl format) as a dict; one key per line, no duplicates."""
    lines = [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    pairs = dict(line.split(" = ", 1) for line in lines)
    assert len(pairs) == len(lines), f"{path.name}: one `key = value` per line"
    return pairs


def default_of(value: str) -> str:
    """The default of a ``${VAR:-default}`` interpolation."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:-(.*)\}", value)
    assert match, f"{value!r}: overridable from the environment"
    return match.group(1)


@pytest.fixture(scope="module")
def override(yaml_docs: Callable[[Path], list[Any]]) -> dict[str, Any]:
    [doc] = yaml_docs(DEPLOY / "compose.cluster.yaml")
    return doc  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def base(yaml_docs: Callable[[Path], list[Any]]) -> dict[str, Any]:
    [doc] = yaml_docs(DEPLOY / "compose.yaml")
    return doc  # type: ignore[no-any-return]


def test_three_nodes_of_one_4x_image_each_with_its_own_data(
    override: dict[str, Any], base: dict[str, Any]
) -> None:
    services = override["services"]
    images = {services[n]["image"] for n in NODES}
    assert images == {base["services"]["rabbitmq"]["image"]}
    [image] = images
    assert re.fullmatch(r"rabbitmq:4\.\d+-management", image)
    data = set()
    for name in NODES:
        node = services[name]
        assert node["hostname"] == name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in node["volumes"]}
        assert mounts["/etc/rabbitmq/rabbitmq.conf"] == "./rabbitmq/rabbitmq.conf"
        assert mounts["/etc/rabbitmq/conf.d/20-cluster.conf"] == "./rabbitmq/cluster/cluster.conf"
        assert mounts["/etc/rabbitmq/definitions.json"] == "./rabbitmq/definitions.json"
        assert mounts["/etc/rabbitmq/enabled_plugins"] == "./rabbitmq/enabled_plugins"
        data.add(mounts["/var/lib/rabbitmq"])
        for source in mounts.values():
            if source.startswith("./"):
                assert (DEPLOY / source).is_file(), source
        # One cookie for all nodes and their CLI, from the environment.
        env = node["environment"]
        cookie = {default_of(env[k].split()[-1]) for k in env if k.endswith("ERL_ARGS")}
        assert len(cookie) == 1 and all("-setcookie" in env[k] for k in env)
        assert node["healthcheck"]["test"][1] == "rabbitmq-diagnostics"
    assert len(data) == 3, "every node keeps its own data volume"
    assert data <= set(override["volumes"]) | set(base["volumes"])


def test_the_nodes_named_in_cluster_conf_are_the_compose_nodes() -> None:
    config = conf(RABBIT / "cluster" / "cluster.conf")
    assert config["cluster_formation.peer_discovery_backend"] == "classic_config"
    named = {v for k, v in config.items() if k.startswith("cluster_formation.classic_config.nodes")}
    assert named == {f"rabbit@{n}" for n in NODES}
    assert config["quorum_queue.continuous_membership_reconciliation.target_group_size"] == "3"
    # The 4.3 defaults, rehearsed on any 4.x.
    assert config["deprecated_features.permit.transient_nonexcl_queues"] == "false"
    assert config["deprecated_features.permit.global_qos"] == "false"


def test_llmq_services_are_given_every_node(
    override: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = override["services"]
    for name, user in LLMQ_USERS.items():
        service = services[name]
        assert set(service["depends_on"]) == set(NODES)
        assert all(d["condition"] == "service_healthy" for d in service["depends_on"].values())
        url = default_of(service["environment"]["LLMQ_BROKER__URL"])
        parts = [urlsplit(u) for u in url.split(",")]
        assert [(p.hostname, p.port, p.username, p.path) for p in parts] == [
            (n, 5672, user, "/llmq") for n in NODES
        ]
        # And llmq reads it as three addresses.
        for key in list(os.environ):
            if key.startswith("LLMQ_"):
                monkeypatch.delenv(key)
        monkeypatch.setenv("LLMQ_BROKER__URL", url)
        monkeypatch.setenv("LLMQ_FLEET_KEY", "sk-fleet-demo")
        monkeypatch.setenv("LLMQ_GATEWAY_KEYS", "sk-llmq-demo")
        settings = load_settings(DEPLOY / "compose" / "llmq.toml")
        assert [urlsplit(u).hostname for u in settings.broker.addresses] == list(NODES)


def test_prometheus_scrapes_every_node(yaml_docs: Callable[[Path], list[Any]]) -> None:
    [single] = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")
    [cluster] = yaml_docs(DEPLOY / "prometheus" / "prometheus.cluster.yml")
    jobs = {j["job_name"]: j for j in cluster["scrape_configs"]}
    for name in ("rabbitmq", "rabbitmq-queues"):
        assert jobs[name]["static_configs"][0]["targets"] == [f"{n}:15692" for n in NODES]
    # Otherwise the same file.
    for job in single["scrape_configs"]:
        if not job["job_name"].startswith("rabbitmq"):
            assert jobs[job["job_name"]] == job


@pytest.fixture(scope="module")
def broker_k8s(yaml_docs: Callable[[Path], list[Any]]) -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted((DEPLOY / "k8s" / "broker").glob("*.yaml")):
        for doc in yaml_docs(path):
            found[doc["kind"]] = doc
    return found


def test_the_rabbitmq_cluster_has_three_4x_replicas_and_our_config(
    broker_k8s: dict[str, dict[str, Any]],
) -> None:
    cluster = broker_k8s["RabbitmqCluster"]
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    spec = cluster["spec"]
    assert spec["replicas"] == 3
    assert re.fullmatch(r"rabbitmq:4\.\d+-management", spec["image"])
    lines = [line.strip() for line in spec["rabbitmq"]["additionalConfig"].splitlines()]
    given = dict(line.split(" = ", 1) for line in lines if line)
    ours = {**conf(RABBIT / "rabbitmq.conf"), **conf(RABBIT / "cluster" / "cluster.conf")}
    wanted = {k: v for k, v in ours.items() if not OPERATOR_OWNED.fullmatch(k)}
    assert {k: v for k, v in given.items() if k != "definitions.local.path"} == wanted
    # The definitions come from a Secret mounted where the config looks.
    template = spec["override"]["statefulSet"]["spec"]["template"]["spec"]
    [mount] = template["containers"][0]["volumeMounts"]
    [volume] = template["volumes"]
    assert mount["name"] == volume["name"] and "secret" in volume
    assert Path(given["definitions.local.path"]).parent == Path(mount["mountPath"])
    plugins = (RABBIT / "enabled_plugins").read_text()
    for plugin in spec["rabbitmq"]["additionalPlugins"]:
        assert plugin in plugins


def test_the_broker_kustomization_and_disruption_budget(
    broker_k8s: dict[str, dict[str, Any]],
) -> None:
    kustomization = broker_k8s["Kustomization"]
    on_disk = {p.name for p in (DEPLOY / "k8s" / "broker").glob("*.yaml")}
    assert set(kustomization["resources"]) == on_disk - {"kustomization.yaml"}
    pdb = broker_k8s["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1  # a majority of three stays up
    name = broker_k8s["RabbitmqCluster"]["metadata"]["name"]
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate")
    kv.validate(pdb, kv.latest_version(), strict=True)


def _rabbitmq4_mappings() -> list[re.Pattern[str]]:
    """The config keys of the RabbitMQ 4.x that scripts/rabbitmq4 builds (its schemas)."""
    cache = os.environ.get("LLMQ_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmq"
    )
    lib = Path(cache) / "trixie-rabbitmq" / "usr" / "lib" / "rabbitmq" / "lib"
    schemas = sorted(lib.glob("rabbitmq_server-4*/plugins/*/priv/schema/*.schema"))
    if not schemas:
        why = f"RabbitMQ 4.x not built under {lib} (scripts/rabbitmq4 build)"
        if os.environ.get("CI"):
            pytest.fail(why)  # scripts/test builds it first
        pytest.skip(why)
    keys = []
    for schema in schemas:
        for key in re.findall(r'\{mapping,\s*"([^"]+)"', schema.read_text(errors="replace")):
            parts = [r"[^.]+" if p.startswith("$") else re.escape(p) for p in key.split(".")]
            keys.append(re.compile(r"\.".join(parts) + r"\Z"))
    return keys


def test_every_config_key_is_one_of_rabbitmq_4() -> None:
    mappings = _rabbitmq4_mappings()
    for path in (RABBIT / "rabbitmq.conf", RABBIT / "cluster" / "cluster.conf"):
        unknown = [k for k in conf(path) if not any(m.match(k) for m in mappings)]
        assert unknown == [], path.name
    assert not any(m.match("cluster_formation.no_such_key") for m in mappings)
