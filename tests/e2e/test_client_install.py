"""The client distribution stands alone: ``pip install ./libs/client`` into an empty virtualenv
(with ``libs/proto``, its one local dependency) pulls none of the servers' dependencies, and
``opsctl`` works there.

A real virtualenv and a real pip install: the two local packages are built into wheels with the
project's own hatchling (no build isolation, so nothing is fetched to build them), their
dependencies come from the registry through pip's cache, pinned by
``requirements/constraints.txt``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: What a calling service or an operator's laptop must not get from the client.
SERVER_ONLY = {
    "asyncpg",
    "redis",
    "opentelemetry-sdk",
    "opentelemetry-api",
    "opsconductor-common",
    "pydantic",
    "structlog",
    "starlette",
    "uvicorn",
}


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSC_", "PYTHON"))}
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        cmd, capture_output=True, text=True, check=False, env=env, timeout=600, **kwargs
    )


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("client-venv")
    wheels = base / "wheels"
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT / "libs" / "proto"),
            str(ROOT / "libs" / "client"),
        ]
    )
    assert built.returncode == 0, built.stderr[-3000:]
    target = base / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    python = target / "bin" / "python"
    empty = _run([str(python), "-m", "pip", "list", "--format=json"])
    assert {p["name"] for p in json.loads(empty.stdout)} <= {"pip", "setuptools"}, empty.stdout
    installed = _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            str(ROOT / "requirements" / "constraints.txt"),
            *sorted(str(w) for w in wheels.glob("*.whl")),
        ]
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return target


def test_the_client_pulls_none_of_the_servers_dependencies(client_venv: Path) -> None:
    listed = _run([str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"])
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"opsconductor-client", "opsconductor-proto", "grpcio", "protobuf"} <= names
    assert not names & SERVER_ONLY, names & SERVER_ONLY


def test_opsctl_and_the_typed_client_work_there(client_venv: Path) -> None:
    """``opsctl --help`` runs, the typed client imports, and a dead server is one line."""
    helped = _run(
        [
            str(
                client_venv / "bin" / "opsctl",
            ),
            "--help",
        ]
    )
    assert helped.returncode == 0, helped.stderr
    assert "submit" in helped.stdout
    assert "shadow-report" in helped.stdout
    imported = _run(
        [
            str(client_venv / "bin" / "python"),
            "-c",
            "import sys, opsconductor.client as c; from opsconductor.contract import status_codes;"
            "assert 'opsconductor.common' not in sys.modules; print(c.ResourceBusyError.reason)",
        ]
    )
    assert imported.stdout.strip() == "RESOURCE_BUSY", imported.stderr
    dead = _run(
        [
            str(client_venv / "bin" / "opsctl"),
            "--api",
            "127.0.0.1:9",
            "--token",
            "t",
            "--tenant",
            "acme",
            "--timeout",
            "5",
            "queue",
            "stats",
        ],
        cwd=client_venv,
    )
    assert dead.returncode == 1
    assert dead.stdout == ""
    lines = dead.stderr.strip().splitlines()
    assert len(lines) == 1, dead.stderr
    assert lines[0].startswith("opsctl: error: cannot reach the service"), dead.stderr
