"""The invariants of the Kubernetes deployment, checked on what kustomize renders (base, dev, prod).

Hardening of every pod, probes on the gRPC health service, requests and limits, configuration
from a ConfigMap and Secret references only, the reaper CronJob, the migrations Job, the worker
HPA, and who can reach whom under the NetworkPolicies (evaluated here as the API server would).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from opsconductor.actions.sandbox import SandboxSettings
from opsconductor.api.settings import ApiSettings
from opsconductor.approvals.settings import ApprovalsSettings
from opsconductor.common.masking import mask_text
from opsconductor.common.settings import ServiceSettings
from opsconductor.common.tenant_policy import TenantPolicies
from opsconductor.lifecycle.storage.migrate import MigrationSettings
from opsconductor.progress.settings import ProgressSettings
from opsconductor.worker.settings import WorkerSettings

from .conftest import ROOT

Objects = list[dict[str, Any]]
SERVICES = {"api": (50051, 9101), "worker": (50052, 9102), "approvals": (50053, 9103)}
SERVICES["progress"] = (50054, 9104)
TARGETS = ["base", "dev", "prod"]
NAMESPACE = {"base": "default", "dev": "opsconductor-dev", "prod": "opsconductor"}


def objects_of(objects: Objects, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_specs(objects: Objects) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template: Deployments, Jobs and CronJobs."""
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in {"Deployment", "Job"}:
            yield name, obj["spec"]["template"]
        elif obj["kind"] == "CronJob":
            yield name, obj["spec"]["jobTemplate"]["spec"]["template"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def service_container(objects: Objects, service: str) -> dict[str, Any]:
    deployment = objects_of(objects, "Deployment")[service]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------------------------------
# Rendering and validation


def test_make_k8s_validate_renders_every_overlay_and_validates_every_object(
    k8s_validate: ModuleType,
) -> None:
    if k8s_validate.renderer() is None:
        pytest.skip("NOT RENDERED: no kubectl or kustomize on PATH")
    report = k8s_validate.run()
    assert report.errors == []
    assert [line.split()[0] for line in report.rendered] == [
        "k8s/base",
        "k8s/overlays/dev",
        "k8s/overlays/prod",
    ]
    assert report.validated > 100
    # Only the cert-manager Certificates and the monitoring component's Prometheus-operator
    # objects lack a bundled schema, and they are named.
    assert all(
        re.search(r"(Certificate|PodMonitor|PrometheusRule)/", line)
        for line in report.custom_not_validated
    )


def test_validation_fails_on_an_invalid_object_and_on_an_unknown_kind(
    k8s_validate: ModuleType,
) -> None:
    report = k8s_validate.Report()
    bad_probe = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "x", "readinessProbe": {"grcp": {}}}]},
            },
        },
    }
    typo_kind = {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certficate",
        "metadata": {"name": "y"},
    }
    k8s_validate.validate_objects([bad_probe, typo_kind], "test", report, "1.30.0")
    assert len(report.errors) == 2
    assert "grcp" in report.errors[0]
    assert "no schema" in report.errors[1]


