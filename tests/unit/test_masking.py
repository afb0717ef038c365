"""The masker on its own: keys, free-text patterns, registered literals, formatter and filter.

The whole logging chain (structlog + stdlib into the sink) is tested in test_logconfig.py.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from opsconductor.common import masking
from opsconductor.common.masking import (
    REDACTED,
    Masker,
    MaskingFilter,
    MaskingFormatter,
    mask,
    mask_processor,
    mask_text,
    register_secret,
    registered_secrets,
    unregister_secret,
)
from opsconductor.common.secret_patterns import literal_regex

SECRET = "P@ssw0rd123"


@pytest.fixture
def masker() -> Masker:
    """A private masker, so registered literals never leak into other tests."""
    return Masker()


@pytest.fixture
def default_masker() -> Iterator[Masker]:
    """The process-wide masker, checked to hold the same literals after the test as before
    (other tests' registrations are left alone)."""
    default = masking.default_masker()
    before = default.registered_count
    yield default
    assert default.registered_count == before, "test left literals registered"


# -- keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "DB_PASSWORD",
        "passwd",
        "pwd",
        "token",
        "accessToken",
        "refresh_token",
        "api_key",
        "apikey",
        "X-Api-Key",
        "private_key",
        "secret",
        "client_secret",
        "credential",
        "credentials",
        "authorization",
        "Proxy-Authorization",
        "cookie",
        "Set-Cookie",
        "session",
        "session_id",
        "jwt_hs256_key",
        "aws_secret_access_key",
        "ssh_key",
        "passphrase",
    ],
)
def test_denylisted_keys_are_secret(masker: Masker, key: str) -> None:
    assert masker.is_secret_key(key)
    assert masker.mask({key: "v4lue"}) == {key: REDACTED}


@pytest.mark.parametrize(
    "key",
    [
        "idempotency_key",
        "step_idempotency_key",
        "lock_key",
        "lockKey",
        "plan_hash",
        "plan_snapshot_hash",
        "key_id",
        "kid",
        "token_type",
        "public_key",
        "secret_ref",
        "$secret",
        "monkey",
        "keyboard_layout",
        "tenant_id",
        "actor_id",
        "username",
        "auth_method",
    ],
)
def test_allowlisted_and_ordinary_keys_stay_visible(masker: Masker, key: str) -> None:
    assert not masker.is_secret_key(key)
    assert masker.mask({key: "v4lue"}) == {key: "v4lue"}


def test_idempotency_key_and_plan_hash_values_are_not_redacted(masker: Masker) -> None:
    key = "9f" * 32
    event = {"idempotency_key": key, "plan_hash": "ab" * 32, "lock_key": "t1:db-1:modify"}
    assert masker.mask(event) == event
    assert masker.mask_text(f"idempotency_key={key} plan_hash={'ab' * 32}") == (
        f"idempotency_key={key} plan_hash={'ab' * 32}"
    )


def test_custom_allow_list_replaces_the_default() -> None:
    """A masker built with its own allow-list redacts names the default one lets through."""
    strict = Masker(allowed_keys={"build_key"})
    assert not strict.is_secret_key("build_key")
    assert strict.is_secret_key("idempotency_key")


def test_key_classification_cache_stays_bounded(masker: Masker, monkeypatch: Any) -> None:
    monkeypatch.setattr(masking, "_KEY_CACHE_LIMIT", 8)
    verdicts = [masker.is_secret_key(f"field_{i}_token") for i in range(20)]
    assert all(verdicts)
    assert len(masker._key_cache) <= 8


# -- structured values ----------------------------------------------------------------------


def test_secrets_nested_three_levels_deep_are_redacted(masker: Masker) -> None:
    event = {"a": {"b": {"c": {"password": SECRET, "note": "fine"}}}}
    assert masker.mask(event) == {"a": {"b": {"c": {"password": REDACTED, "note": "fine"}}}}


