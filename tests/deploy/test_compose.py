"""deploy/compose.yaml: valid against the compose-spec schema, and consistent with
the files it mounts (llmq.toml, rabbitmq.conf, definitions.json, prometheus.yml)."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from schemas.settings import Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
LLMQ_TOML = DEPLOY / "compose" / "llmq.toml"
LLMQ_SERVICES = {"worker": "llmq-worker", "gateway": "llmq-gateway", "ops": "llmq-operator"}
# After grace_s the worker cancels what is left and waits up to 5 s for it
# (workers/service.py, Worker.stop), then closes its connections.
WORKER_CLOSING_S = 10


@pytest.fixture(scope="module")
def compose(yaml_docs: Callable[[Path], list[Any]]) -> dict[str, Any]:
    [doc] = yaml_docs(COMPOSE)
    return doc  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """deploy/compose/llmq.toml as the worker loads it, with the compose environment."""
    for name in list(os.environ):
        if name.startswith("LLMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LLMQ_FLEET_KEY", "sk-fleet-demo")
    monkeypatch.setenv("LLMQ_GATEWAY_KEYS", "sk-llmq-demo")
    return load_settings(LLMQ_TOML)


def seconds(duration: str) -> float:
    """A compose duration ("45s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def default_of(value: str) -> str:
    """The default of a ``${VAR:-default}`` interpolation (or the value itself)."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:-(.*)\}", value)
    return match.group(1) if match else value


def conf(path: Path) -> dict[str, str]:
    """A rabbitmq.conf (sysctl format) as a dict."""
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_compose_file_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="needs the jsonschema package")
    pytest.importorskip("check_jsonschema", reason="needs check-jsonschema (compose-spec schema)")
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert errors == []
    # The schema is not vacuous: a misspelt key is an error.
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["stop_grace_periode"] = "45s"
    assert list(validator.iter_errors(broken))


def test_the_stack_has_its_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {
        "rabbitmq",
        "worker",
        "gateway",
        "fleet",
        "ops",
        "prometheus",
        "grafana",
    }
    assert services["fleet"]["profiles"] == ["demo"]
    assert services["ops"]["profiles"] == ["tools"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def test_every_mounted_file_exists(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_rabbitmq_gets_its_config_plugins_and_definitions(
    services: dict[str, dict[str, Any]],
) -> None:
    rabbit = services["rabbitmq"]
    # A supported 4.x release (3.10 is end of life; docs/operations.md, versions).
    assert re.fullmatch(r"rabbitmq:4\.\d+-management", rabbit["image"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rabbit["volumes"]}
    assert mounts["/etc/rabbitmq/rabbitmq.conf"] == "./rabbitmq/rabbitmq.conf"
    assert mounts["/etc/rabbitmq/enabled_plugins"] == "./rabbitmq/enabled_plugins"
    config = conf(DEPLOY / "rabbitmq" / "rabbitmq.conf")
    assert mounts[config["definitions.local.path"]] == "./rabbitmq/definitions.json"
    assert config["definitions.skip_if_unchanged"] == "true"
    ports = {p.split(":")[1] for p in rabbit["ports"]}
    assert {"5672", "15672", config["prometheus.tcp.port"]} <= ports
    assert "check_port_connectivity" in rabbit["healthcheck"]["test"]


def test_llmq_services_log_in_as_their_own_least_privileged_user(
    services: dict[str, dict[str, Any]], render_definitions: ModuleType
) -> None:
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    vhosts = {v["name"] for v in definitions["vhosts"]}
    passwords = {r.name: r.dev_password for r in render_definitions.roles()}
    for name, user in LLMQ_SERVICES.items():
        url = urlsplit(default_of(services[name]["environment"]["LLMQ_BROKER__URL"]))
        assert (url.hostname, url.port) == ("rabbitmq", 5672)
        assert url.username == user, name
        assert url.password == passwords[user], f"{name}: the documented dev password"
        assert unquote(url.path[1:]) in vhosts
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    # The worker user may not declare the topology: definitions.json did.
    assert "--no-declare" in services["worker"]["command"]


def test_workers_believe_the_tenant_header_of_the_gateway_and_operator_only(
    services: dict[str, dict[str, Any]], settings: Settings
) -> None:
    """The gateway takes tenants from API keys and a replay keeps a dead letter's:
    their users' tenant headers are believed, and no other user's (llmq-producer
    is shared by services, any of which could otherwise claim any tenant)."""
    from workers.intake import admission

    def user(service: str) -> str | None:
        return urlsplit(default_of(services[service]["environment"]["LLMQ_BROKER__URL"])).username

    trusted = {user("gateway"), user("ops")}
    assert trusted == {"llmq-gateway", "llmq-operator"}
    assert set(settings.tenancy.trust_header_from) == trusted
    rules = admission(settings)
    for name in trusted:
        assert rules.tenant(name, "acme") == "acme", name
    for name in ("llmq-producer", user("worker"), None):
        assert rules.tenant(name, "acme") is None, name


def test_no_secret_is_written_into_the_compose_file(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"KEY|PASSWORD|SECRET|TOKEN|URL", key) and "not-used" not in str(value):
                assert str(value).startswith("${"), f"{name}.{key}: overridable from the env"


def test_shutdown_grace_outlasts_the_worker_drain(
    services: dict[str, dict[str, Any]], settings: Settings
) -> None:
    worker = services["worker"]
    assert worker["stop_signal"] == "SIGTERM"
    assert seconds(worker["stop_grace_period"]) >= settings.worker.grace_s + WORKER_CLOSING_S
    from producers import gateway

    drain = getattr(gateway, "_SHUTDOWN_S", 30.0)
    assert seconds(services["gateway"]["stop_grace_period"]) >= drain + WORKER_CLOSING_S
    assert worker["init"] is True


def test_the_llmq_config_loads_and_points_at_the_compose_services(
    services: dict[str, dict[str, Any]], settings: Settings
) -> None:
    shipped = DEPLOY.parent / "workers" / "fleet" / "scenarios" / "demo.toml"  # in the image
    scenario = tomllib.loads(shipped.read_text())
    ports = {e["name"]: e["port"] for e in scenario["endpoints"]}
    for endpoint in settings.endpoints:
        url = urlsplit(endpoint.base_url)
        assert url.hostname == "fleet" and url.port == ports[endpoint.name], endpoint.name
        assert str(url.port) in services["fleet"]["expose"]
    fleet = services["fleet"]["command"]
    assert fleet[fleet.index("--host") + 1] == "0.0.0.0"
    assert fleet[fleet.index("--scenario") + 1] == "/etc/llmq/scenarios/demo.toml"
    assert settings.metrics.host == "0.0.0.0" and settings.gateway.host == "0.0.0.0"
    worker_probe = services["worker"]["healthcheck"]["test"]
    assert f"http://127.0.0.1:{settings.metrics.port}/readyz" in worker_probe
    assert str(settings.metrics.port) in services["worker"]["expose"]
    gateway_probe = services["gateway"]["healthcheck"]["test"]
    assert f"http://127.0.0.1:{settings.gateway.port}/readyz" in gateway_probe
    assert f"{settings.gateway.port}:{settings.gateway.port}" in services["gateway"]["ports"]


def test_consumer_timeout_outlasts_the_longest_job(settings: Settings) -> None:
    """A worker holds a delivery at most until the job's deadline; the broker must not
    time the consumer out first (it checks about once a minute)."""
    timeout_ms = int(conf(DEPLOY / "rabbitmq" / "rabbitmq.conf")["consumer_timeout"])
    # No job's deadline is later than worker.max_sla_ms after it was taken (the codec
    # clamps it), and the class defaults and the gateway's limit must fit inside it.
    longest_ms = settings.worker.max_sla_ms
    assert longest_ms >= max(
        *(c.default_sla_ms for c in settings.topology.classes.values()),
        settings.gateway.max_sla_ms,
    )
    assert timeout_ms >= longest_ms + 60_000 + 1000 * WORKER_CLOSING_S
    assert timeout_ms <= 2 * longest_ms, "a much longer timeout only hides stuck consumers"


def test_prometheus_scrapes_what_the_services_expose(
    yaml_docs: Callable[[Path], list[Any]], services: dict[str, dict[str, Any]], settings: Settings
) -> None:
    [prom] = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    [worker_sd] = jobs["llmq-worker"]["dns_sd_configs"]
    assert worker_sd["names"] == ["worker"] and worker_sd["port"] == settings.metrics.port
    # The gateway's /metrics is on its own port, not the API port its callers reach.
    assert settings.gateway.metrics_port not in (None, settings.gateway.port)
    assert settings.gateway.metrics_host == "0.0.0.0"
    assert jobs["llmq-gateway"]["static_configs"][0]["targets"] == [
        f"gateway:{settings.gateway.metrics_port}"
    ]
    assert str(settings.gateway.metrics_port) in services["gateway"]["expose"]
    published = [p.split(":")[-1] for p in services["gateway"]["ports"]]
    assert str(settings.gateway.metrics_port) not in published
    rabbit_port = conf(DEPLOY / "rabbitmq" / "rabbitmq.conf")["prometheus.tcp.port"]
    for name in ("rabbitmq", "rabbitmq-queues"):
        assert jobs[name]["static_configs"][0]["targets"] == [f"rabbitmq:{rabbit_port}"]
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    assert jobs["rabbitmq-queues"]["params"]["vhost"] == [definitions["vhosts"][0]["name"]]
    mounts = [v.split(":")[1] for v in services["prometheus"]["volumes"]]
    assert "/etc/prometheus/prometheus.yml" in mounts


def test_grafana_is_provisioned_with_the_datasource_and_dashboard(
    yaml_docs: Callable[[Path], list[Any]], services: dict[str, dict[str, Any]]
) -> None:
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    [datasources] = yaml_docs(provisioning / "datasources" / "prometheus.yaml")
    [source] = datasources["datasources"]
    assert urlsplit(source["url"]).hostname == "prometheus" and source["type"] == "prometheus"
    [providers] = yaml_docs(provisioning / "dashboards" / "llmq.yaml")
    [provider] = providers["providers"]
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "llmq.json").read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
