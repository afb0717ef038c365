"""Secret references: syntax checks at submit, just-in-time resolution, masking, no leaks."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from opsconductor.common.errors import PlanValidationError, SecretResolutionError
from opsconductor.common.masking import REDACTED, mask_text
from opsconductor.common.plan import SecretRef
from opsconductor.common.secrets import (
    DEFAULT_ENV_PREFIX,
    DEFAULT_FILE_ROOT,
    EnvSecretProvider,
    FileSecretProvider,
    SecretProvider,
    SecretResolver,
    SecretsSettings,
    find_secret_refs,
    is_secret_ref,
    secret_ref_violations,
)


def _value(label: str) -> str:
    return f"{label}-{secrets.token_hex(10)}"


def _leaks(exc: BaseException, value: str) -> bool:
    texts = [str(exc), repr(exc), repr(getattr(exc, "details", {})), repr(exc.args)]
    return any(value in text for text in texts)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets-root"
    directory.mkdir()
    return directory


def test_env_reference_resolves_the_prefixed_variable_and_masks_it() -> None:
    value = _value("env")
    resolver = SecretResolver([EnvSecretProvider({"OPSC_SECRET_DB_PASSWORD": value})])
    resolved, values = resolver.resolve_params(
        {"headers": {"Authorization": {"$secret": "env:DB_PASSWORD"}}, "n": 1}
    )
    assert resolved == {"headers": {"Authorization": value}, "n": 1}
    assert values == [value]
    assert mask_text(f"the value is {value}!") == f"the value is {REDACTED}!"


def test_env_provider_reads_the_live_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    value = _value("live")
    monkeypatch.setenv(f"{DEFAULT_ENV_PREFIX}LIVE_TOKEN", value)
    assert EnvSecretProvider().fetch(SecretRef("env", "LIVE_TOKEN")) == value


def test_env_reference_cannot_reach_unprefixed_worker_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan naming the worker's own DATABASE_URL gets nothing: only the prefix is readable."""
    value = _value("dsn")
    monkeypatch.setenv("DATABASE_URL", value)
    resolver = SecretResolver([EnvSecretProvider()])
    with pytest.raises(SecretResolutionError) as info:
        resolver.resolve_params({"x": {"$secret": "env:DATABASE_URL"}})
    assert info.value.reason == "SECRET_UNRESOLVED"
    assert "env:DATABASE_URL" in str(info.value)
    assert info.value.details == {"secret_ref": "env:DATABASE_URL", "field": "params.x"}
    assert not _leaks(info.value, value)


def test_file_reference_resolves_and_strips_one_trailing_newline(root: Path) -> None:
    value = _value("file")
    (root / "db_password").write_text(value + "\n")
    (root / "crlf").write_text(value + "\r\n")
    resolver = SecretResolver([FileSecretProvider(root)])
    resolved, values = resolver.resolve_params(
        {"env": {"A": {"$secret": "file:db_password"}, "B": {"$secret": "file:crlf"}}}
    )
    assert resolved == {"env": {"A": value, "B": value}}
    assert values == [value]  # each distinct value once
    assert value not in mask_text(f"x{value}x")


@pytest.mark.parametrize("name", ["../outside", "/etc/hostname", "sub/../../outside"])
def test_file_provider_refuses_paths_outside_its_root(root: Path, name: str) -> None:
    (root.parent / "outside").write_text("not-for-plans")
    provider = FileSecretProvider(root)
    with pytest.raises(SecretResolutionError) as info:
        provider.fetch(SecretRef("file", name))
    assert "not-for-plans" not in str(info.value)
    assert f"file:{name}" in str(info.value)


def test_file_provider_refuses_a_symlink_pointing_outside_its_root(root: Path) -> None:
    outside = root.parent / "elsewhere"
    outside.write_text("outside-value")
    (root / "link").symlink_to(outside)
    with pytest.raises(SecretResolutionError, match="outside the secrets root"):
        FileSecretProvider(root).fetch(SecretRef("file", "link"))


def test_file_provider_follows_a_symlink_that_stays_inside(root: Path) -> None:
    """Kubernetes Secret volumes are symlinks into a ..data directory of the same root."""
    (root / "..data").mkdir()
    (root / "..data" / "token").write_text("inside-value")
    (root / "token").symlink_to(root / "..data" / "token")
    assert FileSecretProvider(root).fetch(SecretRef("file", "token")) == "inside-value"


def test_file_provider_errors_name_the_reference_only(root: Path) -> None:
    (root / "dir").mkdir()
    (root / "binary").write_bytes(b"\xff\xfe secret-bytes")
    (root / "huge").write_bytes(b"a" * (64 * 1024 + 1))
    provider = FileSecretProvider(root)
    cases = {
        "missing": "no such file",
        "dir": "not a regular file",
        "binary": "not UTF-8",
        "huge": "larger than",
    }
    for name, why in cases.items():
        with pytest.raises(SecretResolutionError, match=why) as info:
            provider.fetch(SecretRef("file", name))
        assert info.value.details == {"secret_ref": f"file:{name}"}
        assert "secret-bytes" not in str(info.value)
        assert info.value.__cause__ is None or "secret-bytes" not in str(info.value.__cause__)


