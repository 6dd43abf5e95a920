"""deploy/k8s/: every manifest valid against the Kubernetes schemas (offline, from the
kubernetes-validate package), the KEDA objects and PDBs checked field by field,
and the pods consistent with llmq's settings (grace periods, probes, ports)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from schemas.settings import Settings, TopologySettings, load_settings
from schemas.topology import plan

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OLDEST_KUBERNETES = "1.29.0"  # PodDisruptionBudget policy/v1, seccompProfile, etc. all exist
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}
WORKER_CLOSING_S = 10  # after grace_s: cancel the rest (<= 5 s), close the connections


@pytest.fixture(scope="module")
def manifests(yaml_docs: Callable[[Path], list[Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of deploy/k8s/*.yaml, by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            key = (doc["kind"], doc.get("metadata", {}).get("name", path.name))
            assert key not in found, f"{key} defined twice"
            doc["__file__"] = path.name
            found[key] = doc
    return found


def objects(manifests: dict[tuple[str, str], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in manifests.values():
        yield {k: v for k, v in doc.items() if k != "__file__"}


@pytest.fixture(scope="module")
def config(manifests: dict[tuple[str, str], dict[str, Any]]) -> str:
    return manifests[("ConfigMap", "llmq-config")]["data"]["llmq.toml"]  # type: ignore[no-any-return]


@pytest.fixture
def settings(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The ConfigMap's llmq.toml as a worker pod loads it (its env from the Secret)."""
    for name in list(os.environ):
        if name.startswith("LLMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OPENAI_API_KEY", "placeholder")
    path = tmp_path / "llmq.toml"
    path.write_text(config)
    return load_settings(path)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


