"""The Envoy config for grpc-web, checked as data: filters, routes per gRPC service, no worker.

Envoy itself cannot be installed here, so the test resolves request paths the way Envoy's router
does (routes in order, first match wins) for every RPC of every service in the generated
descriptors, and checks where each one lands.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsconductor.execution.v1 import (
    admin_service_pb2,
    approval_service_pb2,
    execution_service_pb2,
    progress_service_pb2,
    worker_service_pb2,
)

from .conftest import ROOT

BASE = ROOT / "k8s/base/envoy/envoy.yaml"
TLS = ROOT / "k8s/components/tls/envoy.yaml"
FILTERS = "envoy.filters.network.http_connection_manager"

#: gRPC service -> the Envoy cluster it must reach (None: never through the edge).
EXPECTED = {
    execution_service_pb2.DESCRIPTOR.services_by_name["ExecutionService"]: "api",
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"]: "api",
    approval_service_pb2.DESCRIPTOR.services_by_name["ApprovalService"]: "approvals",
    progress_service_pb2.DESCRIPTOR.services_by_name["ProgressService"]: "progress_grpc",
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"]: None,
}
#: Envoy cluster -> (Kubernetes Service, port).
CLUSTER_TARGETS = {
    "api": ("api", 50051),
    "approvals": ("approvals", 50053),
    "progress_grpc": ("progress", 50054),
    "progress_http": ("progress", 8080),
}


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == FILTERS
    typed: dict[str, Any] = hcm["typed_config"]
    return typed


def resolve(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The first route whose match applies to ``path`` (Envoy's order)."""
    (vhost,) = connection_manager(config)["route_config"]["virtual_hosts"]
    for route in vhost["routes"]:
        if path.startswith(route["match"]["prefix"]):
            found: dict[str, Any] = route
            return found
    raise AssertionError(f"no route for {path}")


@pytest.fixture(params=[BASE, TLS], ids=["base", "tls"])
def config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_filters_are_health_check_grpc_web_cors_then_router(config: dict[str, Any]) -> None:
    filters = connection_manager(config)["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.health_check",
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.cors",
        "envoy.filters.http.router",
    ]
    types = [f["typed_config"]["@type"].rsplit(".", 1)[-1] for f in filters]
    assert types == ["HealthCheck", "GrpcWeb", "Cors", "Router"]
    # The probe path is answered by Envoy, not passed to a service.
    assert filters[0]["typed_config"]["pass_through_mode"] is False


def test_every_rpc_routes_to_its_service_and_worker_rpcs_to_nothing(
    config: dict[str, Any],
) -> None:
    for service, cluster in EXPECTED.items():
        assert service.methods, service.full_name
        for method in service.methods:
            route = resolve(config, f"/{service.full_name}/{method.name}")
            if cluster is None:
                assert route.get("direct_response") == {"status": 404}, method.full_name
                assert "route" not in route
            else:
                assert route["route"]["cluster"] == cluster, method.full_name


def test_prefixes_are_whole_service_names(config: dict[str, Any]) -> None:
    """A look-alike service name (``ExecutionServiceX``) does not ride on a real route."""
    route = resolve(config, "/opsconductor.execution.v1.ExecutionServiceX/Submit")
    assert route.get("direct_response") == {"status": 404}
    for path in (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.health.v1.Health/Check",
    ):
        assert resolve(config, path).get("direct_response") == {"status": 404}
    assert resolve(config, "/ui/")["route"]["cluster"] == "progress_http"


def test_no_cluster_points_at_the_worker(config: dict[str, Any]) -> None:
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == set(CLUSTER_TARGETS)
    for name, cluster in clusters.items():
        (endpoints,) = cluster["load_assignment"]["endpoints"]
        (lb,) = endpoints["lb_endpoints"]
        address = lb["endpoint"]["address"]["socket_address"]
        assert (address["address"], address["port_value"]) == CLUSTER_TARGETS[name]
        grpc = name != "progress_http"
        options = cluster.get("typed_extension_protocol_options", {})
        has_h2 = "http2_protocol_options" in str(options)
        assert has_h2 is grpc, name