def test_unreadable_file_is_reported(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read error (permissions, I/O) is a resolution error, whoever runs the tests."""
    (root / "locked").write_text("locked-value")

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(SecretResolutionError, match="cannot be read"):
        FileSecretProvider(root).fetch(SecretRef("file", "locked"))


def test_nested_lists_and_dicts_are_walked_and_other_values_kept() -> None:
    a, b = _value("a"), _value("b")
    resolver = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_A": a, "OPSC_SECRET_B": b}, prefix="OPSC_SECRET_")]
    )
    params = {
        "list": [{"$secret": "env:A"}, ["x", {"$secret": "env:B"}], 3, None],
        "tuple": ({"$secret": "env:A"},),
        "plain": {"k": "v", "flag": True},
    }
    resolved, values = resolver.resolve_params(params)
    assert resolved == {
        "list": [a, ["x", b], 3, None],
        "tuple": [a],
        "plain": {"k": "v", "flag": True},
    }
    assert values == [a, b]
    assert params["list"][0] == {"$secret": "env:A"}  # the input is not modified


def test_values_resolved_before_a_failure_are_still_masked() -> None:
    """Registration happens per value, so a half-resolved step cannot leak the first secret."""
    first = _value("first")
    resolver = SecretResolver([EnvSecretProvider({"OPSC_SECRET_FIRST": first})])
    with pytest.raises(SecretResolutionError) as info:
        resolver.resolve_params({"a": {"$secret": "env:FIRST"}, "b": {"$secret": "env:MISSING"}})
    assert info.value.details["field"] == "params.b"
    assert first not in mask_text(first)


def test_disabled_provider_empty_value_and_malformed_reference_fail() -> None:
    resolver = SecretResolver([EnvSecretProvider({"OPSC_SECRET_EMPTY": ""})])
    assert resolver.provider_names == frozenset({"env"})
    with pytest.raises(SecretResolutionError, match="not enabled"):
        resolver.resolve_params({"x": {"$secret": "file:anything"}})
    with pytest.raises(SecretResolutionError, match="empty"):
        resolver.resolve_params({"x": {"$secret": "env:EMPTY"}})
    # Params that bypassed plan validation (a forged request) are still checked.
    with pytest.raises(SecretResolutionError, match="malformed") as info:
        resolver.resolve_params({"x": {"$secret": "vault:kv/db", "extra": 1}})
    assert info.value.details == {"field": "params.x"}


def test_resolve_one_reference() -> None:
    resolver = SecretResolver([EnvSecretProvider({"OPSC_SECRET_ONE": "one-value"})])
    assert resolver.resolve(SecretRef("env", "ONE")) == "one-value"


def test_find_secret_refs_lists_references_with_their_paths() -> None:
    params = {
        "headers": {"Authorization": {"$secret": "env:TOKEN"}},
        "env": [{"X": {"$secret": "file:db_password"}}],
        "plain": "text",
    }
    assert find_secret_refs(params) == [
        ("params.headers.Authorization", SecretRef("env", "TOKEN")),
        ("params.env[0].X", SecretRef("file", "db_password")),
    ]
    assert find_secret_refs({"a": 1}) == []


def test_malformed_references_are_field_violations_without_values() -> None:
    params = {
        "a": {"$secret": "env:DB", "other": "leak-me-not"},
        "b": {"$secret": "nope:X"},
        "c": [{"$secret": 42}],
        "d": {"$secret": "file:../etc/passwd"},
    }
    violations = secret_ref_violations(params)
    assert [v.field for v in violations] == ["params.a", "params.b", "params.c[0]", "params.d"]
    assert all("leak-me-not" not in v.description for v in violations)
    with pytest.raises(PlanValidationError) as info:
        find_secret_refs(params)
    assert len(info.value.violations) == 4
    assert secret_ref_violations({"$secret": "env:X"}, path="") == []


def test_is_secret_ref_is_about_shape() -> None:
    assert is_secret_ref({"$secret": "env:X"})
    assert is_secret_ref({"$secret": "bad", "more": 1})
    assert not is_secret_ref({"secret": "env:X"})
    assert not is_secret_ref("env:X")


def test_settings_configure_the_providers(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    assert SecretsSettings().file_root == DEFAULT_FILE_ROOT
    (root / "api_token").write_text("from-file-value")
    monkeypatch.setenv("OPSC_SECRETS_FILE_ROOT", str(root))
    monkeypatch.setenv("OPSC_SECRETS_ENV_PREFIX", "MY_")
    monkeypatch.setenv("MY_TOKEN", "from-env-value")
    resolver = SecretResolver.from_settings(SecretsSettings())
    resolved, _ = resolver.resolve_params(
        {"a": {"$secret": "file:api_token"}, "b": {"$secret": "env:TOKEN"}}
    )
    assert resolved == {"a": "from-file-value", "b": "from-env-value"}
    monkeypatch.setenv("OPSC_SECRETS_PROVIDERS", '["env"]')
    only_env = SecretResolver.from_settings(SecretsSettings())
    assert only_env.provider_names == frozenset({"env"})
    with pytest.raises(SecretResolutionError, match="not enabled"):
        only_env.resolve_params({"a": {"$secret": "file:api_token"}})


def test_providers_satisfy_the_protocol(root: Path) -> None:
    assert isinstance(EnvSecretProvider({}), SecretProvider)
    assert isinstance(FileSecretProvider(root), SecretProvider)