def test_manifests_are_valid_kubernetes_objects(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate")
    versions = (OLDEST_KUBERNETES, kv.latest_version())
    checked = 0
    for doc in objects(manifests):
        if (doc["apiVersion"], doc["kind"]) in CRDS or doc["kind"] == "Kustomization":
            continue  # KEDA's CRDs and kustomize: checked field by field below
        for version in versions:
            kv.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 8
    # Strict mode is not vacuous: an unknown field is refused.
    worker = next(d for d in objects(manifests) if d["kind"] == "Deployment")
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kv.ValidationError):
        kv.validate(worker, versions[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    kustomization = manifests[("Kustomization", "kustomization.yaml")]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}
    assert kustomization["namespace"] == "llmq"
    assert {i["name"] for i in kustomization["images"]} == {"llmq"}


def test_the_example_secret_holds_placeholders_only(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    secret = manifests[("Secret", "llmq-secrets")]
    assert secret["__file__"] == "secret.example.yaml"
    assert "data" not in secret
    for key, value in secret["stringData"].items():
        parts = urlsplit(value)
        assert (parts.password if parts.scheme else value) == "CHANGE_ME", key
    # Every key a pod or KEDA reads exists in the example.
    wanted = set()
    for doc in objects(manifests):
        if doc["kind"] == "Deployment":
            for env in container(doc).get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "llmq-secrets"
                    wanted.add(ref["key"])
        if doc["kind"] == "TriggerAuthentication":
            wanted |= {r["key"] for r in doc["spec"]["secretTargetRef"]}
    assert wanted == set(secret["stringData"])


def test_worker_pods_drain_within_their_grace_and_probe_the_metrics_port(
    manifests: dict[tuple[str, str], dict[str, Any]], settings: Settings
) -> None:
    worker = manifests[("Deployment", "llmq-worker")]
    pod = worker["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= settings.worker.grace_s + WORKER_CLOSING_S
    c = container(worker)
    assert c["args"][:1] == ["worker"] and "--no-declare" in c["args"]
    [port] = c["ports"]
    assert port["containerPort"] == settings.metrics.port and settings.metrics.host == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert {"requests", "limits"} <= set(c["resources"])
    env = {e["name"]: e for e in c["env"]}
    assert env["LLMQ_BROKER__URL"]["valueFrom"]["secretKeyRef"]["key"] == "worker-amqp-url"
    for endpoint in settings.endpoints:  # every upstream key comes from the Secret
        assert "secretKeyRef" in env[endpoint.api_key_env or ""]["valueFrom"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/llmq"]]["configMap"]["name"] == "llmq-config"


def test_gateway_pods_drain_and_are_served(
    manifests: dict[tuple[str, str], dict[str, Any]], settings: Settings
) -> None:
    gateway = manifests[("Deployment", "llmq-gateway")]
    pod = gateway["spec"]["template"]["spec"]
    c = container(gateway)
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    from producers import gateway as gateway_module

    drain = getattr(gateway_module, "_SHUTDOWN_S", 30.0)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    port, metrics = c["ports"]
    assert port["containerPort"] == settings.gateway.port and settings.gateway.host == "0.0.0.0"
    # /metrics on its own port, scraped at the pod; the Service offers only the API.
    assert metrics["containerPort"] == settings.gateway.metrics_port != settings.gateway.port
    assert settings.gateway.metrics_host == "0.0.0.0"
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.gateway.metrics_port)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in c["env"]}
    assert env["LLMQ_BROKER__URL"]["valueFrom"]["secretKeyRef"]["key"] == "gateway-amqp-url"
    assert settings.gateway.api_keys_env in env
    for endpoint in settings.endpoints:  # the gateway never gets an upstream key
        assert "valueFrom" not in env[endpoint.api_key_env or ""]
    service = manifests[("Service", "llmq-gateway")]
    assert service["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]


def test_workers_believe_the_tenant_header_of_the_gateway_and_operator_only(
    manifests: dict[tuple[str, str], dict[str, Any]], settings: Settings
) -> None:
    """The gateway pods log in as a user of their own, and that user's and the
    operator's tenant headers are the only ones the workers believe."""
    from workers.intake import admission

    secret = manifests[("Secret", "llmq-secrets")]["stringData"]
    gateway = next(
        e
        for e in container(manifests[("Deployment", "llmq-gateway")])["env"]
        if e["name"] == "LLMQ_BROKER__URL"
    )
    gateway_user = urlsplit(secret[gateway["valueFrom"]["secretKeyRef"]["key"]]).username
    worker_user = urlsplit(secret["worker-amqp-url"]).username
    assert gateway_user == "llmq-gateway"
    assert sorted(settings.tenancy.trust_header_from) == ["llmq-gateway", "llmq-operator"]
    rules = admission(settings)
    for trusted in ("llmq-gateway", "llmq-operator"):
        assert rules.tenant(trusted, "acme") == "acme", trusted
    for other in ("llmq-producer", worker_user, None):
        assert rules.tenant(other, "acme") is None, other


def test_pods_run_unprivileged(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for name in ("llmq-worker", "llmq-gateway"):
        deployment = manifests[("Deployment", name)]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        sc = container(deployment)["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_disruption_budgets_select_their_pods(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for name in ("llmq-worker", "llmq-gateway"):
        pdb = manifests[("PodDisruptionBudget", name)]
        deployment = manifests[("Deployment", name)]
        assert pdb["apiVersion"] == "policy/v1"
        assert (
            pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        )
        assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])
    # Workers: one at a time, and a drain never blocks on a single replica.
    assert manifests[("PodDisruptionBudget", "llmq-worker")]["spec"]["maxUnavailable"] == 1


def test_keda_scales_workers_on_ready_plus_unacked_jobs(
    manifests: dict[tuple[str, str], dict[str, Any]], settings: Settings
) -> None:
    scaled = manifests[("ScaledObject", "llmq-worker")]
    auth = manifests[("TriggerAuthentication", "llmq-rabbitmq-management")]
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llmq-worker",
    }
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    meta = trigger["metadata"]
    # KEDA's CRD wants strings only in metadata.
    assert all(isinstance(v, str) for v in meta.values()), meta
    # Over AMQP KEDA counts ready messages only; over HTTP ready + unacked.
    assert meta["protocol"] == "http" and meta["mode"] == "QueueLength"
    assert meta.get("excludeUnacknowledged", "false") == "false"
    assert int(meta["value"]) == settings.worker.concurrency
    assert meta["useRegex"] == "true" and meta["operation"] == "sum"
    topo = settings.topology
    work = [topo.queue_name(c) for c in sorted(topo.classes)]
    for queue in work:
        assert re.search(meta["queueName"], queue), queue
    for other in [q.name for q in plan(TopologySettings()).queues if q.name not in work]:
        assert not re.search(meta["queueName"], other), other
    assert meta["vhostName"] == urlsplit(settings.broker.url.get_secret_value()).path[1:]
    assert "host" not in meta, "credentials come from the TriggerAuthentication"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host" and ref["name"] == "llmq-secrets"
    secret = manifests[("Secret", "llmq-secrets")]["stringData"][ref["key"]]
    url = urlsplit(secret)
    assert url.scheme in ("http", "https") and url.username == "llmq-monitor"
    assert url.path == f"/{meta['vhostName']}"