def test_envoy_clusters_match_the_kubernetes_services(rendered: dict[str, Any]) -> None:
    services = {o["metadata"]["name"]: o for o in rendered["base"] if o["kind"] == "Service"}
    for host, port in CLUSTER_TARGETS.values():
        assert port in {p["port"] for p in services[host]["spec"]["ports"]}, (host, port)


def test_cors_allows_grpc_web_without_credentials_or_wildcards(config: dict[str, Any]) -> None:
    (vhost,) = connection_manager(config)["route_config"]["virtual_hosts"]
    cors = vhost["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert cors["@type"].endswith("cors.v3.CorsPolicy")
    assert cors["allow_credentials"] is False
    origins = cors["allow_origin_string_match"]
    assert origins
    assert all("*" not in str(o.get("exact", "")) for o in origins)
    assert all(o.get("prefix") != "*" for o in origins)
    assert {"x-grpc-web", "content-type", "authorization"} <= set(cors["allow_headers"].split(","))
    assert {"grpc-status", "grpc-message"} <= set(cors["expose_headers"].split(","))


def test_tls_config_differs_from_the_base_only_by_upstream_tls() -> None:
    base, tls = load(BASE), load(TLS)
    stripped = copy.deepcopy(tls)
    for cluster in stripped["static_resources"]["clusters"]:
        cluster.pop("transport_socket", None)
    assert stripped == base
    for cluster in tls["static_resources"]["clusters"]:
        if cluster["name"] == "progress_http":
            continue
        context = cluster["transport_socket"]["typed_config"]
        (address,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        host = address["endpoint"]["address"]["socket_address"]["address"]
        assert context["sni"] == host
        common = context["common_tls_context"]
        (cert,) = common["tls_certificates"]
        assert cert["certificate_chain"]["filename"] == "/etc/envoy/tls/tls.crt"
        assert cert["private_key"]["filename"] == "/etc/envoy/tls/tls.key"
        validation = common["validation_context"]
        assert validation["trusted_ca"]["filename"] == "/etc/envoy/tls/ca.crt"
        assert validation["match_typed_subject_alt_names"][0]["matcher"] == {"exact": host}


def test_the_rendered_config_maps_carry_these_files(rendered: dict[str, Any]) -> None:
    for target, path in (("base", BASE), ("dev", BASE), ("prod", TLS)):
        (config_map,) = [
            o
            for o in rendered[target]
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("envoy-config")
        ]
        assert config_map["data"]["envoy.yaml"] == path.read_text(), target
        envoy = next(
            o
            for o in rendered[target]
            if o["kind"] == "Deployment" and o["metadata"]["name"] == "envoy"
        )
        (container,) = envoy["spec"]["template"]["spec"]["containers"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/etc/envoy" in mounts
        assert ("/etc/envoy/tls" in mounts) is (target == "prod")


@pytest.mark.parametrize(
    "path",
    [
        "/ui/",
        "/ui/grpc-client.js",
        "/v1/tickets",
        "/v1/tenants/acme/executions/0b9c/events/ws",
        "/v1/tenants/acme/executions/0b9c/events/sse",
        "/v1/tenants/acme/executions/0b9c/events/poll",
    ],
)
def test_ui_and_event_transports_reach_the_progress_http_side(
    config: dict[str, Any], path: str
) -> None:
    """The page, stream tickets, WebSocket, SSE and long-poll go to the progress service's HTTP
    port without a route timeout (streams follow an execution to its end)."""
    route = resolve(config, path)["route"]
    assert route["cluster"] == "progress_http"
    assert route["timeout"] == "0s"


def test_websocket_upgrades_are_allowed(config: dict[str, Any]) -> None:
    assert {"upgrade_type": "websocket"} in connection_manager(config)["upgrade_configs"]


def test_access_log_never_writes_query_strings(config: dict[str, Any]) -> None:
    """Stream tickets travel as ?ticket=: every access log writes the path without its query."""
    logs = connection_manager(config)["access_log"]
    assert logs
    for log in logs:
        line = log["typed_config"]["log_format"]["text_format_source"]["inline_string"]
        assert "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%" in line
        assert "(:PATH)" not in line.replace("?:PATH", "")
        assert "AUTHORIZATION" not in line.upper()
