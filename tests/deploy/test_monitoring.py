"""The monitoring files: rules valid and unit-tested with promtool, the Alertmanager example valid
with amtool, the Kubernetes objects rendered from the plain files, every alert leading to its
runbook, and the dashboard asking only for documented metrics.

The dashboard's queries against a real Prometheus scraping a live stack:
``tests/e2e/test_observability_metrics.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, load_tool
from .runbooks import ALERTS, RUNBOOKS

MONITORING = ROOT / "k8s" / "monitoring"
COMPONENT = ROOT / "k8s" / "components" / "monitoring"
CATALOGUE = ROOT / "docs" / "observability.md"
#: Metric-like words of PromQL that are functions or keywords, not metrics.
_PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "scalar",
    "vector",
    "or",
    "le",
    "up",
    "without",
    "on",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run `make monitoring-tools` (Debian prometheus)"
    return path


def _run(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def _rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    return loaded


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in _rules()["groups"] for rule in group["rules"] if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((MONITORING / "phase-7-execution-metrics.json").read_text())
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in _dashboard()["panels"]
        for target in panel["targets"]
    ]


def metric_names(expr: str) -> set[str]:
    """The metric (and recording rule) names a PromQL expression reads."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    without_labels = re.sub(r"\{[^}]*\}", "", without_ranges)
    without_groupings = re.sub(r"\b(by|without|on)\s*\([^)]*\)", "", without_labels)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_groupings))
    return {w for w in words if w not in _PROMQL_WORDS and not re.fullmatch(r"[0-9.e]+", w)}


def test_promtool_accepts_the_rules() -> None:
    result = _run(_tool("promtool"), "check", "rules", "rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_fire_each_alert_and_stay_silent_when_healthy() -> None:
    result = _run(_tool("promtool"), "test", "rules", "rules_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "rules_test.yaml").read_text()))
    assert tested == {a["alert"] for a in _alerts()}


def test_a_broken_rule_fails_promtool(tmp_path: Path) -> None:
    """The checks can fail: an alert whose expression does not parse is refused."""
    broken = _rules()
    broken["groups"][1]["rules"][0]["expr"] = "sum(rate(opsc_executions_total[5m]) >"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(broken))
    result = _run(_tool("promtool"), "check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode != 0


def test_amtool_accepts_the_routing_example() -> None:
    result = _run(_tool("amtool"), "check-config", "alertmanager.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_routing_example_routes_every_severity_the_rules_use() -> None:
    config = yaml.safe_load((MONITORING / "alertmanager.yaml").read_text())
    routed = {
        matcher.split("=", 1)[1].strip('"')
        for route in config["route"]["routes"]
        for matcher in route["matchers"]
        if matcher.startswith("severity=")
    }
    assert {a["labels"]["severity"] for a in _alerts()} <= routed


def test_each_alert_has_severity_summary_and_its_runbook() -> None:
    alerts = {a["alert"]: a for a in _alerts()}
    assert set(alerts) == set(ALERTS), "rules and tests/deploy/runbooks.py ALERTS disagree"
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"page", "warning", "security"}, name
        assert alert["annotations"]["summary"], name
        url = alert["annotations"]["runbook_url"]
        assert url.endswith(f"/docs/runbooks/{ALERTS[name]}.md"), name
        assert (RUNBOOKS / f"{ALERTS[name]}.md").exists(), name


def test_the_kubernetes_objects_are_rendered_from_the_plain_files() -> None:
    gen = load_tool("gen_monitoring")
    assert gen.main(["--check"]) == 0
    rule = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == _rules()["groups"]
    config_map = yaml.safe_load((COMPONENT / "grafana-dashboard.yaml").read_text())
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    embedded = json.loads(config_map["data"]["phase-7-execution-metrics.json"])
    assert embedded == _dashboard()
    kustomization = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {
        "podmonitor.yaml",
        "prometheusrule.yaml",
        "grafana-dashboard.yaml",
    }


def test_a_stale_rendering_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = load_tool("gen_monitoring")
    monkeypatch.setattr(gen, "COMPONENT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0


def test_the_dashboard_is_phase_7_with_the_panels_the_issue_lists() -> None:
    dashboard = _dashboard()
    assert dashboard["title"] == "Phase 7: Execution Metrics"
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in (
        "p95 execution duration by action and sla class",
        "throughput",
        "queue length",
        "queue wait",
        "dlq size",
        "timeout rate",
        "cancellation rate",
        "rbac violations",
        "lease expirations",
        "mutex reaping",
        "approvals pending",
        "per-service health",
        "progress: live subscribers by transport",
        "progress: events delivered",
        "progress: delivery lag p95",
        "progress: slow subscribers cut off",
    ):
        assert needed in titles, needed
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_rules_and_dashboard_read_only_documented_metrics() -> None:
    catalogue = CATALOGUE.read_text()
    documented = set(re.findall(r"`(opsc_[a-z_]+|opsc:[a-z0-9_:]+)`", catalogue))
    recorded = {r["record"] for g in _rules()["groups"] for r in g["rules"] if "record" in r}
    assert recorded <= documented
    exprs = [expr for _title, expr in dashboard_queries()]
    exprs += [r["expr"] for g in _rules()["groups"] for r in g["rules"]]
    for expr in exprs:
        for name in metric_names(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in documented or base in documented, f"{name} (in {expr!r})"


def test_metric_names_of_an_expression() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, action) (rate(opsc_x_bucket{a="b"}[5m])))'
    ) == {"opsc_x_bucket"}
    assert metric_names("opsc:a:ratio / scalar(sum(rate(opsc_y_total[1h])))") == {
        "opsc:a:ratio",
        "opsc_y_total",
    }