def test_secrets_inside_lists_tuples_and_sets_are_redacted(masker: Masker) -> None:
    value = {
        "targets": [{"ref": "db-1", "token": "t0ken-1"}, {"ref": "db-2", "token": "t0ken-2"}],
        "args": ("--host", "db", f"password={SECRET}"),
        "flags": {f"token={SECRET}", "verbose"},
        "frozen": frozenset({f"secret: {SECRET}"}),
    }
    masked = masker.mask(value)
    assert masked["targets"] == [
        {"ref": "db-1", "token": REDACTED},
        {"ref": "db-2", "token": REDACTED},
    ]
    assert masked["args"] == ("--host", "db", f"password={REDACTED}")
    assert masked["flags"] == {f"token={REDACTED}", "verbose"}
    assert masked["frozen"] == frozenset({f"secret: {REDACTED}"})
    assert SECRET not in repr(masked)


def test_mask_returns_copies_and_leaves_the_input_untouched(masker: Masker) -> None:
    original = {"password": SECRET, "nested": [{"token": "abcd1234"}]}
    masker.mask(original)
    assert original == {"password": SECRET, "nested": [{"token": "abcd1234"}]}


def test_none_and_booleans_under_secret_keys_are_kept(masker: Masker) -> None:
    """They reveal nothing, and "password: None" is useful when debugging configuration."""
    assert masker.mask({"password": None, "token": False, "secret": 0}) == {
        "password": None,
        "token": False,
        "secret": REDACTED,
    }


def test_whole_containers_under_secret_keys_are_redacted(masker: Masker) -> None:
    assert masker.mask({"credentials": {"user": "u", "pass": "p"}}) == {"credentials": REDACTED}


@dataclasses.dataclass
class _Connection:
    host: str
    password: str


class _Opaque:
    def __str__(self) -> str:
        return "opaque object"


def test_objects_are_masked_through_their_str(masker: Masker) -> None:
    """An object whose text holds a secret becomes the masked text; others are left alone."""
    conn = _Connection("db", SECRET)
    masked = masker.mask({"conn": conn, "other": (opaque := _Opaque())})
    assert masked["conn"] == f"_Connection(host='db', password='{REDACTED}')"
    assert masked["other"] is opaque


def test_exception_objects_are_masked(masker: Masker) -> None:
    masked = masker.mask({"error": ValueError(f"Auth failed with password: {SECRET}")})
    assert masked == {"error": f"Auth failed with password: {REDACTED}"}


def test_bytes_are_masked_as_utf8_text(masker: Masker) -> None:
    assert masker.mask(b"token=abcdef") == f"token={REDACTED}"
    assert masker.mask(bytearray(b"plain")) == bytearray(b"plain")


def test_cyclic_and_very_deep_structures_are_masked_without_recursion_errors(
    masker: Masker,
) -> None:
    cyclic: list[Any] = [f"password={SECRET}"]
    cyclic.append(cyclic)
    deep: dict[str, Any] = {"password": SECRET}
    for _ in range(100):
        deep = {"level": deep}
    assert SECRET not in repr(masker.mask(cyclic))
    assert SECRET not in repr(masker.mask(deep))


