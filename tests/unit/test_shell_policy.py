"""The ``shell`` section of the tenant policy: parsing, and what it refuses in a step."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from opsconductor.actions.base import ActionContext
from opsconductor.actions.registry import default_registry
from opsconductor.actions.shell import ShellAction
from opsconductor.common.errors import FieldViolation
from opsconductor.common.plan import parse_plan
from opsconductor.common.tenant_policy import (
    ShellPolicy,
    TenantPolicies,
    TenantPolicy,
    TenantPolicyDeniedError,
    TenantPolicyError,
    is_interpreter,
    is_worker_variable,
)
from opsconductor.policy.enforcement import plan_policy_violations


def test_shell_is_off_by_default_for_every_tenant() -> None:
    shell = TenantPolicies.load().for_tenant("anyone").shell
    assert not shell.enabled
    assert shell.executables == ()
    assert not shell.allow_interpreters
    assert not shell.network
    assert [v.field for v in shell.step_violations("/usr/bin/true", [])] == ["params"]


def test_a_tenant_override_enables_shell_for_that_tenant_only() -> None:
    policies = TenantPolicies.from_document(
        {
            "defaults": {"shell": {"cpu_s": 5}},
            "tenants": {"acme": {"shell": {"enabled": True, "executables": ["/usr/bin/uptime"]}}},
        }
    )
    acme = policies.for_tenant("acme").shell
    assert acme.enabled
    assert acme.executables == ("/usr/bin/uptime",)
    assert acme.cpu_s == 5  # merged over the defaults
    assert acme.memory_bytes == 512 * 1024 * 1024
    assert acme.max_file_bytes == 16 * 1024 * 1024
    assert not policies.for_tenant("other").shell.enabled
    assert acme.step_violations("/usr/bin/uptime", []) == []


@pytest.mark.parametrize(
    ("shell", "error"),
    [
        ({"executables": ["uptime"]}, "not a normalised absolute path"),
        ({"executables": ["/usr/bin/../bin/sh"]}, "not a normalised absolute path"),
        ({"executables": ["/usr/bin/"]}, "not a normalised absolute path"),
        ({"executables": ["/bin/bash"]}, "set allow_interpreters"),
        ({"executables": ["/usr/bin/python3.11"]}, "set allow_interpreters"),
        ({"executables": ["/usr/bin/env"]}, "set allow_interpreters"),
        ({"env_allow": ["DATABASE_URL"]}, "not a variable steps may receive"),
        ({"env_allow": ["OPSC_JWT_HS256_KEY"]}, "not a variable steps may receive"),
        ({"env_allow": ["bad name"]}, "not a variable steps may receive"),
        ({"cpu_s": 0}, "cpu_s"),
        ({"memory_mb": 1}, "memory_mb"),
        ({"max_processes": 0}, "max_processes"),
        ({"network": "sometimes"}, "network"),
        ({"shell": True}, "shell.shell"),
    ],
)
def test_invalid_shell_sections_are_load_errors(shell: dict[str, Any], error: str) -> None:
    with pytest.raises(TenantPolicyError, match=error):
        TenantPolicies.from_document({"tenants": {"acme": {"shell": shell}}})


def test_interpreters_may_be_listed_when_allowed() -> None:
    shell = ShellPolicy(enabled=True, executables=("/bin/sh",), allow_interpreters=True)
    assert shell.step_violations("/bin/sh", []) == []


@pytest.mark.parametrize(
    "path",
    [
        "/bin/sh",
        "/usr/bin/bash",
        "/usr/bin/dash",
        "/usr/bin/python3",
        "/opt/py/bin/python3.12",
        "/usr/bin/perl",
        "/usr/bin/env",
        "/usr/bin/xargs",
        "/usr/bin/busybox",
        "/usr/bin/awk",
    ],
)
def test_interpreters_and_launchers_are_recognised(path: str) -> None:
    assert is_interpreter(path)


@pytest.mark.parametrize("path", ["/usr/bin/uptime", "/usr/bin/systemctl", "/usr/bin/df"])
def test_ordinary_programs_are_not_interpreters(path: str) -> None:
    assert not is_interpreter(path)


def test_a_symlink_to_an_interpreter_is_one(tmp_path: Any) -> None:
    link = tmp_path / "innocent-tool"
    link.symlink_to("/usr/bin/bash")
    assert is_interpreter(str(link))


def test_worker_variables_are_recognised() -> None:
    for name in ("DATABASE_URL", "redis_url", "OPSC_ANYTHING", "OPSC_DATABASE_URL"):
        assert is_worker_variable(name)
    assert not is_worker_variable("LANG")


def test_step_violations_name_paths_and_settings_never_values() -> None:
    shell = ShellPolicy(enabled=True, executables=("/usr/bin/uptime",), env_allow=("TZ_X",))
    found = shell.step_violations("/usr/bin/secret-tool", ["TZ_X", "MY_TOKEN"], path="p")
    assert [v.field for v in found] == ["p.argv[0]", "p.env_allow[1]"]
    assert "shell.executables" in found[0].description
    assert "shell.env_allow" in found[1].description
    assert all(
        "secret-tool" not in v.description and "MY_TOKEN" not in v.description for v in found
    )


def test_an_interpreter_behind_an_allow_listed_name_is_refused(tmp_path: Any) -> None:
    """A listed path that resolves to bash (checked again where the step runs) is refused."""
    link = tmp_path / "report"
    link.symlink_to("/usr/bin/bash")
    shell = ShellPolicy.model_construct(
        enabled=True, executables=(str(link),), allow_interpreters=False, env_allow=()
    )
    [violation] = shell.step_violations(str(link), [])
    assert "shell.allow_interpreters" in violation.description


def test_no_argv_leaves_the_argv_check_to_validation() -> None:
    shell = ShellPolicy(enabled=True)
    assert shell.step_violations(None, []) == []


def _plan(*steps: Mapping[str, Any]) -> Any:
    return parse_plan(
        {
            "name": "p",
            "sla_class": "fast",
            "steps": [
                {
                    "id": f"s{i}",
                    "action_class": "modify",
                    "targets": [{"ref": f"h{i}"}],
                    **step,
                }
                for i, step in enumerate(steps)
            ],
        }
    )


def test_plan_violations_are_prefixed_by_step_and_skip_other_actions() -> None:
    plan = _plan(
        {"action": "noop", "params": {}},
        {"action": "shell", "params": {"argv": ["/bin/sh", "-c", "id"]}},
    )
    policy = TenantPolicy(shell=ShellPolicy(enabled=True, executables=("/usr/bin/id",)))
    found = plan_policy_violations(default_registry(), plan, policy)
    assert [v.field for v in found] == ["steps[1].params.argv[0]"]


class _Broken:
    name = "shell"

    def policy_violations(self, params: Mapping[str, Any], policy: TenantPolicy) -> list[Any]:
        raise RuntimeError("plugin bug")


class _Lookup:
    def get(self, name: str) -> Any:
        return _Broken()


def test_a_policy_check_that_crashes_refuses() -> None:
    plan = _plan({"action": "shell", "params": {"argv": ["/usr/bin/id"]}})
    found = plan_policy_violations(_Lookup(), plan, TenantPolicy())
    assert found == [FieldViolation("steps[0].params", "could not be checked against the policy")]


async def test_the_action_itself_refuses_what_its_context_policy_forbids() -> None:
    """Last line: even called directly, ``shell`` runs nothing its tenant may not run."""
    context = ActionContext(
        execution_id="e",
        step_id="s",
        idempotency_key="e:s",
        tenant_id="t",
        targets=(),
        params={"argv": ["/usr/bin/id"]},
        timeout_s=5,
        record_only=True,  # even a dry run is refused
        cancel_event=asyncio.Event(),
    )
    with pytest.raises(TenantPolicyDeniedError, match=r"params: the shell action is disabled"):
        await ShellAction().run(context)
    assert context.tenant_policy == TenantPolicy()  # the default is the strictest


@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "GCONV_PATH", "ld_audit"])
def test_loader_variables_cannot_be_set(name: str) -> None:
    violations = ShellAction().validate({"argv": ["/usr/bin/id"], "env": {name: "/tmp/x.so"}})
    assert [v.field for v in violations] == [f"params.env.{name}"]
