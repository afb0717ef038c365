"""Render the monitoring component's Kubernetes objects from the plain files of k8s/monitoring/.

The alert and recording rules (``rules.yaml``) and the Grafana dashboard
(``phase-7-execution-metrics.json``) are written once, as the files Prometheus and Grafana read;
this renders them into ``k8s/components/monitoring/`` as a ``PrometheusRule`` and a dashboard
``ConfigMap`` (kustomize cannot load files from outside a component's folder).
``--check`` fails when the rendered files are stale (tests/deploy/test_monitoring.py runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "k8s" / "monitoring"
COMPONENT = ROOT / "k8s" / "components" / "monitoring"
DASHBOARD_FILE = "phase-7-execution-metrics.json"
_HEADER = (
    "# Rendered by tools/gen_monitoring.py from k8s/monitoring/{source}: edit that, not this.\n"
)
_LABELS = {"app.kubernetes.io/name": "opsconductor", "app.kubernetes.io/component": "monitoring"}


def prometheus_rule() -> dict[str, Any]:
    rules = yaml.safe_load((SOURCE / "rules.yaml").read_text())
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "opsconductor-execution", "labels": dict(_LABELS)},
        "spec": {"groups": rules["groups"]},
    }


def dashboard_config_map() -> dict[str, Any]:
    dashboard = json.loads((SOURCE / DASHBOARD_FILE).read_text())
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "grafana-dashboard-execution",
            # Grafana's dashboard sidecar loads every ConfigMap carrying this label.
            "labels": {**_LABELS, "grafana_dashboard": "1"},
        },
        "data": {DASHBOARD_FILE: json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"},
    }


def rendered() -> dict[Path, str]:
    dump = {"sort_keys": False, "allow_unicode": True, "width": 100}
    return {
        COMPONENT / "prometheusrule.yaml": _HEADER.format(source="rules.yaml")
        + yaml.safe_dump(prometheus_rule(), **dump),  # type: ignore[call-overload]
        COMPONENT / "grafana-dashboard.yaml": _HEADER.format(source=DASHBOARD_FILE)
        + yaml.safe_dump(dashboard_config_map(), **dump),  # type: ignore[call-overload]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the rendered files are stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"rendered {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python tools/gen_monitoring.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
