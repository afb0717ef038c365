"""The Dockerfile's own rules, checked on its text (no Docker engine or hadolint runs here).

A target per service, each ending as a non-root user on a base image pinned by exact tag or
digest, installing only that service's packages (never the dev requirements, the tests, the
devstack or an editable install), and a build context limited by .dockerignore.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT

SERVICES = {"api": 50051, "worker": 50052, "approvals": 50053, "progress": 50054}
_PINNED = re.compile(r"^[\w./-]+(:\d+\.\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")
_DEV_TOOLS = re.compile(
    r"requirements/dev\.txt|pytest|ruff|mypy|hypothesis|coverage|import-linter|devstack"
    r"|grpcio-tools|(^|\s)\./tests|\s-e\s|--editable",
)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> list[Stage]:
    """Stages with their instructions (continuation lines joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert match, line
            stages.append(Stage(match.group(2) or str(len(stages)), match.group(1)))
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {s.name: s for s in parse((ROOT / "Dockerfile").read_text())}


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and its ancestors, the stage first."""
    result = [stages[name]]
    while result[-1].base in stages:
        result.append(stages[result[-1].base])
    return result


def test_there_is_one_target_per_service(stages: dict[str, Stage]) -> None:
    assert set(SERVICES) <= set(stages)


def test_every_external_base_image_is_pinned_by_exact_tag_or_digest(
    stages: dict[str, Stage],
) -> None:
    external = {s.base for s in stages.values() if s.base not in stages}
    assert external
    for image in external:
        assert _PINNED.match(image), image
        assert ":" in image.split("/")[-1] or "@sha256:" in image, f"{image}: no tag or digest"
        assert not image.endswith((":latest", ":slim")), image


@pytest.mark.parametrize("service", SERVICES)
def test_each_target_runs_its_service_as_a_non_root_user(
    stages: dict[str, Stage], service: str
) -> None:
    users = [
        arg
        for stage in reversed(chain(stages, service))
        for k, arg in stage.instructions
        if k == "USER"
    ]
    assert users, f"{service}: no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, service
    assert user.isdigit()  # numeric, so Kubernetes' runAsNonRoot can verify it
    cmd = [arg for k, arg in stages[service].instructions if k == "CMD"]
    assert cmd == [f'["python", "-m", "opsconductor.{service}"]']
    exposed = " ".join(arg for k, arg in stages[service].instructions if k == "EXPOSE").split()
    assert str(SERVICES[service]) in exposed


@pytest.mark.parametrize("service", SERVICES)
def test_each_target_gets_only_its_own_virtualenv(stages: dict[str, Stage], service: str) -> None:
    copies = [arg for k, arg in stages[service].instructions if k == "COPY"]
    assert copies == [f"--from=build-{service} /opt/venv /opt/venv"]
    installs = " ".join(arg for k, arg in stages[f"build-{service}"].instructions if k == "RUN")
    assert f"./services/{service}" in installs
    assert "-c requirements/constraints.txt" in installs
    others = set(SERVICES) - {service}
    assert not [o for o in others if f"./services/{o}" in installs], service


def test_nothing_of_the_development_tooling_is_installed_or_copied(
    stages: dict[str, Stage],
) -> None:
    for stage in stages.values():
        for keyword, arg in stage.instructions:
            if keyword in {"RUN", "COPY", "ADD"}:
                assert not _DEV_TOOLS.search(arg), f"{stage.name}: {keyword} {arg}"
            if keyword == "RUN" and "apt-get install" in arg:
                assert "--no-install-recommends" in arg
                packages = arg.split("--no-install-recommends", 1)[1].split("&&")[0].split()
                assert all("=" in p for p in packages), f"unpinned apt package in {arg}"
    dev = {
        line.strip().lower()
        for line in (ROOT / "requirements/dev.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for folder in (
        "libs/proto",
        "libs/common",
        "libs/lifecycle",
        "libs/actions",
        "libs/policy",
        "libs/rpc",
        "libs/client",
        *(f"services/{s}" for s in SERVICES),
    ):
        project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
        names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
        assert not names & dev, f"{folder} depends on dev tools {names & dev}"


def test_the_build_context_is_deny_by_default_and_covers_every_copy(
    stages: dict[str, Stage],
) -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for stage in stages.values():
        for keyword, arg in stage.instructions:
            if keyword == "COPY" and not arg.startswith("--from="):
                source = arg.split()[0]
                assert any(source == a or source.startswith(a + "/") for a in allowed), source
                assert (ROOT / source).exists(), source
    for secret_like in ("**/.env", "**/*.key", "**/*.pem"):
        assert secret_like in ignore


def test_the_images_match_the_kubernetes_settings(stages: dict[str, Stage]) -> None:
    env = " ".join(arg for k, arg in stages["runtime"].instructions if k == "ENV")
    assert "OPSC_MIGRATIONS_DIR=/app/migrations" in env
    copies = [arg for k, arg in stages["runtime"].instructions if k == "COPY"]
    assert "migrations /app/migrations" in copies
    assert Path(ROOT / "migrations").is_dir()
