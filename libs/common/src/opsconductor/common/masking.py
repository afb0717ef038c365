"""Secret masking for everything that reaches a log sink.

One `Masker` (a process-wide default instance backs the module functions) removes secrets from
structured values and from free text. `opsconductor.common.logconfig` wires it in at the sink:
every record, from structlog or from stdlib `logging` (third-party libraries, tracebacks,
``extra=`` fields), passes `mask_processor` last before the renderer, and `MaskingFormatter`
masks the fully formatted line once more. No call site can opt out.

What is redacted (replaced by `REDACTED`):

- **Values under denylisted keys**, at any depth of dicts, lists, tuples and sets. A key is
  denylisted when its normalised form (camelCase split, lower-cased, separators unified) contains
  one of `DENYLIST_SUBSTRINGS` (``password``, ``secret``, ``token``, ``credential``, ``apikey``,
  ``privatekey``, ``authorization``, ``cookie``, ...) or has one of `DENYLIST_TOKENS`
  (``key``, ``pwd``, ``session``, ...) as a whole ``_``-separated word, so ``x-api-key``,
  ``accessToken`` and ``DB_PASSWORD`` match while ``monkey`` or ``keyboard_layout`` do not.
  `DEFAULT_ALLOWED_KEYS` lists names that look secret but are not (``idempotency_key``,
  ``lock_key``, ``key_id``, ``token_type``, ``public_key`` ...): their values stay visible (and
  are still scanned as free text). ``None`` and booleans are never redacted: they reveal nothing.
- **Free-text patterns** in any string (`opsconductor.common.secret_patterns`): ``password: x``
  / ``token=x`` / ``"api_key": "x"`` / ``'secret': 'x'`` for every denylisted name,
  ``Authorization:``/``Cookie:`` header lines, ``Bearer <token>`` and ``Basic <base64>``, JWTs
  (``eyJ….….…``), PEM private-key blocks, credentials in URLs (``scheme://user:pass@host``
  becomes ``scheme://user:***REDACTED***@host``) and AWS access key ids (``AKIA…``).
- **Literal values registered at run time** (`register_secret`, `registered_secrets`): resolved
  secrets are registered by the worker so that their text is redacted wherever it shows up,
  e.g. echoed back inside a third-party error message — and so are the forms an echo takes
  (`secret_patterns.literal_forms`): JSON-escaped, URL-encoded, base64 (standard and URL-safe,
  alone or embedded at any of the 3 byte alignments) and reversed. All forms of all registered
  values are compiled into one regex when the set changes, never per record. Values shorter than
  `MIN_SECRET_LENGTH` are ignored: a 1-3 character literal would redact every occurrence of
  common substrings (destroying the logs) and, worse, *which* fragments get redacted would
  reveal the secret to anyone reading them.

Other objects are masked through their ``str()``: when that text contains a secret the masked
text replaces the object, otherwise the object is left for the renderer. Mapping keys are kept
as they are (they name data); the final pass over the formatted line still covers them.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, Final, overload

import structlog

from opsconductor.common.secret_patterns import (
    REDACTED,
    literal_forms,
    literal_regex,
    redact_patterns,
)

__all__ = [
    "DEFAULT_ALLOWED_KEYS",
    "DENYLIST_SUBSTRINGS",
    "DENYLIST_TOKENS",
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "Masker",
    "MaskingFilter",
    "MaskingFormatter",
    "default_masker",
    "mask",
    "mask_processor",
    "mask_text",
    "normalise_key",
    "register_secret",
    "registered_secrets",
    "unregister_secret",
]

MIN_SECRET_LENGTH: Final = 4

#: Matched anywhere inside the normalised key with separators removed ("x-api-key" -> "xapikey").
DENYLIST_SUBSTRINGS: Final[tuple[str, ...]] = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "credential",
    "apikey",
    "privatekey",
    "accesskey",
    "authorization",
    "cookie",
)
#: Matched only as a whole word of the normalised key ("ssh_key" yes, "monkey" no).
DENYLIST_TOKENS: Final[frozenset[str]] = frozenset(
    {"pwd", "pass", "key", "keys", "session", "sessionid", "sid", "jwt"}
)
#: Names that match the denylist but hold no secret. Compared after normalisation.
DEFAULT_ALLOWED_KEYS: Final[frozenset[str]] = frozenset(
    {
        # Deterministic hashes and queue/lock coordinates: needed to debug, useless to attackers.
        "idempotency_key",
        "step_idempotency_key",
        "opsc_idempotency_key",
        "lock_key",
        "lock_keys",
        "dedup_key",
        "cache_key",
        "partition_key",
        "routing_key",
        "sort_key",
        "queue_key",
        "redis_key",
        "plan_hash",
        "plan_snapshot_hash",
        # Identify a key or describe a token without containing it.
        "key_id",
        "kid",
        "key_type",
        "key_name",
        "token_type",
        # Pagination cursors: opaque, but not credentials.
        "page_token",
        "next_page_token",
        "token_expires_at",
        "token_expiry",
        # Public material and references to secrets (resolved just in time, never logged).
        "public_key",
        "public_key_file",
        "jwt_rs256_public_key_file",
        # Token validation settings, not tokens.
        "jwt_audience",
        "jwt_issuer",
        "jwt_algorithms",
        "jwt_hs256_key_set",
        "jwt_rs256_public_key_set",
        "secret_ref",
        "secret_refs",
        "secret_name",
        "secret_provider",
        "$secret",
    }
)

# Keys whose values belong to structlog/logging plumbing: never rewritten.
_PLUMBING_KEYS: Final = frozenset({"_record", "_from_structlog", "_logger", "_name"})
# Set by our own processors (a timestamp and a level name): masking them would only cost time.
_UNMASKED_EVENT_KEYS: Final = _PLUMBING_KEYS | {"timestamp", "level"}
_MAX_DEPTH: Final = 32
_KEY_CACHE_LIMIT: Final = 4096

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NON_WORD = re.compile(r"[^a-z0-9$]+")

_MIN_FORM_LENGTH: Final = 8
_TEXT_CACHE_MAX_LEN: Final = 256
_TEXT_CACHE_SIZE: Final = 8192


class _LiteralState:
    """Registered literals as one immutable snapshot, swapped whole when the set changes.

    The masked-text cache lives here too, so a result computed with an older literal set can
    never be served after a new secret was registered.
    """

    __slots__ = ("cache", "regex")

    def __init__(self, literals: frozenset[str]) -> None:
        self.regex = literal_regex(literals) if literals else None
        self.cache: dict[str, str] = {}


def normalise_key(name: str) -> str:
    """``accessToken`` / ``X-Api-Key`` / ``DB_PASSWORD`` -> ``access_token``, ``x_api_key`` ..."""
    return _NON_WORD.sub("_", _CAMEL_BOUNDARY.sub("_", name).lower()).strip("_")


class Masker:
    """Redacts secrets from structured values and free text (see the module docstring).

    Thread-safe and cheap on the hot path: registered literals live behind a lock in an
    immutable snapshot (one compiled regex, rebuilt only when the set changes) that readers use
    without locking; each pattern pass runs only when a substring it needs is present; masked
    short strings (event names, ids, levels repeat endlessly) are cached per snapshot.
    """

    def __init__(
        self,
        *,
        allowed_keys: Iterable[str] = DEFAULT_ALLOWED_KEYS,
        min_secret_length: int = MIN_SECRET_LENGTH,
        forms: Callable[[str], Iterable[str]] = literal_forms,
    ) -> None:
        self._allowed = frozenset(normalise_key(k) for k in allowed_keys)
        self._min_secret_length = min_secret_length
        #: What a registered value is redacted as (`literal_forms`; a seam for the benchmark).
        self._forms = forms
        self._lock = threading.Lock()
        self._secret_counts: Counter[str] = Counter()
        self._state = _LiteralState(frozenset())
        self._key_cache: dict[str, bool] = {}

    # -- keys -------------------------------------------------------------------------------

    def is_secret_key(self, key: str) -> bool:
        """Whether values stored under ``key`` are redacted wholesale."""
        cached = self._key_cache.get(key)
        if cached is not None:
            return cached
        normalised = normalise_key(key)
        if normalised in self._allowed:
            verdict = False
        else:
            words = normalised.split("_")
            compact = "".join(words)
            verdict = any(s in compact for s in DENYLIST_SUBSTRINGS) or any(
                w in DENYLIST_TOKENS for w in words
            )
        if len(self._key_cache) >= _KEY_CACHE_LIMIT:
            self._key_cache.clear()
        self._key_cache[key] = verdict
        return verdict

    # -- registered literals ----------------------------------------------------------------

    def register_secret(self, value: str) -> None:
        """Redact ``value`` (and its encoded forms, `literal_forms`) anywhere from now on.

        Registrations are counted: the literal stays redacted until `unregister_secret` has been
        called as many times as this. Values shorter than the minimum length are ignored.
        """
        self.register_secrets((value,))

    def register_secrets(self, values: Iterable[str]) -> None:
        """`register_secret` for many values, recompiling the literal regex once."""
        with self._lock:
            before = len(self._secret_counts)
            for value in values:
                if len(value) >= self._min_secret_length:
                    self._secret_counts[value] += 1
            if len(self._secret_counts) != before:
                self._rebuild_literals()

    def unregister_secret(self, value: str) -> None:
        """Undo one `register_secret` of ``value``; unknown values are ignored."""
        self.unregister_secrets((value,))

    def unregister_secrets(self, values: Iterable[str]) -> None:
        """`unregister_secret` for many values, recompiling the literal regex once."""
        with self._lock:
            before = len(self._secret_counts)
            for value in values:
                count = self._secret_counts.get(value, 0)
                if count > 1:
                    self._secret_counts[value] = count - 1
                elif count == 1:
                    del self._secret_counts[value]
            if len(self._secret_counts) != before:
                self._rebuild_literals()

    @contextmanager
    def registered_secrets(self, values: Iterable[str]) -> Iterator[None]:
        """Register ``values`` for the duration of the ``with`` block."""
        held = list(values)
        self.register_secrets(held)
        try:
            yield
        finally:
            self.unregister_secrets(held)

    def clear_secrets(self) -> None:
        """Forget every registered literal (tests and process shutdown)."""
        with self._lock:
            self._secret_counts.clear()
            self._rebuild_literals()

    @property
    def registered_count(self) -> int:
        """How many distinct literals are currently registered."""
        return len(self._secret_counts)

    def _rebuild_literals(self) -> None:
        # Caller holds the lock. Short forms would redact common text: a value needs the
        # minimum length, a derived form (a base64 fragment...) 8 characters.
        minimum = self._min_secret_length
        variants = {
            form
            for value in self._secret_counts
            for form in self._forms(value)
            if len(form) >= minimum and (form == value or len(form) >= _MIN_FORM_LENGTH)
        }
        self._state = _LiteralState(frozenset(variants))

    # -- masking ----------------------------------------------------------------------------

    def mask_text(self, text: str) -> str:
        """Return ``text`` with registered literals and secret-shaped substrings redacted."""
        state = self._state
        cacheable = len(text) <= _TEXT_CACHE_MAX_LEN
        if cacheable:
            cached = state.cache.get(text)
            if cached is not None:
                return cached
        masked = self._mask_text(text, state)
        if cacheable:
            if len(state.cache) >= _TEXT_CACHE_SIZE:
                state.cache.clear()
            state.cache[text] = masked
        return masked

    def _mask_text(self, text: str, state: _LiteralState) -> str:
        if state.regex is not None:
            text = state.regex.sub(REDACTED, text)
        return redact_patterns(text, self.is_secret_key)

    @overload
    def mask(self, value: str) -> str: ...
    @overload
    def mask(self, value: Mapping[str, Any]) -> dict[str, Any]: ...
    @overload
    def mask(self, value: object) -> object: ...

    def mask(self, value: object) -> object:
        """Return a masked copy of ``value``; containers are rebuilt, never mutated."""
        return self._mask(value, 0)

    def mask_item(self, key: object, value: object) -> object:
        """Mask ``value`` as stored under ``key`` (denylisted keys redact it wholesale)."""
        return self._mask_item(key, value, 0)

    def _mask_item(self, key: object, value: object, depth: int) -> object:
        if (
            isinstance(key, str)
            and value is not None
            and not isinstance(value, bool)
            and self.is_secret_key(key)
        ):
            return REDACTED
        return self._mask(value, depth)

    def _mask(self, value: object, depth: int) -> object:
        if isinstance(value, str):
            return self.mask_text(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if depth >= _MAX_DEPTH:
            # Deep or cyclic structure: repr() copes with cycles and still gets text-masked.
            return self.mask_text(repr(value))
        depth += 1
        if isinstance(value, Mapping):
            return {k: self._mask_item(k, v, depth) for k, v in value.items()}
        if isinstance(value, list):
            return [self._mask(v, depth) for v in value]
        if isinstance(value, tuple):
            return tuple(self._mask(v, depth) for v in value)
        if isinstance(value, set | frozenset):
            return type(value)(self._mask(v, depth) for v in value)
        if isinstance(value, bytes | bytearray):
            text = bytes(value).decode("utf-8", errors="replace")
        else:
            text = str(value)
        masked = self.mask_text(text)
        return value if masked == text else masked

    # -- structlog --------------------------------------------------------------------------

    def process_event(
        self, logger: object, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """structlog processor: mask every field; place it last before the renderer.

        An ``exc_info`` still present (``format_exc_info`` missing from the chain) is rendered
        to the ``exception`` text here, so that a renderer cannot print an unmasked traceback.
        """
        if "exc_info" in event_dict:
            event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
        # `_mask_item(key, value, 0)` for every field, with its common cases inlined: a service
        # line carries ~25 fields, nearly all None, numbers or short strings already in the
        # text cache, and the calls cost more than the masking (a third of a line's cost).
        cache = self._state.cache
        key_cache = self._key_cache
        for key, value in event_dict.items():
            if value is None or key in _UNMASKED_EVENT_KEYS:
                continue  # None is never redacted nor rewritten
            kind = type(value)
            if kind is bool:
                continue
            if isinstance(key, str):
                secret = key_cache.get(key)
                if secret is None:
                    secret = self.is_secret_key(key)
                if secret:
                    event_dict[key] = REDACTED
                    continue
            if kind is str:
                masked = cache.get(value)
                event_dict[key] = masked if masked is not None else self.mask_text(value)
            elif kind is list or kind is dict:
                event_dict[key] = self._mask_flat(value, cache)
            elif kind is not int and kind is not float:
                event_dict[key] = self._mask(value, 0)
        return event_dict

    def _mask_flat(self, value: list[Any] | dict[Any, Any], cache: dict[str, str]) -> object:
        """`_mask` of a list or dict, inlined for the bound fields' shapes (``targets``, a
        list of strings; ``timing``, str keys to strings or None); anything else inside takes
        `_mask` for the whole container."""
        if isinstance(value, list):  # exactly a list: the caller checked the type
            items: list[Any] = []
            for item in value:
                kind = type(item)
                if kind is str:
                    masked = cache.get(item)
                    items.append(masked if masked is not None else self.mask_text(item))
                elif item is None or kind is bool or kind is int or kind is float:
                    items.append(item)
                else:
                    return self._mask(value, 0)
            return items
        fields: dict[str, str | None] = {}
        key_cache = self._key_cache
        for key, item in value.items():
            kind = type(item)
            if type(key) is not str or not (kind is str or item is None):
                return self._mask(value, 0)
            if item is None:
                fields[key] = None  # never redacted, whatever the key
                continue
            secret = key_cache.get(key)
            if secret is None:
                secret = self.is_secret_key(key)
            if secret:
                fields[key] = REDACTED
            else:
                masked = cache.get(item)
                fields[key] = masked if masked is not None else self.mask_text(item)
        return fields

    # -- stdlib logging ---------------------------------------------------------------------

    def mask_record_fields(self, record: logging.LogRecord) -> None:
        """Mask ``record`` in place: message and args, ``extra=`` fields, exception/stack text.

        Dict messages are structlog events (from ``ProcessorFormatter.wrap_for_formatter``)
        and are masked as mappings so the formatter can still render them.
        """
        if isinstance(record.msg, Mapping):
            record.msg = self.mask(record.msg)
        else:
            record.msg = self.mask_text(record.getMessage())
            record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_RECORD_KEYS and key not in _PLUMBING_KEYS:
                record.__dict__[key] = self.mask_item(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask_text(record.stack_info)

    def mask_record(self, record: logging.LogRecord) -> logging.LogRecord:
        """Return a masked shallow copy of ``record``; the original is left untouched."""
        clone = copy.copy(record)
        self.mask_record_fields(clone)
        return clone


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_RECORD_KEYS: Final = frozenset(
    logging.LogRecord("n", 0, "p", 0, "m", None, None).__dict__
) | {"message", "asctime", "taskName"}


class MaskingFormatter(logging.Formatter):
    """A `logging.Formatter` whose output never contains a secret.

    The record is copied and masked (message and args, ``extra=`` fields, exception and stack
    text), formatted by ``inner`` (or by this formatter's own ``fmt``), and the complete
    formatted text -- traceback included -- is masked once more as free text.

    ``premask=False`` skips the record step, for an ``inner`` formatter that masks structured
    fields itself (the ``ProcessorFormatter`` chain built by ``configure_logging`` ends in
    `mask_processor`); the formatted text is masked regardless.
    """

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        *,
        inner: logging.Formatter | None = None,
        masker: Masker | None = None,
        premask: bool = True,
    ) -> None:
        super().__init__(fmt, datefmt)
        self._inner = inner
        self._masker = masker if masker is not None else default_masker()
        self._premask = premask

    def format(self, record: logging.LogRecord) -> str:
        """Mask the record, format it, then mask the formatted text."""
        safe = self._masker.mask_record(record) if self._premask else record
        text = self._inner.format(safe) if self._inner is not None else super().format(safe)
        return self._masker.mask_text(text)

    def formatException(self, ei: Any) -> str:
        """Format an exception and mask its text (messages, source lines, chained causes)."""
        return self._masker.mask_text(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        """Mask a rendered stack."""
        return self._masker.mask_text(super().formatStack(stack_info))


class MaskingFilter(logging.Filter):
    """Masks records in place; attach it to handlers this package does not own.

    For handlers with a plain `logging.Formatter`: exception text is pre-rendered (masked)
    into ``exc_text``, which such formatters print instead of re-formatting ``exc_info``.
    """

    def __init__(self, masker: Masker | None = None) -> None:
        super().__init__()
        self._masker = masker if masker is not None else default_masker()

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask ``record`` and let it through."""
        self._masker.mask_record_fields(record)
        return True


_DEFAULT_MASKER: Final = Masker()


def default_masker() -> Masker:
    """The process-wide masker behind the module-level functions and the log sink."""
    return _DEFAULT_MASKER


def register_secret(value: str) -> None:
    """Redact ``value`` in every log line from now on (see `Masker.register_secret`)."""
    _DEFAULT_MASKER.register_secret(value)


def unregister_secret(value: str) -> None:
    """Undo one `register_secret` of ``value``."""
    _DEFAULT_MASKER.unregister_secret(value)


@contextmanager
def registered_secrets(values: Iterable[str]) -> Iterator[None]:
    """Redact ``values`` while the ``with`` block runs (e.g. while a step uses them)."""
    with _DEFAULT_MASKER.registered_secrets(values):
        yield


@overload
def mask(value: str) -> str: ...
@overload
def mask(value: Mapping[str, Any]) -> dict[str, Any]: ...
@overload
def mask(value: object) -> object: ...


def mask(value: object) -> object:
    """Masked copy of ``value`` using the default masker."""
    return _DEFAULT_MASKER.mask(value)


def mask_text(text: str) -> str:
    """``text`` with secrets redacted, using the default masker."""
    return _DEFAULT_MASKER.mask_text(text)


def mask_processor(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor masking with the default masker; put it last before the renderer."""
    return _DEFAULT_MASKER.process_event(logger, method_name, event_dict)
