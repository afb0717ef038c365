"""Secret references: syntax checks at submit, just-in-time resolution inside the submitting
tenant's namespace and the catalogue's allowed uses, masking, no leaks, no existence oracle."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from opsconductor.common.errors import PlanValidationError, SecretResolutionError
from opsconductor.common.masking import REDACTED, mask_text
from opsconductor.common.plan import SecretRef
from opsconductor.common.secret_catalogue import SecretCatalogue
from opsconductor.common.secrets import (
    DEFAULT_ENV_PREFIX,
    DEFAULT_FILE_ROOT,
    EnvSecretProvider,
    FileSecretProvider,
    SecretProvider,
    SecretResolver,
    SecretsSettings,
    SecretUnavailable,
    SecretUse,
    find_secret_refs,
    is_secret_ref,
    secret_ref_violations,
)

ACME = SecretUse("acme", "probe")


def _value(label: str) -> str:
    return f"{label}-{secrets.token_hex(10)}"


def _leaks(exc: BaseException, value: str) -> bool:
    texts = [str(exc), repr(exc), repr(getattr(exc, "details", {})), repr(exc.args)]
    return any(value in text for text in texts)


def catalogue(tenants: dict[str, list[str]], action: str = "probe") -> SecretCatalogue:
    """Each tenant may give each of its listed references to ``action``."""
    return SecretCatalogue.from_document(
        {
            "tenants": {
                t: {ref: {"actions": [action]} for ref in refs} for t, refs in tenants.items()
            }
        }
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets-root"
    (directory / "acme").mkdir(parents=True)
    return directory


def test_env_reference_resolves_the_tenants_variable_and_masks_it() -> None:
    value = _value("env")
    resolver = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_ACME__DB_PASSWORD": value})],
        catalogue({"acme": ["env:DB_PASSWORD"]}),
    )
    resolved, values = resolver.resolve_params(
        {"headers": {"Authorization": {"$secret": "env:DB_PASSWORD"}}, "n": 1}, ACME
    )
    assert resolved == {"headers": {"Authorization": value}, "n": 1}
    assert values == [value]
    assert mask_text(f"the value is {value}!") == f"the value is {REDACTED}!"


def test_tenant_a_cannot_resolve_tenant_bs_env_secret() -> None:
    """The attack of issue 8 finding 2: B's variable exists, A names it; A gets nothing, and
    the answer reads exactly like a secret that does not exist at all."""
    b_value = _value("tenant-b")
    environ = {"OPSC_SECRET_BETA__DB_PASSWORD": b_value, "OPSC_SECRET_DB_PASSWORD": b_value}
    resolver = SecretResolver(
        [EnvSecretProvider(environ)],
        catalogue(
            {"acme": ["env:DB_PASSWORD", "env:BETA__DB_PASSWORD"], "beta": ["env:DB_PASSWORD"]}
        ),
    )
    answers = []
    for name in ("DB_PASSWORD", "BETA__DB_PASSWORD"):
        with pytest.raises(SecretResolutionError) as info:
            resolver.resolve_params({"x": {"$secret": f"env:{name}"}}, ACME)
        assert not _leaks(info.value, b_value)
        answers.append(str(info.value).replace(name, "NAME"))
    with pytest.raises(SecretResolutionError) as missing:
        resolver.resolve_params({"x": {"$secret": "env:NEVER_SET"}}, ACME)
    assert answers == [str(missing.value).replace("NEVER_SET", "NAME")] * 2
    resolved, _ = resolver.resolve_params(
        {"x": {"$secret": "env:DB_PASSWORD"}}, SecretUse("beta", "probe")
    )
    assert resolved == {"x": b_value}


def test_tenant_a_cannot_resolve_tenant_bs_file_secret(root: Path) -> None:
    (root / "beta").mkdir()
    b_value = _value("tenant-b-file")
    (root / "beta" / "token").write_text(b_value)
    (root / "token").write_text(b_value)  # a pre-namespace layout must not be served either
    (root / "acme" / "via-link").symlink_to(root / "beta" / "token")
    resolver = SecretResolver(
        [FileSecretProvider(root)], catalogue({"acme": ["file:token", "file:via-link"]})
    )
    for name in ("token", "via-link"):
        with pytest.raises(SecretResolutionError) as info:
            resolver.resolve_params({"x": {"$secret": f"file:{name}"}}, ACME)
        assert not _leaks(info.value, b_value)
        assert "not available" in str(info.value)


def test_not_set_and_not_allowed_read_exactly_the_same() -> None:
    value = _value("set")
    resolver = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_ACME__SET_BUT_NOT_ALLOWED": value})],
        catalogue({"acme": ["env:ALLOWED_BUT_NOT_SET"]}),
    )
    texts = []
    for name in ("SET_BUT_NOT_ALLOWED", "ALLOWED_BUT_NOT_SET", "NEITHER"):
        with pytest.raises(SecretResolutionError) as info:
            resolver.resolve_params({"x": {"$secret": f"env:{name}"}}, ACME)
        texts.append((str(info.value).replace(name, "N"), info.value.reason))
        assert info.value.details == {"secret_ref": f"env:{name}", "field": "params.x"}
    assert len(set(texts)) == 1
    # another action than the one catalogued: the same words again
    with pytest.raises(SecretResolutionError) as other:
        resolver.resolve_params(
            {"x": {"$secret": "env:ALLOWED_BUT_NOT_SET"}}, SecretUse("acme", "noop")
        )
    assert (str(other.value).replace("ALLOWED_BUT_NOT_SET", "N"), other.value.reason) == texts[0]


def test_env_provider_reads_the_live_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    value = _value("live")
    monkeypatch.setenv(f"{DEFAULT_ENV_PREFIX}TEAM_A_PROD__LIVE_TOKEN", value)
    provider = EnvSecretProvider()
    assert provider.fetch("team-a.prod", SecretRef("env", "LIVE_TOKEN")) == value
    assert provider.variable("a--b", SecretRef("env", "X")) is None
    with pytest.raises(SecretUnavailable, match="no environment namespace"):
        provider.fetch("a--b", SecretRef("env", "LIVE_TOKEN"))


def test_env_reference_cannot_reach_unprefixed_worker_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan naming the worker's own DATABASE_URL gets nothing: only the prefix is readable."""
    value = _value("dsn")
    monkeypatch.setenv("DATABASE_URL", value)
    resolver = SecretResolver([EnvSecretProvider()], catalogue({"acme": ["env:DATABASE_URL"]}))
    with pytest.raises(SecretResolutionError) as info:
        resolver.resolve_params({"x": {"$secret": "env:DATABASE_URL"}}, ACME)
    assert info.value.reason == "SECRET_UNRESOLVED"
    assert "env:DATABASE_URL" in str(info.value)
    assert info.value.details == {"secret_ref": "env:DATABASE_URL", "field": "params.x"}
    assert not _leaks(info.value, value)


