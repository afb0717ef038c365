"""The runbooks as documents: each names its alert, is indexed, and its blocks are well-formed;
the cluster commands name objects the production overlay really has.

``tests/e2e/test_runbooks.py`` runs the ``console`` commands against a live stack.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from .runbooks import ALERTS, RUNBOOKS, alert_line, blocks, console_commands, runbook_names

#: What a console command may start with: the tools an operator's machine has.
TOOLS = {"opsctl", "psql", "echo", "python", "redis-cli", "openssl", "cd", "export"}
_KUBECTL_OBJECT = re.compile(r"\b(deployment|cronjob|hpa)/([a-z0-9-]+)")
_KINDS = {"deployment": "Deployment", "cronjob": "CronJob", "hpa": "HorizontalPodAutoscaler"}


def _secret_names(node: object) -> Iterator[str]:
    """Every Secret a rendered object refers to (env secretKeyRef, secret volumes)."""
    if isinstance(node, dict):
        if isinstance(node.get("secretKeyRef"), dict):
            yield node["secretKeyRef"]["name"]
        if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
            yield node["secret"]["secretName"]
        for value in node.values():
            yield from _secret_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _secret_names(value)


def test_the_issue_13_runbooks_exist() -> None:
    assert set(runbook_names()) == {
        "restart-worker",
        "drain-queue",
        "dlq",
        "rotate-jwt-keys",
        "execution-stuck",
        "stale-lock",
        "redis-outage",
        "postgres-failover",
        "rbac-violation-burst",
        "secret-leak",
        "service-down",
        "queue-backlog",
        "rollback",
    }


@pytest.mark.parametrize(("alert", "runbook"), sorted(ALERTS.items()))
def test_each_alert_leads_to_its_runbook(alert: str, runbook: str) -> None:
    assert f"`{alert}`" in alert_line(runbook)
    index = (RUNBOOKS / "README.md").read_text()
    assert re.search(rf"\[{runbook}\]\({runbook}\.md\) \| \w+ \| [^\n]*`{alert}`", index)


@pytest.mark.parametrize("runbook", runbook_names())
def test_each_runbook_is_indexed_names_its_alert_and_has_commands(runbook: str) -> None:
    alert_line(runbook)  # present, even when the answer is "none of its own"
    assert f"]({runbook}.md)" in (RUNBOOKS / "README.md").read_text()
    found = blocks(runbook)
    assert {b.language for b in found} <= {"console", "bash"}, runbook
    assert console_commands(runbook), f"{runbook}: nothing an operator can run locally"


@pytest.mark.parametrize("runbook", runbook_names())
def test_console_commands_use_the_operators_tools(runbook: str) -> None:
    for command in console_commands(runbook):
        words = shlex.split(command.replace("\\\n", " "), comments=True)
        first = next(w for w in words if "=" not in w or w.startswith("-"))
        assert first in TOOLS, f"{runbook}: {command}"
        if first == "psql" or "| psql" in command:
            assert '"$DATABASE_URL"' in command, command
            assert "-X" in command, command


@pytest.mark.parametrize("runbook", runbook_names())
def test_cluster_blocks_are_valid_bash(runbook: str) -> None:
    for block in blocks(runbook):
        if block.language == "bash":
            result = subprocess.run(
                ["bash", "-n"], input=block.text, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, f"{runbook}:{block.line}: {result.stderr}"


def test_cluster_commands_name_objects_of_the_production_overlay(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    prod = {(o["kind"], o["metadata"]["name"]) for o in rendered["prod"]}
    secrets = set(_secret_names([*rendered["prod"], *rendered["dev"]]))
    seen = 0
    for runbook in runbook_names():
        for block in blocks(runbook):
            if block.language != "bash":
                continue
            for kind, name in _KUBECTL_OBJECT.findall(block.text):
                assert (_KINDS[kind], name) in prod, f"{runbook}:{block.line}: {kind}/{name}"
                seen += 1
            for name in re.findall(r"create secret generic \"?([\w$-]+)", block.text):
                if not name.startswith("$"):
                    assert name in secrets, f"{runbook}:{block.line}: secret {name}"
    assert seen > 10