def test_without_a_renderer_the_base_and_patches_are_checked_and_the_gap_is_said(
    k8s_validate: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(k8s_validate, "renderer", lambda: None)
    assert k8s_validate.main([]) == 0
    err = capsys.readouterr().err
    assert "NOT RENDERED" in err
    assert "k8s/overlays/prod" in err
    report = k8s_validate.run()
    assert report.validated >= 30  # the plain resource files of the base
    assert report.errors == []
    broken = k8s_validate.Report()
    k8s_validate.check_patch("p", [[{"op": "add", "path": "no-slash"}]], broken, "1.30.0")
    assert broken.errors


def test_a_target_that_does_not_render_fails_the_validation(k8s_validate: ModuleType) -> None:
    report = k8s_validate.run(command=["false"])
    assert report.rendered == []
    assert len(report.errors) == 3
    assert all("render failed" in e for e in report.errors)


def test_kustomizations_use_labels_not_common_labels() -> None:
    for path in (ROOT / "k8s").rglob("kustomization.yaml"):
        assert "commonLabels" not in yaml.safe_load(path.read_text()), path


# --------------------------------------------------------------------------------------------------
# Every pod


def test_every_pod_is_non_root_seccomp_confined_and_without_a_token(
    rendered: dict[str, Objects], target: str
) -> None:
    specs = dict(pod_specs(rendered[target]))
    assert len(specs) == 7  # 4 services, Envoy, the reaper, the migrations
    for name, pod in specs.items():
        security = pod["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] != 0, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["spec"]["automountServiceAccountToken"] is False, name
        assert not pod["spec"].get("hostNetwork"), name
        assert not pod["spec"].get("hostPID"), name


#: The one exception, only with the shell-sandbox component (docs/security.md, "Kubernetes"):
#: the worker keeps SETUID/SETGID in its bounding set for the image's setpriv copy, whose file
#: capabilities need privilege escalation allowed.
SANDBOX_CAPABILITIES = {"drop": ["ALL"], "add": ["SETUID", "SETGID"]}


def test_every_container_has_a_read_only_root_no_capabilities_and_limits(
    rendered: dict[str, Objects], target: str
) -> None:
    for name, pod in pod_specs(rendered[target]):
        for container in containers(pod):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert not security.get("privileged"), name
            if name == "Deployment/worker" and target != "base":
                assert security["capabilities"] == SANDBOX_CAPABILITIES
                assert security["allowPrivilegeEscalation"] is True
                assert env_of(container)["OPSC_SANDBOX_MODE"]["value"] == "setpriv"
                # Step uids are unique per pod only: one worker pod per node.
                (rule,) = pod["spec"]["affinity"]["podAntiAffinity"][
                    "requiredDuringSchedulingIgnoredDuringExecution"
                ]
                assert rule["topologyKey"] == "kubernetes.io/hostname"
                assert _matches(rule["labelSelector"], pod["metadata"]["labels"])
            else:
                assert security["capabilities"] == {"drop": ["ALL"]}, name
                assert security["allowPrivilegeEscalation"] is False, name
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert set(resources[kind]) == {"cpu", "memory"}, (name, kind)


def test_namespaces_enforce_pod_security(rendered: dict[str, Objects]) -> None:
    """Restricted is warned and audited everywhere; enforced as baseline only because of the
    worker's sandbox capabilities (restricted admits no added capability)."""
    for target in ("dev", "prod"):
        (namespace,) = objects_of(rendered[target], "Namespace").values()
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
        assert labels["pod-security.kubernetes.io/warn"] == "restricted"
        assert labels["pod-security.kubernetes.io/audit"] == "restricted"


def test_services_probe_the_grpc_health_service_on_their_own_port(
    rendered: dict[str, Objects], target: str
) -> None:
    for service, (grpc_port, metrics_port) in SERVICES.items():
        container = service_container(rendered[target], service)
        env = env_of(container)
        assert env["OPSC_GRPC_PORT"]["value"] == str(grpc_port)
        assert env["OPSC_METRICS_PORT"]["value"] == str(metrics_port)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {**ports, "grpc": grpc_port, "metrics": metrics_port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            if target == "prod":
                # mTLS: kubelet gRPC probes cannot speak TLS; they ask the plaintext
                # health-only listener the service opens on OPSC_HEALTH_PORT.
                assert spec["grpc"] == {"port": int(env["OPSC_HEALTH_PORT"]["value"])}
                assert ports["health"] == spec["grpc"]["port"]
            else:
                assert spec["grpc"] == {"port": grpc_port}, (service, probe)
    progress = service_container(rendered[target], "progress")
    assert env_of(progress)["OPSC_HTTP_PORT"]["value"] == "8080"


def test_services_listen_on_every_interface_and_find_the_worker_by_its_service(
    rendered: dict[str, Objects], target: str
) -> None:
    config = next(
        o for o in rendered[target] if o["kind"] == "ConfigMap" and "OPSC_GRPC_HOST" in o["data"]
    )["data"]
    assert config["OPSC_GRPC_HOST"] == "0.0.0.0"
    host, port = config["OPSC_WORKER_TARGET"].split(":")
    worker_service = objects_of(rendered[target], "Service")[host]
    assert {p["port"] for p in worker_service["spec"]["ports"]} >= {int(port)}
    assert config["OPSC_MIGRATIONS_DIR"] == "/app/migrations"  # where the Dockerfile puts them


def test_each_service_has_its_own_service_account_service_and_disruption_budget(
    rendered: dict[str, Objects], target: str
) -> None:
    objects = rendered[target]
    for service, (grpc_port, _metrics) in SERVICES.items():
        deployment = objects_of(objects, "Deployment")[service]
        pod = deployment["spec"]["template"]
        assert pod["spec"]["serviceAccountName"] == service
        assert service in objects_of(objects, "ServiceAccount")
        svc = objects_of(objects, "Service")[service]
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert {"name": "grpc", "port": grpc_port, "targetPort": "grpc"} in svc["spec"]["ports"]
        pdb = objects_of(objects, "PodDisruptionBudget")[service]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pdb["spec"]["maxUnavailable"] == 1


def test_the_worker_scales_by_its_hpa_alone(rendered: dict[str, Objects], target: str) -> None:
    hpa = objects_of(rendered[target], "HorizontalPodAutoscaler")["worker"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "worker",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in objects_of(rendered[target], "Deployment")["worker"]["spec"]


def test_worker_is_never_exposed_outside_the_cluster(
    rendered: dict[str, Objects], target: str
) -> None:
    objects = rendered[target]
    assert not [o for o in objects if o["kind"] in {"Ingress", "Gateway", "HTTPRoute"}]
    for svc in objects_of(objects, "Service").values():
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    worker = objects_of(objects, "Service")["worker"]
    assert {p["port"] for p in worker["spec"]["ports"]} == {50052, 9102}


# --------------------------------------------------------------------------------------------------
# Configuration and secrets


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


_SECRET_ENV = re.compile(r"(URL|KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL)$")


def test_no_secret_is_written_in_the_repository(rendered: dict[str, Objects], target: str) -> None:
    objects = rendered[target]
    assert not [o for o in objects if o["kind"] == "Secret"]
    # No value the log masker would call a credential (PEM blocks, tokens, URLs with a
    # password, "password: ..." inside an embedded file). Values one by one: the masker's
    # key patterns would also redact harmless settings such as OPSC_JWT_AUDIENCE.
    for value in _strings(objects):
        assert mask_text(value) == value, value
    for name, pod in pod_specs(objects):
        for container in containers(pod):
            for env in container.get("env", []):
                if _SECRET_ENV.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (name, env["name"])
    for config in objects_of(objects, "ConfigMap").values():
        for key in config.get("data", {}):
            assert not _SECRET_ENV.search(key), key


def test_database_and_redis_urls_come_from_secrets(
    rendered: dict[str, Objects], target: str
) -> None:
    uses_redis = {"api", "worker", "approvals"}
    for service in SERVICES:
        env = env_of(service_container(rendered[target], service))
        ref = env["OPSC_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "opsconductor-database", "key": "url"}
        assert ("OPSC_REDIS_URL" in env) == (service in uses_redis), service


def test_jwt_verification_per_environment(rendered: dict[str, Objects]) -> None:
    for service in SERVICES:
        dev = env_of(service_container(rendered["dev"], service))
        assert dev["OPSC_JWT_HS256_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "opsconductor-jwt"
        prod_container = service_container(rendered["prod"], service)
        prod = env_of(prod_container)
        assert "OPSC_JWT_HS256_KEY" not in prod
        key_file = Path(prod["OPSC_JWT_RS256_PUBLIC_KEY_FILE"]["value"])
        mounts = {m["mountPath"]: m["name"] for m in prod_container["volumeMounts"]}
        assert mounts[str(key_file.parent)] == "jwt-public-key"


def test_prod_turns_mtls_on_with_cert_manager_certificates(rendered: dict[str, Objects]) -> None:
    objects = rendered["prod"]
    certificates = objects_of(objects, "Certificate")
    for service in SERVICES:
        deployment = objects_of(objects, "Deployment")[service]
        container = service_container(objects, service)
        env = {k: v.get("value") for k, v in env_of(container).items()}
        assert env["OPSC_TLS_CLIENT_AUTH"] == "require"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        for variable, file in (
            ("OPSC_TLS_CERT_FILE", "tls.crt"),
            ("OPSC_TLS_KEY_FILE", "tls.key"),
            ("OPSC_TLS_CA_FILE", "ca.crt"),
        ):
            assert env[variable] == f"{mounts['tls']}/{file}"
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        secret = volumes["tls"]["secret"]["secretName"]
        # Not readable by a sandboxed step's uid (docs/security.md): owner-only, the pod's
        # fsGroup adds group read for the service itself.
        assert volumes["tls"]["secret"]["defaultMode"] == 0o400
        certificate = certificates[service]["spec"]
        assert certificate["secretName"] == secret
        assert certificate["issuerRef"] == {"kind": "Issuer", "name": "opsconductor-ca"}
        assert {"server auth", "client auth"} <= set(certificate["usages"])
        # The name clients dial (OPSC_WORKER_TARGET, Envoy's SNI).
        assert {service, f"{service}.opsconductor.svc"} <= set(certificate["dnsNames"])
    for service in SERVICES:
        assert "OPSC_TLS_CERT_FILE" not in env_of(service_container(rendered["dev"], service))


def test_prod_mounts_the_tenant_policy_where_the_setting_points(
    rendered: dict[str, Objects], tmp_path: Path
) -> None:
    objects = rendered["prod"]
    for service in ("api", "worker"):
        deployment = objects_of(objects, "Deployment")[service]
        container = service_container(objects, service)
        policy_file = Path(env_of(container)["OPSC_TENANT_POLICY_FILE"]["value"])
        mount = next(m for m in container["volumeMounts"] if m["name"] == "tenant-policy")
        assert mount["mountPath"] == str(policy_file.parent)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        config_map = objects_of(objects, "ConfigMap")[volumes["tenant-policy"]["configMap"]["name"]]
        document = config_map["data"][policy_file.name]
        # The real loader accepts it (an unknown key would be a load error at start-up).
        (tmp_path / policy_file.name).write_text(document)
        TenantPolicies.load(tmp_path / policy_file.name)


def test_prod_images_are_pinned_tags(rendered: dict[str, Objects]) -> None:
    for _name, pod in pod_specs(rendered["prod"]):
        for container in containers(pod):
            image = container["image"]
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", image), image


# --------------------------------------------------------------------------------------------------
# The reaper and the migrations


def test_reaper_runs_every_minute_one_at_a_time(rendered: dict[str, Objects], target: str) -> None:
    cronjob = objects_of(rendered[target], "CronJob")["reaper"]
    assert cronjob["spec"]["schedule"] == "*/1 * * * *"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "opsconductor.worker.reaper", "--once"]
    env = env_of(container)
    assert "secretKeyRef" in env["OPSC_DATABASE_URL"]["valueFrom"]
    assert "secretKeyRef" in env["OPSC_REDIS_URL"]["valueFrom"]


def test_migrations_run_as_a_job_of_the_advisory_locked_runner(
    rendered: dict[str, Objects], target: str
) -> None:
    job = objects_of(rendered[target], "Job")["migrate"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "opsconductor.lifecycle.storage.migrate", "up"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


# --------------------------------------------------------------------------------------------------
# NetworkPolicies, evaluated


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[op]
        if not ok:
            return False
    return True


class Peer:
    """A pod (namespace, labels, named ports) or an address outside any pod network."""

    def __init__(
        self,
        namespace: str | None,
        labels: dict[str, str] | None = None,
        ports: dict[str, int] | None = None,
        ip: str = "10.0.0.1",
    ) -> None:
        self.namespace, self.labels, self.ports, self.ip = namespace, labels or {}, ports or {}, ip


def _peer_matches(rule_peers: list[dict[str, Any]] | None, peer: Peer, own_ns: str) -> bool:
    if not rule_peers:
        return True  # no from/to: every peer
    for entry in rule_peers:
        if "ipBlock" in entry:
            block = entry["ipBlock"]
            address = ipaddress.ip_address(peer.ip)
            if address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(e) for e in block.get("except", [])
            ):
                return True
            continue
        if peer.namespace is None:
            continue  # selectors only ever match pods
        ns_selector = entry.get("namespaceSelector")
        if ns_selector is None:
            ns_ok = peer.namespace == own_ns
        else:
            ns_ok = _matches(ns_selector, {"kubernetes.io/metadata.name": peer.namespace})
        pod_ok = _matches(entry.get("podSelector", {}), peer.labels)
        if ns_ok and pod_ok:
            return True
    return False


def _port_matches(
    rule_ports: list[dict[str, Any]] | None, port: int, named: dict[str, int]
) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        wanted = entry["port"]
        if (named.get(wanted) if isinstance(wanted, str) else wanted) == port:
            return True
    return False


def allowed(policies: Objects, ns: str, source: Peer, dest: Peer, port: int) -> bool:
    """Whether ``source`` may open a TCP connection to ``dest`` on ``port``."""

    def direction(peer: Peer, kind: str, other: Peer, named: dict[str, int]) -> bool:
        if peer.namespace != ns:
            return True  # outside our namespace our policies do not apply
        selecting = [
            p
            for p in policies
            if kind in p["spec"].get("policyTypes", ["Ingress"])
            and _matches(p["spec"]["podSelector"], peer.labels)
        ]
        if not selecting:
            return True
        key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
        return any(
            _peer_matches(rule.get(peers_key), other, ns)
            and _port_matches(rule.get("ports"), port, named)
            for policy in selecting
            for rule in policy["spec"].get(key, [])
        )

    return direction(dest, "Ingress", source, dest.ports) and direction(
        source, "Egress", dest, dest.ports
    )


def _pods(objects: Objects, ns: str) -> dict[str, Peer]:
    pods = {}
    for _name, pod in pod_specs(objects):
        labels = pod["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for c in containers(pod) for p in c.get("ports", [])}
        pods[labels["app.kubernetes.io/component"]] = Peer(ns, labels, ports)
    return pods


@pytest.fixture
def network(rendered: dict[str, Objects], target: str) -> tuple[Objects, str, dict[str, Peer]]:
    ns = NAMESPACE[target]
    objects = rendered[target]
    return [o for o in objects if o["kind"] == "NetworkPolicy"], ns, _pods(objects, ns)


OUTSIDE = Peer("some-other-team", {"app": "client"})
INTERNET = Peer(None, ip="203.0.113.7")
MONITORING = Peer("monitoring", {"app": "prometheus"})
POSTGRES = Peer("opsconductor-data", {"cnpg.io/cluster": "opsconductor-pg"}, {"pg": 5432})
REDIS = Peer("opsconductor-data", {"app.kubernetes.io/name": "opsconductor-redis"}, {"r": 6379})


def test_only_api_approvals_progress_and_envoy_are_reachable_from_outside(
    network: tuple[Objects, str, dict[str, Peer]],
) -> None:
    policies, ns, pods = network
    for source in (OUTSIDE, INTERNET):
        for service in ("api", "approvals", "progress"):
            assert allowed(policies, ns, source, pods[service], SERVICES[service][0]), service
        assert allowed(policies, ns, source, pods["progress"], 8080)
        assert allowed(policies, ns, source, pods["envoy"], 8080)
        for service, (_grpc, metrics_port) in SERVICES.items():
            assert not allowed(policies, ns, source, pods[service], metrics_port), service
        assert not allowed(policies, ns, source, pods["worker"], 50052)


def test_worker_accepts_only_api_and_approvals(
    network: tuple[Objects, str, dict[str, Peer]],
) -> None:
    policies, ns, pods = network
    worker = pods["worker"]
    assert allowed(policies, ns, pods["api"], worker, 50052)
    assert allowed(policies, ns, pods["approvals"], worker, 50052)
    for other in ("progress", "envoy", "reaper", "migrate"):
        assert not allowed(policies, ns, pods[other], worker, 50052), other
    assert not allowed(policies, ns, OUTSIDE, worker, 50052)
    assert allowed(policies, ns, MONITORING, worker, 9102)  # Prometheus scrapes it


def test_egress_reaches_postgres_and_redis_only_for_who_needs_them(
    network: tuple[Objects, str, dict[str, Peer]],
) -> None:
    policies, ns, pods = network
    for name in ("api", "worker", "approvals", "progress", "reaper", "migrate"):
        assert allowed(policies, ns, pods[name], POSTGRES, 5432), name
    for name in ("api", "worker", "approvals", "reaper"):
        assert allowed(policies, ns, pods[name], REDIS, 6379), name
    for name in ("progress", "migrate", "envoy"):
        assert not allowed(policies, ns, pods[name], REDIS, 6379), name
    assert not allowed(policies, ns, pods["envoy"], POSTGRES, 5432)
    # Not any pod on those ports: the database's own namespace and labels.
    assert not allowed(policies, ns, pods["api"], Peer("elsewhere", POSTGRES.labels), 5432)


def test_envoy_reaches_the_public_services_but_not_the_worker(
    network: tuple[Objects, str, dict[str, Peer]],
) -> None:
    policies, ns, pods = network
    for service in ("api", "approvals", "progress"):
        assert allowed(policies, ns, pods["envoy"], pods[service], SERVICES[service][0])
    assert allowed(policies, ns, pods["envoy"], pods["progress"], 8080)
    assert not allowed(policies, ns, pods["envoy"], pods["worker"], 50052)


@pytest.mark.parametrize(
    ("ip", "port", "expected"),
    [
        ("203.0.113.7", 443, True),
        ("203.0.113.7", 22, False),
        ("169.254.169.254", 80, False),  # cloud metadata
        ("10.1.2.3", 443, False),
        ("192.168.1.1", 443, False),
        ("127.0.0.1", 443, False),
    ],
)
def test_worker_actions_reach_the_internet_but_not_private_or_metadata_addresses(
    network: tuple[Objects, str, dict[str, Peer]], ip: str, port: int, expected: bool
) -> None:
    policies, ns, pods = network
    assert allowed(policies, ns, pods["worker"], Peer(None, ip=ip), port) is expected
    assert not allowed(policies, ns, pods["api"], Peer(None, ip=ip), port)


# --------------------------------------------------------------------------------------------------
# Every variable the manifests set is one the code reads


def _variables(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads (prefix + name, and its aliases)."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names = set()
    for name, info in settings.model_fields.items():
        names.add(f"{prefix}{name}".upper())
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias.upper())
    return names


def test_every_variable_set_is_read_by_the_process_it_is_set_for(
    rendered: dict[str, Objects], target: str
) -> None:
    readers: dict[str, set[str]] = {
        "api": _variables(ApiSettings),
        "worker": _variables(WorkerSettings) | _variables(SandboxSettings),
        "approvals": _variables(ApprovalsSettings),
        "progress": _variables(ProgressSettings),
        "reaper": _variables(WorkerSettings),
        "migrate": _variables(MigrationSettings),
    }
    for _name, pod in pod_specs(rendered[target]):
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "envoy":
            continue
        for container in containers(pod):
            for variable in env_of(container):
                assert variable in readers[component], f"{component}: {variable} is read by nothing"
    config = next(
        o for o in rendered[target] if o["kind"] == "ConfigMap" and "OPSC_GRPC_HOST" in o["data"]
    )
    for variable in config["data"]:
        assert variable in _variables(ServiceSettings) | readers["migrate"], variable