def test_file_reference_resolves_and_strips_one_trailing_newline(root: Path) -> None:
    value = _value("file")
    (root / "acme" / "db_password").write_text(value + "\n")
    (root / "acme" / "crlf").write_text(value + "\r\n")
    resolver = SecretResolver(
        [FileSecretProvider(root)], catalogue({"acme": ["file:db_password", "file:crlf"]})
    )
    resolved, values = resolver.resolve_params(
        {"env": {"A": {"$secret": "file:db_password"}, "B": {"$secret": "file:crlf"}}}, ACME
    )
    assert resolved == {"env": {"A": value, "B": value}}
    assert values == [value]  # each distinct value once
    assert value not in mask_text(f"x{value}x")


@pytest.mark.parametrize("name", ["../outside", "/etc/hostname", "sub/../../outside"])
def test_file_provider_refuses_paths_outside_the_tenant_folder(root: Path, name: str) -> None:
    (root / "outside").write_text("not-for-plans")
    with pytest.raises(SecretUnavailable) as info:
        FileSecretProvider(root).fetch("acme", SecretRef("file", name))
    assert "not-for-plans" not in str(info.value)


@pytest.mark.parametrize("tenant", ["..", "a/b", ""])
def test_file_provider_refuses_tenant_ids_that_are_not_folder_names(
    root: Path, tenant: str
) -> None:
    with pytest.raises(SecretUnavailable, match="not a directory name"):
        FileSecretProvider(root).fetch(tenant, SecretRef("file", "x"))


