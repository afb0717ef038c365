"""The parts of ``opsctl`` that need no server: plan files, connection settings, development
tokens, flag assignments, the shadow comparison and exit codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest
from pydantic import SecretStr

from opsconductor.client.cli import exit_codes
from opsconductor.client.cli.config import ConfigError, resolve
from opsconductor.client.cli.dev_token import DevKeyError, mint_dev_token, read_dev_key
from opsconductor.client.cli.main import main
from opsconductor.client.cli.operations import parse_assignments
from opsconductor.client.cli.plan_file import PlanFileError, load_plan_file
from opsconductor.client.cli.shadow import Expected, ExpectedPlan, compare, load_expected
from opsconductor.client.models import Execution, ExecutionStep, FeatureFlags
from opsconductor.common.auth import TokenVerifier
from opsconductor.common.errors import AuthenticationError

# -- plan files -----------------------------------------------------------------------------

GOOD = """
name: restart web
sla_class: medium
steps:
  - id: s1
    action: noop
    action_class: read
    targets: ["host:web-01", {ref: "host:web-02", tags: {env: prod}}]
    params: {note: hi}
"""


def _write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_plan_file_becomes_the_plans_json_form(tmp_path: Path) -> None:
    """YAML → the plan's JSON form; a target may be its ref alone."""
    plan = load_plan_file(_write(tmp_path, GOOD))
    assert plan["sla_class"] == "medium"
    assert plan["steps"][0]["targets"] == [
        {"ref": "host:web-01"},
        {"ref": "host:web-02", "tags": {"env": "prod"}},
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nsteps: [}\n", "line 2, column 9: invalid YAML"),
        ("- just a list\n", "the file must hold one plan"),
        ("name: x\nsla_klass: fast\nsteps: []\n", "sla_klass: unknown field"),
        ("name: x\nsla_class: quick\nsteps: []\n", "sla_class: must be one of fast, medium, long"),
        ("name: x\nsteps: {}\n", "steps: must be a list of steps"),
        (
            "name: x\nsteps:\n  - {id: a, action: noop, targets: [{ref: 3}]}\n",
            "steps[0].targets[0].ref: must be a string",
        ),
        (
            "name: x\nsteps:\n  - {id: a, action: noop, action_class: delete, targets: []}\n",
            "steps[0].action_class: must be one of read, modify, deploy",
        ),
        (
            "name: x\nsteps:\n  - {id: a, action: noop, targets: [], params: {at: 2024-01-01}}\n",
            "steps[0].params: must hold JSON values only",
        ),
        ("steps: []\n", "name: is required"),
    ],
)
def test_a_bad_plan_file_names_the_field(tmp_path: Path, text: str, expected: str) -> None:
    """Each problem is one message naming the file and the field path."""
    path = _write(tmp_path, text)
    with pytest.raises(PlanFileError) as caught:
        load_plan_file(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_or_json_plan_file(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match="no such file"):
        load_plan_file(tmp_path / "nope.yaml")
    path = _write(tmp_path, '{"name": "x", "steps": [', "plan.json")
    with pytest.raises(PlanFileError, match="line 1, column 25: invalid JSON"):
        load_plan_file(path)


def test_opsctl_exits_2_for_a_bad_plan_file_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No server is contacted: the file is refused first, on one line of stderr."""
    path = _write(tmp_path, "name: x\nsteps:\n  - {id: a, action: noop, targets: 5}\n")
    code = main(["--tenant", "t", "--token", "x", "--api", "127.0.0.1:9", "submit", str(path)])
    err = capsys.readouterr().err
    assert code == exit_codes.USAGE
    assert err.strip().splitlines() == [
        f"opsctl: error: {path}: steps[0].targets: must be a list of targets"
    ]


# -- connection settings --------------------------------------------------------------------


def test_flags_beat_env_beat_context(tmp_path: Path) -> None:
    """The first of flag, environment, context, default wins, setting by setting."""
    config = tmp_path / "config.toml"
    token_file = tmp_path / "t.token"
    token_file.write_text("from-file\n")
    config.write_text(
        'current-context = "dev"\n'
        '[contexts.dev]\napi = "ctx:1"\ntenant = "ctx-tenant"\n'
        f'token-file = "{token_file}"\ntimeout = 7\n'
        '[contexts.prod]\napi = "prod:443"\nca-file = "/ca.crt"\n'
    )
    env = {"OPSC_TENANT": "env-tenant"}
    conn = resolve({"api": "flag:1"}, env, config_path=config)
    assert (conn.api, conn.tenant, conn.token, conn.timeout_s) == (
        "flag:1",
        "env-tenant",
        "from-file",
        7.0,
    )
    assert conn.context == "dev"
    assert conn.tls is None
    assert conn.approvals == "127.0.0.1:50053"
    prod = resolve({}, {"OPSC_CONTEXT": "prod"}, config_path=config)
    assert prod.api == "prod:443"
    assert prod.tls is not None
    assert prod.tls.ca_file == "/ca.crt"


@pytest.mark.parametrize(
    ("text", "context", "problem"),
    [
        ("current-context = 'x'\n[contexts.dev]\n", None, "no context 'x' (contexts: dev)"),
        ("[contexts.dev]\napi = 1\nbogus = 2\n", "dev", "unknown keys ['bogus']"),
        ("not toml = = \n", None, "is not valid TOML"),
    ],
)
def test_a_bad_config_is_one_clear_error(
    tmp_path: Path, text: str, context: str | None, problem: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        resolve({}, {}, config_path=config, context=context)
    assert problem in str(caught.value)


def test_no_config_file_and_no_token() -> None:
    conn = resolve({}, {}, config_path=Path("/nonexistent/config.toml"))
    with pytest.raises(ConfigError, match="no token"):
        conn.require_token()
    with pytest.raises(ConfigError, match="no tenant"):
        conn.require_tenant()
    with pytest.raises(ConfigError, match="timeout must be"):
        resolve({"timeout": "soon"}, {}, config_path=Path("/nonexistent"))


# -- development tokens ---------------------------------------------------------------------

KEY = b"0123456789abcdef0123456789abcdef-dev"


def test_a_minted_token_is_accepted_by_the_services_verifier() -> None:
    """The stdlib HS256 token carries the claims the services read."""
    verifier = TokenVerifier(audience="opsconductor-execution", hs256_key=SecretStr(KEY.decode()))
    principal = verifier.verify(mint_dev_token(KEY, actor="ann", tenant="acme", ttl_s=60))
    assert (principal.actor_id, principal.tenant_id) == ("ann", "acme")
    with pytest.raises(AuthenticationError):
        verifier.verify(mint_dev_token(b"x" * 40, actor="ann", tenant="acme", ttl_s=60))
    expired = mint_dev_token(KEY, actor="ann", tenant="acme", ttl_s=1, now=1_000_000)
    with pytest.raises(AuthenticationError):
        verifier.verify(expired)


def test_no_dev_key_no_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without the key file opsctl token refuses (exit 2) and says why."""
    with pytest.raises(DevKeyError, match="no development key"):
        read_dev_key(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_text("abc")
    with pytest.raises(DevKeyError, match="shorter than 32"):
        read_dev_key(short)
    code = main(["token", "--key-file", str(tmp_path / "missing.key")])
    assert code == exit_codes.USAGE
    assert "no development key" in capsys.readouterr().err
    good = tmp_path / "good.key"
    good.write_bytes(KEY + b"\n")
    assert main(["-o", "json", "token", "--key-file", str(good), "--tenant", "t1"]) == 0
    minted = json.loads(capsys.readouterr().out)
    assert minted["tenant"] == "t1"
    assert minted["token"].count(".") == 2


# -- flag assignments -----------------------------------------------------------------------

FLAGS = FeatureFlags(
    stage_e_enabled=True,
    all_tenants_enabled=False,
    enabled_tenants=("internal",),
    record_only_tenants=("internal",),
    max_approval_level=0,
    dispatch_paused=False,
)


def test_flag_assignments() -> None:
    changes = parse_assignments(
        (
            "stage_e_enabled=off",
            "enabled_tenants+=acme",
            "record_only_tenants-=internal",
            "max_approval_level=2",
        ),
        FLAGS,
    )
    assert changes == {
        "stage_e_enabled": False,
        "enabled_tenants": ["acme", "internal"],
        "record_only_tenants": [],
        "max_approval_level": 2,
    }
    assert parse_assignments(("enabled_tenants=b,a,a",), None) == {"enabled_tenants": ["a", "b"]}


@pytest.mark.parametrize(
    "text",
    ["stage_e_enabled=maybe", "max_approval_level=x", "bogus=1", "nonsense", "enabled_tenants+="],
)
def test_bad_flag_assignments(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_assignments((text,), FLAGS)


# -- shadow comparison ----------------------------------------------------------------------


def _execution(name: str, *, level: int = 0, steps: tuple[str, ...] = ("s1",)) -> Execution:
    now = datetime.now(UTC)
    return Execution(
        **{
            **{f: "" for f in ("execution_id", "tenant_id", "actor_id", "plan_hash")},
            "execution_id": f"id-{name}",
            "status": "succeeded",
            "execution_mode": "immediate",
            "sla_class": "fast",
            "approval_level": level,
            "approval_id": None,
            "plan_snapshot_hash": "",
            "idempotency_key": "",
            "job_id": None,
            "priority": 50,
            "timeout_policy_id": "fast_read",
            "timed_out": False,
            "duration_ms": 1,
            "estimated_duration_ms": 1,
            "cancelled_by": None,
            "cancel_reason": "",
            "error_class": "",
            "error_message": "",
            "result_summary": None,
            "worker_id": "",
            "lease_renewals": 0,
            "cancel_checks_performed": 0,
            "attempts": 1,
            "record_only": True,
            "deduplicated": False,
            "last_transition_by": "",
            "last_transition_from": "",
            "created_at": now,
            "started_at": now,
            "ended_at": now,
            "cancelled_at": None,
            "last_transition_at": now,
            "steps": tuple(
                ExecutionStep(s, i, "noop", "succeeded", 1, "", 1, None, "", "", now, now)
                for i, s in enumerate(steps)
            ),
            "plan": {
                "name": name,
                "steps": [{"id": s, "targets": [{"ref": "host:a"}]} for s in steps],
            },
        }
    )


def test_shadow_compare_reports_each_kind_of_mismatch() -> None:
    expected = Expected(
        plans={
            "ok": ExpectedPlan("ok", mode="immediate", approval_level=0, targets=("host:a",)),
            "level": ExpectedPlan("level", approval_level=1, steps=({"id": "s1"},)),
            "steps": ExpectedPlan("steps", steps=({"id": "s1"}, {"id": "s2", "action": "x"})),
            "absent": ExpectedPlan("absent"),
        }
    )
    recorded = [
        _execution("ok"),
        _execution("level"),
        _execution("steps", steps=("s1", "s2")),
        _execution("surprise"),
    ]
    report = compare(expected, recorded)
    assert report.matched == ["ok"]
    assert sorted(report.mismatches) == sorted(
        [
            "plan 'surprise': not expected, recorded as id-surprise",
            "plan 'level' execution id-level: approval_level 0, expected 1",
            "plan 'steps' execution id-steps: step s2 action 'noop', expected 'x'",
            "plan 'absent': expected, but no execution was recorded",
        ]
    )


def test_expected_file_errors_name_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "plans:\n  - name: a\n    approval_level: two\n", "expected.yaml")
    with pytest.raises(PlanFileError, match=r"plans\[0\]\.approval_level: must be of type int"):
        load_expected(path)
    path = _write(tmp_path, "plans:\n  - {name: a}\n  - {name: a}\n", "expected.yaml")
    with pytest.raises(PlanFileError, match="listed twice"):
        load_expected(path)
    good = _write(tmp_path, "tenant: t\nplans:\n  - {name: a, steps: [s1, {id: s2}]}\n", "e.yaml")
    loaded = load_expected(good)
    assert loaded.tenant == "t"
    assert loaded.plans["a"].steps == ({"id": "s1"}, {"id": "s2"})


def test_exit_codes_of_execution_statuses() -> None:
    assert exit_codes.for_execution("succeeded", timed_out=False) == 0
    assert exit_codes.for_execution("failed", timed_out=False) == 3
    assert exit_codes.for_execution("cancelled", timed_out=False) == 4
    assert exit_codes.for_execution("failed", timed_out=True) == 5
    assert exit_codes.for_execution("rejected", timed_out=False) == 6
    assert exit_codes.for_execution("running", timed_out=False) == 0