# -- free text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret", "expected"),
    [
        ("Auth failed with password: P@ssw0rd123", SECRET, f"password: {REDACTED}"),
        ("login password=P@ssw0rd123 user=alice", SECRET, f"password={REDACTED} user=alice"),
        ('{"password": "P@ssw0rd123"}', SECRET, f'{{"password": "{REDACTED}"}}'),
        ("{'api_key': 'ak-123456'}", "ak-123456", f"{{'api_key': '{REDACTED}'}}"),
        ("DB_PASSWORD=hunter2x accessToken=tk-9", "hunter2x", f"DB_PASSWORD={REDACTED}"),
        ("client_secret = s3cr3t-v4l", "s3cr3t-v4l", f"client_secret = {REDACTED}"),
        ("credential:abc987", "abc987", f"credential:{REDACTED}"),
        ("?token=tk123&page=2", "tk123", f"?token={REDACTED}&page=2"),
        ("'password=quoted1'", "quoted1", f"'password={REDACTED}'"),
        ("""'password": "odd-quotes1'""", "odd-quotes1", f"""'password": "{REDACTED}'"""),
        ('secret="unterminated1 more', "unterminated1", f'secret="{REDACTED} more'),
        ("monkey=password=inner1", "inner1", f"monkey=password={REDACTED}"),
        ("token: Bearer abc.def.ghi", "abc.def", f"token: Bearer {REDACTED}"),
        ("Authorization: Bearer tok-abc123", "tok-abc123", f"Authorization: {REDACTED}"),
        ("Cookie: sid=abc123; theme=dark\nnext", "abc123", f"Cookie: {REDACTED}\nnext"),
        ("Set-Cookie: a=b1234", "b1234", f"Set-Cookie: {REDACTED}"),
        ("sent Bearer tok-abc123 upstream", "tok-abc123", f"Bearer {REDACTED} upstream"),
        ("header Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", f"Basic {REDACTED}"),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl ok",
            "eyJzdWIiOiJhIn0",
            f"jwt {REDACTED} ok",
        ),
        (
            "key -----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n"
            "-----END RSA PRIVATE KEY----- end",
            "MIIEpAIBAAKCAQEA",
            f"key {REDACTED} end",
        ),
        (
            "truncated -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA",
            "b3BlbnNzaC1rZXktdjEAAAAA",
            f"truncated {REDACTED}",
        ),
        (
            "dsn=postgresql://app:P@ssw0rd123@db:5432/opsc",
            SECRET,
            f"postgresql://app:{REDACTED}@db:5432/opsc",
        ),
        ("redis://:r3dis-pw@cache:6379/0", "r3dis-pw", f"redis://:{REDACTED}@cache:6379/0"),
        ("aws AKIAIOSFODNN7EXAMPLE used", "AKIAIOSFODNN7EXAMPLE", f"aws {REDACTED} used"),
        ("İstanbul token=unicode1 ok", "unicode1", f"İstanbul token={REDACTED} ok"),
    ],
)
def test_secret_shaped_text_is_redacted(
    masker: Masker, text: str, secret: str, expected: str
) -> None:
    masked = masker.mask_text(text)
    assert secret not in masked
    assert expected in masked


@pytest.mark.parametrize(
    "text",
    [
        "step_finished in 12 ms",
        "monkey=banana keyboard: us",
        "invalid password for user alice",
        "Basic Authentication is disabled",
        "bearer token missing",
        "the bearer of bad news",
        'File "/srv/app/password_utils.py", line 3',
        "http://example.com:8080/path@v2",
        "a://",
        "key: {'nested': 1}",
        "idempotency_key=9f9f lock_key=t1:db-1",
        f"already {REDACTED}",
    ],
)
def test_ordinary_text_is_left_alone(masker: Masker, text: str) -> None:
    assert masker.mask_text(text) == text


def test_masking_is_idempotent(masker: Masker) -> None:
    text = (
        f"password={SECRET} Authorization: Bearer abc\n"
        "postgres://u:pw12@h/db eyJa.eyJb.c AKIAIOSFODNN7EXAMPLE"
    )
    once = masker.mask_text(text)
    assert masker.mask_text(once) == once


# -- registered literals --------------------------------------------------------------------


def test_registered_literal_is_redacted_inside_free_text(masker: Masker) -> None:
    masker.register_secret("s3cr3t-value-42")
    assert masker.mask_text("upstream said: bad credentials s3cr3t-value-42 (401)") == (
        f"upstream said: bad credentials {REDACTED} (401)"
    )


def test_registered_literal_is_redacted_url_encoded_too(masker: Masker) -> None:
    masker.register_secret("p@ss w/rd")
    masked = masker.mask_text("GET /login?pw=p%40ss%20w%2Frd and p@ss w/rd")
    assert "p%40ss" not in masked
    assert "p@ss" not in masked


#: A secret with every character an encoding changes: quote, backslash, slash, space, plus,
#: percent, a non-ASCII letter and a control character.
FANCY = 'Fa"ncy\\S\u00e9cret/+ %\t-' + "q7Zx9Lm2"


