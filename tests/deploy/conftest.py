"""Fixtures of the deployment tests: the rendered kustomize targets, loaded once per run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (the tools folder is scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def k8s_validate() -> ModuleType:
    return load_tool("k8s_validate")


@pytest.fixture(scope="session")
def rendered(k8s_validate: ModuleType) -> dict[str, list[dict[str, Any]]]:
    """``{"base": [...], "dev": [...], "prod": [...]}``: every object each target renders."""
    command = k8s_validate.renderer()
    if command is None:
        pytest.skip("NOT RENDERED: no kubectl or kustomize on PATH (make k8s-validate says more)")
    return {
        ("base" if d.name == "base" else d.name): k8s_validate.render(d, command)
        for d in k8s_validate.kustomizations()
    }