def test_file_provider_refuses_a_symlink_pointing_outside_the_tenant_folder(root: Path) -> None:
    outside = root.parent / "elsewhere"
    outside.write_text("outside-value")
    (root / "acme" / "link").symlink_to(outside)
    with pytest.raises(SecretUnavailable, match="leaves the tenant"):
        FileSecretProvider(root).fetch("acme", SecretRef("file", "link"))


def test_file_provider_refuses_a_tenant_folder_that_is_a_symlink_elsewhere(root: Path) -> None:
    elsewhere = root.parent / "other-root"
    elsewhere.mkdir()
    (elsewhere / "token").write_text("elsewhere-value")
    (root / "linked").symlink_to(elsewhere)
    with pytest.raises(SecretUnavailable, match="leaves the tenant"):
        FileSecretProvider(root).fetch("linked", SecretRef("file", "token"))


def test_file_provider_follows_a_symlink_that_stays_inside(root: Path) -> None:
    """Kubernetes Secret volumes are symlinks into a ..data directory of the same folder."""
    (root / "acme" / "..data").mkdir()
    (root / "acme" / "..data" / "token").write_text("inside-value")
    (root / "acme" / "token").symlink_to(root / "acme" / "..data" / "token")
    assert FileSecretProvider(root).fetch("acme", SecretRef("file", "token")) == "inside-value"


def test_file_provider_errors_never_quote_the_bytes(root: Path) -> None:
    (root / "acme" / "dir").mkdir()
    (root / "acme" / "binary").write_bytes(b"\xff\xfe secret-bytes \xc3\xa9t\xe9")
    (root / "acme" / "huge").write_bytes(b"a" * (64 * 1024 + 1))
    provider = FileSecretProvider(root)
    for name, why in {"missing": "no such file", "dir": "not a regular file"}.items():
        with pytest.raises(SecretUnavailable, match=why):
            provider.fetch("acme", SecretRef("file", name))
    for name, why in {"binary": "not UTF-8", "huge": "larger than"}.items():
        with pytest.raises(SecretResolutionError, match=why) as info:
            provider.fetch("acme", SecretRef("file", name))
        assert info.value.details == {"secret_ref": f"file:{name}"}
        assert "secret-bytes" not in str(info.value)
        assert info.value.__cause__ is None
        assert info.value.__context__ is None or "secret" not in str(info.value.__context__)