def _encodings(value: str) -> dict[str, str]:
    """The forms of the issue-8 finding-4 reproduction, computed here independently."""
    import base64
    import json
    from urllib.parse import quote, quote_plus

    data = value.encode()
    return {
        "json": json.dumps(value)[1:-1],
        "json_unicode": json.dumps(value, ensure_ascii=False)[1:-1],
        "json_twice": json.dumps(json.dumps(value))[1:-1],
        "quote": quote(value, safe=""),
        "quote_slash_safe": quote(value),
        "quote_plus": quote_plus(value),
        "b64": base64.b64encode(data).decode(),
        "b64_unpadded": base64.b64encode(data).decode().rstrip("="),
        "b64url": base64.urlsafe_b64encode(data).decode(),
        "b64url_unpadded": base64.urlsafe_b64encode(data).decode().rstrip("="),
        "reversed": value[::-1],
    }


@pytest.mark.parametrize("form", sorted(_encodings(FANCY)))
def test_every_encoded_echo_of_a_registered_secret_is_redacted(masker: Masker, form: str) -> None:
    """The attack of finding 4: an echo JSON-escaped, URL-encoded, base64'd or reversed."""
    masker.register_secret(FANCY)
    encoded = _encodings(FANCY)[form]
    assert encoded != FANCY or form in {"json_unicode"}
    masked = masker.mask_text(f"upstream echoed <{encoded}> back")
    assert encoded not in masked
    assert REDACTED in masked


@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc", "Authorization: x"])
@pytest.mark.parametrize("suffix", ["", "!", "!!", " trailing data"])
@pytest.mark.parametrize("urlsafe", [False, True])
def test_base64_of_a_secret_embedded_in_other_bytes_is_redacted_at_every_alignment(
    masker: Masker, prefix: str, suffix: str, urlsafe: bool
) -> None:
    """Embedded in a longer encoded blob, the secret starts at byte 0, 1 or 2 of a group."""
    import base64

    masker.register_secret(FANCY)
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    blob = encode((prefix + FANCY + suffix).encode()).decode()
    masked = masker.mask_text(f"blob={blob};")
    assert REDACTED in masked
    # What stays visible is the encoding of the surrounding bytes, never of the secret's.
    remaining = masked.removeprefix("blob=").removesuffix(";").replace(REDACTED, "")
    assert len(remaining) <= len(blob) - len(FANCY.encode()) * 4 // 3 + 2


def test_a_basic_auth_header_built_from_a_secret_is_redacted(masker: Masker) -> None:
    import base64

    secret = "svc-password-" + secrets.token_hex(6)
    masker.register_secret(secret)
    credentials = base64.b64encode(f"svc-user:{secret}".encode()).decode()
    assert credentials not in masker.mask_text(f"sent X-Creds: {credentials}")


def test_codec_errors_do_not_quote_the_character_they_failed_on(masker: Masker) -> None:
    """A UnicodeEncodeError/UnicodeDecodeError message quotes a piece of the value."""
    texts = []
    try:
        "pass-\u00e9-word".encode("ascii")
    except UnicodeEncodeError as exc:
        texts.append(str(exc))
    try:
        b"pw-\xfe\xff".decode("utf-8")
    except UnicodeDecodeError as exc:
        texts.append(str(exc))
    for text in texts:
        masked = masker.mask_text(f"header rejected: {text}")
        assert "\\xe9" not in masked
        assert "0xfe" not in masked
        assert REDACTED in masked
        assert "codec can't" in masked  # the kind of error stays readable
    plural = "'ascii' codec can't encode characters in position 5-6: ordinal not in range(128)"
    assert masker.mask_text(plural) == plural


def test_derived_forms_of_short_values_are_not_registered(masker: Masker) -> None:
    """A 4-7 character value is redacted as itself only: its base64 fragments and other
    derived forms would be short enough to hit ordinary text."""
    masker.register_secret("ab/d")
    assert masker.mask_text("ab/d ab%2Fd d/ba") == f"{REDACTED} ab%2Fd d/ba"


