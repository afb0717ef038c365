"""``make k8s-validate``: render every kustomization under ``k8s/`` and validate every object.

1. Render: each kustomization that is not a Component (``k8s/base``, ``k8s/overlays/*``) with
   ``kubectl kustomize`` (kubectl carries kustomize v5), else a standalone ``kustomize build``.
2. Validate: every rendered object against the Kubernetes OpenAPI schemas bundled in pip
   ``kubernetes-validate``, strictly (unknown fields are errors), for Kubernetes 1.30.0 — the
   same check as ``kubernetes-validate --strict -k 1.30.0``, through its library so that all
   renders share one process.
3. Custom resources (cert-manager ``Certificate``, Prometheus-operator kinds) have no bundled
   schema: the ones listed in :data:`KNOWN_CUSTOM_KINDS` are reported by name as *not
   schema-validated*; any other kind without a schema is an error, so a typo in ``kind`` or
   ``apiVersion`` cannot pass.

Without any renderer the overlays cannot be built: the plain resource files are still validated,
each patch is parsed and its operations checked for shape, and the output says in capitals what
was not rendered (the exit status stays 0 only then; any invalid object exits 1).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.30.0"

#: Custom resources this repository uses on purpose: (apiVersion, kind) -> what installs the CRD.
KNOWN_CUSTOM_KINDS: dict[tuple[str, str], str] = {
    ("cert-manager.io/v1", "Certificate"): "cert-manager",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheus-operator",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator",
}

_JSON6902_OPS = frozenset({"add", "remove", "replace", "move", "copy", "test"})


@dataclass
class Report:
    """What was rendered and validated, and what went wrong."""

    rendered: list[str] = field(default_factory=list)
    not_rendered: list[str] = field(default_factory=list)
    validated: int = 0
    custom_not_validated: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def renderer() -> list[str] | None:
    """The command that renders a kustomization directory (argument appended), if any."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build"]
    return None


def kustomizations(root: Path = K8S) -> list[Path]:
    """Every renderable kustomization directory (Components are rendered through overlays)."""
    found = []
    for path in sorted(root.rglob("kustomization.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        if doc.get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    # Only the top-level targets: a base's sub-folders are rendered as part of it.
    targets = [d for d in found if d.parent == root / "overlays" or d == root / "base"]
    return targets


def render(directory: Path, command: list[str]) -> list[dict[str, Any]]:
    """The objects ``command DIRECTORY`` renders; raises ``RuntimeError`` with its stderr."""
    result = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"exit status {result.returncode}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _name(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def validate_objects(
    objects: Iterable[dict[str, Any]], where: str, report: Report, version: str
) -> None:
    """Validate each object strictly; record errors and unvalidated custom resources."""
    for obj in objects:
        label = f"{where}: {_name(obj)}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            key = (str(obj.get("apiVersion")), str(obj.get("kind")))
            if key in KNOWN_CUSTOM_KINDS:
                report.custom_not_validated.append(f"{label} ({KNOWN_CUSTOM_KINDS[key]} CRD)")
            else:
                report.errors.append(f"{label}: no schema for {key[0]} {key[1]}")
            continue
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(item) for item in exc.path)
            report.errors.append(f"{label}: {path}: {exc.message}")
            continue
        report.validated += 1


def _resource_files(directory: Path) -> Iterator[Path]:
    """The plain resource files a kustomization lists, recursively through folders."""
    doc = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    for entry in doc.get("resources", []):
        path = directory / entry
        if path.is_dir() and (path / "kustomization.yaml").exists():
            yield from _resource_files(path)
        elif path.is_file():
            yield path


def _patches(directory: Path) -> Iterator[tuple[str, Any]]:
    doc = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    for index, patch in enumerate(doc.get("patches", [])):
        where = f"{directory.relative_to(ROOT)} patches[{index}]"
        if "path" in patch:
            yield where, list(yaml.safe_load_all((directory / patch["path"]).read_text()))
        else:
            yield where, list(yaml.safe_load_all(patch["patch"]))


def check_patch(where: str, docs: list[Any], report: Report, version: str) -> None:
    """A JSON 6902 patch is a list of well-formed operations; a strategic merge patch an
    object with apiVersion, kind and name (it is partial, so not schema-validated)."""
    for doc in docs:
        if isinstance(doc, list):
            for op in doc:
                if not (
                    isinstance(op, dict)
                    and op.get("op") in _JSON6902_OPS
                    and str(op.get("path", "")).startswith("/")
                    and ("value" in op or op.get("op") in {"remove", "move", "copy"})
                ):
                    report.errors.append(f"{where}: malformed JSON 6902 operation {op!r}")
        elif isinstance(doc, dict):
            if not {"apiVersion", "kind"} <= doc.keys() or not (doc.get("metadata") or {}).get(
                "name"
            ):
                report.errors.append(f"{where}: strategic merge patch needs apiVersion/kind/name")
        else:
            report.errors.append(f"{where}: not a patch: {type(doc).__name__}")


def validate_without_renderer(report: Report, version: str) -> None:
    """No renderer: validate the plain files and the shape of every patch, say what is left."""
    for directory in kustomizations():
        report.not_rendered.append(str(directory.relative_to(ROOT)))
    for path in sorted(set(_resource_files(K8S / "base"))):
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        validate_objects(docs, str(path.relative_to(ROOT)), report, version)
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        for where, docs in _patches(kustomization.parent):
            check_patch(where, docs, report, version)


def run(version: str = KUBERNETES_VERSION, command: list[str] | None = None) -> Report:
    """Render and validate everything; ``command`` overrides the renderer lookup."""
    report = Report()
    command = command if command is not None else renderer()
    if command is None:
        validate_without_renderer(report, version)
        return report
    for directory in kustomizations():
        where = str(directory.relative_to(ROOT))
        try:
            objects = render(directory, command)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            report.errors.append(f"{where}: render failed: {exc}")
            continue
        report.rendered.append(f"{where} ({len(objects)} objects)")
        validate_objects(objects, where, report, version)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/k8s_validate.py", description=__doc__)
    parser.add_argument("-k", "--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args(argv)
    report = run(args.kubernetes_version)
    for line in report.rendered:
        print(f"rendered  {line}")
    print(f"validated {report.validated} objects against Kubernetes {args.kubernetes_version}")
    for line in report.custom_not_validated:
        print(f"NOT SCHEMA-VALIDATED (custom resource, no bundled schema): {line}")
    if report.not_rendered:
        print(
            "NOT RENDERED (no kubectl or kustomize on PATH): "
            + ", ".join(report.not_rendered)
            + " — only the plain resource files and the shape of each patch were checked",
            file=sys.stderr,
        )
    for line in report.errors:
        print(f"ERROR {line}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