def test_unreadable_file_is_unavailable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read error (permissions, I/O) is a resolution error, whoever runs the tests."""
    (root / "acme" / "locked").write_text("locked-value")

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(SecretUnavailable, match="cannot be read"):
        FileSecretProvider(root).fetch("acme", SecretRef("file", "locked"))


def test_nested_lists_and_dicts_are_walked_and_other_values_kept() -> None:
    a, b = _value("a"), _value("b")
    resolver = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_ACME__A": a, "OPSC_SECRET_ACME__B": b})],
        catalogue({"acme": ["env:A", "env:B"]}),
    )
    params = {
        "list": [{"$secret": "env:A"}, ["x", {"$secret": "env:B"}], 3, None],
        "tuple": ({"$secret": "env:A"},),
        "plain": {"k": "v", "flag": True},
    }
    resolved, values = resolver.resolve_params(params, ACME)
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
    resolver = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_ACME__FIRST": first})],
        catalogue({"acme": ["env:FIRST", "env:MISSING"]}),
    )
    with pytest.raises(SecretResolutionError) as info:
        resolver.resolve_params(
            {"a": {"$secret": "env:FIRST"}, "b": {"$secret": "env:MISSING"}}, ACME
        )
    assert info.value.details["field"] == "params.b"
    assert first not in mask_text(first)


@pytest.mark.parametrize("value", ["", "Q", "Zq7#Wx!"])
def test_secrets_shorter_than_8_characters_are_refused_at_resolution(value: str) -> None:
    resolver = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_ACME__SHORT": value})], catalogue({"acme": ["env:SHORT"]})
    )
    with pytest.raises(SecretResolutionError, match="shorter than 8 characters") as info:
        resolver.resolve_params({"x": {"$secret": "env:SHORT"}}, ACME)
    assert info.value.details == {"secret_ref": "env:SHORT", "field": "params.x"}
    if value:
        assert not _leaks(info.value, value)
    resolver_ok = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_ACME__SHORT": "12345678"})],
        catalogue({"acme": ["env:SHORT"]}),
    )
    assert resolver_ok.resolve(ACME, SecretRef("env", "SHORT")) == "12345678"


def test_disabled_provider_and_malformed_reference_fail() -> None:
    resolver = SecretResolver(
        [EnvSecretProvider({})], catalogue({"acme": ["file:anything", "env:X"]})
    )
    assert resolver.provider_names == frozenset({"env"})
    with pytest.raises(SecretResolutionError, match="not available"):
        resolver.resolve_params({"x": {"$secret": "file:anything"}}, ACME)
    # Params that bypassed plan validation (a forged request) are still checked.
    with pytest.raises(SecretResolutionError, match="malformed") as info:
        resolver.resolve_params({"x": {"$secret": "vault:kv/db", "extra": 1}}, ACME)
    assert info.value.details == {"field": "params.x"}


def test_without_a_catalogue_no_secret_is_available() -> None:
    resolver = SecretResolver([EnvSecretProvider({"OPSC_SECRET_ACME__ONE": "one-value-long"})])
    assert resolver.catalogue.tenants == frozenset()
    with pytest.raises(SecretResolutionError, match="not available"):
        resolver.resolve(ACME, SecretRef("env", "ONE"))


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


def test_settings_configure_the_providers_and_the_catalogue(
    monkeypatch: pytest.MonkeyPatch, root: Path, tmp_path: Path
) -> None:
    assert SecretsSettings().file_root == DEFAULT_FILE_ROOT
    assert SecretsSettings().catalogue_file is None
    (root / "acme" / "api_token").write_text("from-file-value")
    catalogue_file = tmp_path / "catalogue.yaml"
    catalogue_file.write_text(
        "tenants:\n  acme:\n    file:api_token: {actions: [probe]}\n"
        "    env:TOKEN: {actions: [probe]}\n"
    )
    monkeypatch.setenv("OPSC_SECRETS_FILE_ROOT", str(root))
    monkeypatch.setenv("OPSC_SECRETS_ENV_PREFIX", "MY_")
    monkeypatch.setenv("OPSC_SECRETS_CATALOGUE_FILE", str(catalogue_file))
    monkeypatch.setenv("MY_ACME__TOKEN", "from-env-value")
    resolver = SecretResolver.from_settings(SecretsSettings())
    resolved, _ = resolver.resolve_params(
        {"a": {"$secret": "file:api_token"}, "b": {"$secret": "env:TOKEN"}}, ACME
    )
    assert resolved == {"a": "from-file-value", "b": "from-env-value"}
    monkeypatch.setenv("OPSC_SECRETS_PROVIDERS", '["env"]')
    only_env = SecretResolver.from_settings(SecretsSettings())
    assert only_env.provider_names == frozenset({"env"})
    with pytest.raises(SecretResolutionError, match="not available"):
        only_env.resolve_params({"a": {"$secret": "file:api_token"}}, ACME)


def test_providers_satisfy_the_protocol(root: Path) -> None:
    assert isinstance(EnvSecretProvider({}), SecretProvider)
    assert isinstance(FileSecretProvider(root), SecretProvider)