def test_a_quoted_path_ending_in_a_secret_word_is_not_a_pair(masker: Masker) -> None:
    """``ls`` and ``cat`` quote paths: '/var/run/secrets': No such file is an error message."""
    text = "ls: cannot access '/var/run/secrets': No such file or directory"
    assert masker.mask_text(text) == text
    assert masker.mask_text("/api/token=abc123") == f"/api/token={REDACTED}"
    assert masker.mask_text("'token': 'abc123'") == f"'token': '{REDACTED}'"


def test_literal_forms_of_a_plain_value() -> None:
    from opsconductor.common.secret_patterns import literal_forms

    forms = literal_forms("plain-value-123")
    assert "plain-value-123" in forms
    assert "321-eulav-nialp" in forms
    assert "cGxhaW4tdmFsdWUtMTIz" in forms


def test_longer_literal_wins_over_its_prefix(masker: Masker) -> None:
    masker.register_secrets(["abcd", "abcd1234", "abce"])
    assert masker.mask_text("x abcd1234 y abcd abce abc") == (
        f"x {REDACTED} y {REDACTED} {REDACTED} abc"
    )


def test_literals_shorter_than_four_characters_are_ignored(masker: Masker) -> None:
    """A short literal would redact common substrings everywhere and reveal itself."""
    masker.register_secret("abc")
    assert masker.registered_count == 0
    assert masker.mask_text("abc abcd") == "abc abcd"


def test_registrations_are_counted(masker: Masker) -> None:
    masker.register_secret("shared-secret")
    masker.register_secret("shared-secret")
    masker.unregister_secret("shared-secret")
    assert masker.mask_text("shared-secret") == REDACTED
    masker.unregister_secret("shared-secret")
    assert masker.mask_text("shared-secret") == "shared-secret"
    masker.unregister_secret("never-registered")
    assert masker.registered_count == 0


def test_registered_secrets_context_manager_unregisters_even_on_error(masker: Masker) -> None:
    seen: list[str] = []

    def failing_step() -> None:
        with masker.registered_secrets(["ctx-secret-1", "ctx-secret-2"]):
            seen.append(masker.mask_text("ctx-secret-1 ctx-secret-2"))
            raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        failing_step()
    assert seen == [f"{REDACTED} {REDACTED}"]
    assert masker.registered_count == 0
    assert masker.mask_text("ctx-secret-1") == "ctx-secret-1"


def test_cached_results_never_outlive_a_registration(masker: Masker) -> None:
    """The masked-text cache is per literal set: a newly registered value is masked at once."""
    assert masker.mask_text("value late-secret") == "value late-secret"  # now cached
    masker.register_secret("late-secret")
    assert masker.mask_text("value late-secret") == f"value {REDACTED}"


def test_text_cache_stays_bounded(masker: Masker, monkeypatch: Any) -> None:
    monkeypatch.setattr(masking, "_TEXT_CACHE_SIZE", 16)
    for i in range(100):
        masker.mask_text(f"line {i}")
    assert len(masker._state.cache) <= 16


def test_clear_secrets_forgets_everything(masker: Masker) -> None:
    masker.register_secrets(["one-secret", "two-secret"])
    masker.clear_secrets()
    assert masker.registered_count == 0
    assert masker.mask_text("one-secret") == "one-secret"


def test_concurrent_registration_and_masking_is_consistent(masker: Masker) -> None:
    """Threads registering, masking and unregistering at once: while a thread holds its
    literal registered, every masking of it (from any thread) is redacted."""
    errors: list[str] = []
    barrier = threading.Barrier(16)

    def worker(n: int) -> None:
        value = f"thread-secret-{n:03d}"
        barrier.wait()
        for _ in range(50):
            with masker.registered_secrets([value]):
                if value in masker.mask_text(f"using {value} now"):
                    errors.append(value)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert masker.registered_count == 0


def test_literal_regex_falls_back_for_pathological_prefix_chains() -> None:
    """Each literal a prefix of the next nests the trie deeper than Python's recursion limit."""
    chain = ["a" * n for n in range(4, sys.getrecursionlimit() + 50)]
    regex = literal_regex(chain)
    assert regex.sub("X", "b" + "a" * 10 + "b") == "bXb"


def test_module_level_functions_use_the_default_masker(default_masker: Masker) -> None:
    before = default_masker.registered_count
    register_secret("module-level-secret")
    try:
        assert mask_text("module-level-secret") == REDACTED
        assert mask({"x": "module-level-secret"}) == {"x": REDACTED}
    finally:
        unregister_secret("module-level-secret")
    with registered_secrets(["ctx-level-secret"]):
        assert mask_text("ctx-level-secret") == REDACTED
    assert default_masker.registered_count == before


# -- structlog processor --------------------------------------------------------------------


def test_mask_processor_masks_every_field_but_plumbing() -> None:
    record = logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None)
    event = {
        "event": f"login password={SECRET}",
        "token": "abc123",
        "_record": record,
        "_from_structlog": True,
        "timestamp": "2026-01-01T00:00:00Z",
    }
    out = mask_processor(None, "info", event)
    assert out["event"] == f"login password={REDACTED}"
    assert out["token"] == REDACTED
    assert out["_record"] is record


class _Key(str):
    """A str subclass key: classified like the plain string it equals."""


def test_mask_processor_masks_each_field_as_mask_item_does(masker: Masker) -> None:
    """The processor's inlined fast paths give what `mask_item` gives, for every kind of value
    under a secret and an ordinary key (None and bools kept, numbers redacted only under a
    secret key, cached and uncached strings, str subclasses, containers, objects)."""
    masker.register_secret(SECRET)

    class Thing:
        def __str__(self) -> str:
            return f"thing {SECRET}"

    values: list[object] = [
        None,
        True,
        False,
        0,
        7,
        1.5,
        "plain",
        f"password={SECRET}",
        SECRET,
        _Key(f"prefix {SECRET}"),
        {"nested": SECRET, "token": "x1234"},
        [SECRET, 1, None],
        {"created_at": "2026-12-03T16:01:56+00:00", "ended_at": None, "token": None},
        {"plain": "a", "password": f"token={SECRET}", "n": 1},
        {3: SECRET, "ok": "visible"},
        {"inner": {"secret": "x1234"}, "list": [SECRET]},
        ["host:a", f"password={SECRET}", True, 2.5],
        ["a", {"api_key": "x1234"}, [SECRET]],
        [],
        {},
        (SECRET,),
        Thing(),
        b"bytes " + SECRET.encode(),
    ]
    keys: list[object] = ["status", "api_token", _Key("password"), _Key("status"), 3]
    for key in keys:
        for value in values:
            expected = masker.mask_item(key, value)
            for _ in range(2):  # the second pass answers from the text cache
                event: dict[Any, Any] = {key: value}
                out = masker.process_event(None, "info", event)
                assert out[key] == expected, (key, value)
                assert type(out[key]) is type(expected), (key, value)


def test_mask_processor_renders_and_masks_a_leftover_exc_info() -> None:
    """Without format_exc_info before it, the processor still never lets a raw traceback out."""
    try:
        raise ValueError(f"Auth failed with password: {SECRET}")
    except ValueError as exc:
        out = mask_processor(None, "error", {"event": "failed", "exc_info": exc})
    assert "exc_info" not in out
    assert "Traceback" in out["exception"]
    assert SECRET not in out["exception"]


# -- stdlib formatter and filter ------------------------------------------------------------


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"Auth failed with password: {SECRET}")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("asyncpg", logging.ERROR, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_masking_formatter_masks_message_args_extra_and_traceback(masker: Masker) -> None:
    masker.register_secret("literal-arg-secret")
    formatter = MaskingFormatter("%(message)s password=%(password)s", masker=masker)
    record = _record("connect %s failed", "literal-arg-secret", exc=True, password=SECRET)
    out = formatter.format(record)
    assert SECRET not in out
    assert "literal-arg-secret" not in out
    assert "Traceback" in out
    assert out.startswith(f"connect {REDACTED} failed password={REDACTED}")
    # The caller's record is untouched: other handlers see what was logged.
    assert record.__dict__["password"] == SECRET


def test_masking_formatter_masks_a_previously_cached_exc_text(masker: Masker) -> None:
    record = _record("boom", exc=True)
    record.exc_text = f"cached traceback with token={SECRET}"
    out = MaskingFormatter(masker=masker).format(record)
    assert SECRET not in out


def test_masking_formatter_masks_stack_info(masker: Masker) -> None:
    record = _record("here")
    record.stack_info = f'Stack (most recent call last):\n  password = "{SECRET}"'
    out = MaskingFormatter(masker=masker).format(record)
    assert SECRET not in out
    assert "Stack" in out


def test_masking_formatter_masks_output_of_an_inner_formatter(masker: Masker) -> None:
    """With premask off, the inner formatter's own output is still masked as text."""

    class Leaky(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"{record.getMessage()} token={record.__dict__['token']}"

    formatter = MaskingFormatter(inner=Leaky(), masker=masker, premask=False)
    assert formatter.format(_record("hello", token="abc123")) == f"hello token={REDACTED}"


def test_masking_formatter_formats_exceptions_and_stacks_masked(masker: Masker) -> None:
    formatter = MaskingFormatter(masker=masker)
    exc_info = _record("x", exc=True).exc_info
    assert exc_info is not None
    assert SECRET not in formatter.formatException(exc_info)
    assert formatter.formatStack(f"token={SECRET}") == f"token={REDACTED}"


def test_masking_formatter_masks_structlog_event_dicts(masker: Masker) -> None:
    """A dict message (structlog's wrap_for_formatter) is masked as a mapping."""
    record = logging.LogRecord("y", logging.INFO, "p", 1, {"event": "e", "token": "t"}, (), None)
    clone = masker.mask_record(record)
    assert clone.msg == {"event": "e", "token": REDACTED}


def test_masking_filter_masks_records_in_place_for_plain_handlers(masker: Masker) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s %(password)s"))
    handler.addFilter(MaskingFilter(masker))
    handler.handle(
        _record("login as %s with password: %s", "alice", SECRET, exc=True, password=SECRET)
    )
    out = stream.getvalue()
    assert SECRET not in out
    assert "login as alice" in out
    assert "Traceback" in out


def test_formatter_and_filter_default_to_the_process_masker(default_masker: Masker) -> None:
    with registered_secrets(["default-masker-secret"]):
        record = _record("value default-masker-secret")
        assert MaskingFormatter().format(record) == f"value {REDACTED}"
        MaskingFilter().filter(record)
        assert record.msg == f"value {REDACTED}"


# -- performance smoke ----------------------------------------------------------------------


def test_masking_ten_thousand_lines_with_fifty_registered_secrets_completes(
    masker: Masker,
) -> None:
    """Performance smoke (no timing assertion): every line loses its secret; time is printed."""
    values = [secrets.token_urlsafe(18) for _ in range(50)]
    masker.register_secrets(values)
    lines = [
        f"step {i} on db-{i % 7} status=ok took {i % 97}ms token={values[i % 50]} "
        f"user=alice note=used {values[(i * 7) % 50]} idempotency_key={i:064x}"
        for i in range(10_000)
    ]
    started = time.perf_counter()
    masked = [masker.mask_text(line) for line in lines]
    elapsed = time.perf_counter() - started
    print(f"\nmasked 10k lines with 50 registered secrets in {elapsed:.3f} s")
    joined = "\n".join(masked)
    assert not any(value in joined for value in values)
    assert joined.count(REDACTED) == 20_000


def test_masked_json_stays_valid_json_and_validation_settings_stay_visible() -> None:
    """Free-text masking of a rendered JSON line keeps it parseable: secret numbers become a
    JSON string, null/true/false are left alone; JWT validation settings are not secrets."""
    import json

    from opsconductor.common.masking import mask_text

    line = json.dumps(
        {
            "jwt_issuer": None,
            "jwt_audience": "opsconductor-execution",
            "jwt_hs256_key_set": True,
            "pin_key": 1234,
            "password": "hunter22",
        }
    )
    parsed = json.loads(mask_text(line))
    assert parsed == {
        "jwt_issuer": None,
        "jwt_audience": "opsconductor-execution",
        "jwt_hs256_key_set": True,
        "pin_key": "***REDACTED***",
        "password": "***REDACTED***",
    }
