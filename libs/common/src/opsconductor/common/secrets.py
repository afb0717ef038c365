"""Secret references in plans, and their just-in-time resolution in the worker.

A plan never carries a secret value, only a reference, a JSON object with exactly one key::

    {"$secret": "env:DB_PASSWORD"}     the worker's environment variable OPSC_SECRET_DB_PASSWORD
    {"$secret": "file:db_password"}    the file db_password in the file provider's root directory

The reference syntax (``SecretRef``, ``parse_secret_ref``) is defined with the plan model in
``opsconductor.common.plan``, which rejects malformed references when a plan is parsed.

Two moments, two tools:

* **Submit (api):** ``secret_ref_violations`` / ``find_secret_refs`` check the references'
  syntax only. Nothing is resolved and no provider is consulted, so the api needs no access to
  any secret.
* **Run (worker):** just before a step runs, ``SecretResolver.resolve_params`` replaces the
  step's references by their values, and registers every value with the masker before handing
  them back, so a value that ends up in a log line, an event or a result is redacted.

**Resolved parameters must never be persisted**: callers keep them in memory for the duration of
the step (``ActionContext.params``) and store only the plan as submitted (with its references).

Providers are deliberately narrow, because a plan author chooses the reference and could
otherwise read any credential of the worker itself:

* ``env`` reads only variables named ``<prefix><NAME>`` (prefix ``OPSC_SECRET_`` by default, e.g.
  filled by a Kubernetes ``envFrom`` with that prefix), never the worker's own configuration.
* ``file`` reads only regular files whose real path (symlinks resolved) lies inside its root
  (default ``/var/run/secrets/opsconductor``, where Kubernetes Secrets are mounted), so ``..`` or
  a symlink cannot reach elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeGuard, runtime_checkable

from pydantic_settings import BaseSettings, SettingsConfigDict

from opsconductor.common.errors import FieldViolation, PlanValidationError, SecretResolutionError
from opsconductor.common.masking import DEFAULT_ALLOWED_KEYS, normalise_key, register_secret
from opsconductor.common.plan import SECRET_PROVIDERS, SECRET_REF_KEY, SecretRef, parse_secret_ref
from opsconductor.common.secret_patterns import credential_kind

__all__ = [
    "DEFAULT_ENV_PREFIX",
    "DEFAULT_FILE_ROOT",
    "KNOWN_PROVIDERS",
    "SECRET_KEY",
    "EnvSecretProvider",
    "FileSecretProvider",
    "SecretProvider",
    "SecretRef",
    "SecretResolver",
    "SecretsSettings",
    "find_secret_refs",
    "is_credential_key",
    "is_secret_ref",
    "literal_credential_violations",
    "secret_ref_violations",
]

#: The single key of a secret reference object (defined with the plan model).
SECRET_KEY = SECRET_REF_KEY
#: Providers this module implements.
KNOWN_PROVIDERS = SECRET_PROVIDERS
DEFAULT_ENV_PREFIX = "OPSC_SECRET_"
DEFAULT_FILE_ROOT = Path("/var/run/secrets/opsconductor")

#: Secrets are passwords, tokens and keys: anything larger is a mistake (a wrong file).
_MAX_SECRET_BYTES = 64 * 1024

#: A plan key (param or header name) containing one of these, once normalised (lower case,
#: separators and camelCase boundaries removed: ``X-Api-Key`` -> ``xapikey``), holds a
#: credential and must be a secret reference. Narrower than the log masker's denylist (which
#: also redacts ``key``, ``session``...): a plan refused for a harmless name is worse than a log
#: field redacted for one.
CREDENTIAL_KEY_SUBSTRINGS: tuple[str, ...] = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "accesskey",
    "authorization",
    "cookie",
    "credential",
)
#: Denylisted only as a whole word of the normalised key (``pwd`` yes, ``pwdir`` no).
CREDENTIAL_KEY_WORDS: frozenset[str] = frozenset({"pwd", "jwt", "sessionid"})
_NOT_CREDENTIAL_KEYS = frozenset(normalise_key(k) for k in DEFAULT_ALLOWED_KEYS)


def _parse(value: Mapping[str, Any]) -> SecretRef:
    """The reference ``value`` (known to have a ``$secret`` key) holds; ``ValueError`` if bad."""
    ref = parse_secret_ref(value)
    if ref is None:  # pragma: no cover - callers check is_secret_ref first
        raise ValueError(f"not a secret reference: no {SECRET_KEY!r} key")
    return ref


def is_secret_ref(value: object) -> TypeGuard[Mapping[str, Any]]:
    """Whether ``value`` is meant as a secret reference (an object with a ``$secret`` key).

    Shape only: a malformed reference is still one, so it is reported rather than passed on.
    """
    return isinstance(value, Mapping) and SECRET_KEY in value


def _walk_refs(value: object, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every (path, reference object) in a JSON value, depth first, in document order."""
    if is_secret_ref(value):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk_refs(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _walk_refs(item, f"{path}[{index}]")


def secret_ref_violations(params: object, *, path: str = "params") -> list[FieldViolation]:
    """Field violations for every malformed secret reference in ``params`` (syntax only)."""
    violations: list[FieldViolation] = []
    for where, candidate in _walk_refs(params, path):
        try:
            _parse(candidate)
        except ValueError as exc:
            violations.append(FieldViolation(where, str(exc)))
    return violations


def find_secret_refs(params: object, *, path: str = "params") -> list[tuple[str, SecretRef]]:
    """Every secret reference in ``params`` with its field path; for validation at submit.

    Raises ``PlanValidationError`` listing every malformed reference. Resolves nothing.
    """
    violations = secret_ref_violations(params, path=path)
    if violations:
        raise PlanValidationError(violations=violations)
    return [(where, _parse(ref)) for where, ref in _walk_refs(params, path)]


def is_credential_key(key: str) -> bool:
    """Whether a param or header named ``key`` must hold a secret reference, not a literal."""
    normalised = normalise_key(key)
    if normalised in _NOT_CREDENTIAL_KEYS:
        return False
    words = normalised.split("_")
    compact = "".join(words)
    return any(s in compact for s in CREDENTIAL_KEY_SUBSTRINGS) or any(
        w in CREDENTIAL_KEY_WORDS for w in words
    )


def literal_credential_violations(params: object, *, path: str = "params") -> list[FieldViolation]:
    """Credentials written into a plan instead of referenced (issue: plans are stored and read).

    Refused: any value under a credential key (`is_credential_key`, at any depth) that is not a
    secret reference (in a list or object under such a key, every leaf must be one; ``null``
    and booleans reveal nothing and pass), and any string anywhere that looks like a credential
    (`credential_kind`: ``Bearer <token>``, ``Basic <base64>``, a JWT, a PEM private key, an
    AWS key id, a password in a URL). Descriptions never quote the value.
    """
    found: list[FieldViolation] = []
    _walk_credentials(params, path, False, found)
    return found


def _walk_credentials(
    value: object, path: str, under_key: bool, found: list[FieldViolation]
) -> None:
    if is_secret_ref(value) or value is None or isinstance(value, bool):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            _walk_credentials(item, where, under_key or is_credential_key(str(key)), found)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _walk_credentials(item, f"{path}[{index}]", under_key, found)
    elif under_key:
        found.append(
            FieldViolation(
                path,
                f"names a credential, so it must be a secret reference like "
                f'{{"{SECRET_KEY}": "env:NAME"}}, not a literal value',
            )
        )
    elif isinstance(value, str) and (kind := credential_kind(value)) is not None:
        found.append(
            FieldViolation(
                path,
                f"contains what looks like {kind}; pass credentials as a secret reference "
                f'like {{"{SECRET_KEY}": "env:NAME"}} in a field of their own',
            )
        )


@runtime_checkable
class SecretProvider(Protocol):
    """Looks a secret up by name; raises ``SecretResolutionError`` naming only the reference."""

    @property
    def name(self) -> str:
        """The provider part of references this provider resolves (``env``, ``file``)."""
        ...

    def fetch(self, ref: SecretRef) -> str:
        """The secret value ``ref`` names."""
        ...


class EnvSecretProvider:
    """Secrets from environment variables ``<prefix><NAME>`` (mounted Kubernetes Secrets).

    The prefix keeps the worker's own configuration (database URL, signing keys) out of reach
    of plan authors. ``environ`` defaults to the live process environment: this provider is,
    with settings classes, the one sanctioned reader of secret-bearing variables.
    """

    name: ClassVar[str] = "env"

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, prefix: str = DEFAULT_ENV_PREFIX
    ) -> None:
        self._environ = environ
        self._prefix = prefix

    def fetch(self, ref: SecretRef) -> str:
        """The value of ``<prefix><ref.name>``."""
        environ = os.environ if self._environ is None else self._environ
        value = environ.get(self._prefix + ref.name)
        if value is None:
            raise SecretResolutionError(
                f"secret {ref} could not be resolved: environment variable "
                f"{self._prefix}{ref.name} is not set",
                secret_ref=str(ref),
            )
        return value


class FileSecretProvider:
    """Secrets from files under one root directory (Kubernetes Secret volumes).

    Names are file names in the root. The real path (symlinks resolved) must lie inside the
    root's real path. One trailing newline is stripped, since files written by ``echo`` or
    editors end with one and a password never does.
    """

    name: ClassVar[str] = "file"

    def __init__(self, root: Path | str = DEFAULT_FILE_ROOT) -> None:
        self._root = Path(root)

    def fetch(self, ref: SecretRef) -> str:
        """The text of the file ``ref`` names, if it is inside the root."""
        root = self._root.resolve()
        try:
            # plan.py already allows only one path segment; resolving and checking containment
            # again here also stops a symlink planted inside the root from pointing outside it.
            path = (root / ref.name).resolve(strict=True)
        except (ValueError, OSError, RuntimeError) as exc:
            raise self._error(ref, "no such file inside the secrets root") from exc
        if not path.is_relative_to(root):
            raise self._error(ref, "the path is outside the secrets root")
        try:
            if not path.is_file():
                raise self._error(ref, "not a regular file")
            with path.open("rb") as handle:
                data = handle.read(_MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise self._error(ref, "the file cannot be read") from exc
        if len(data) > _MAX_SECRET_BYTES:
            raise self._error(ref, f"the file is larger than {_MAX_SECRET_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            # Not chained: the codec's message quotes bytes of the value.
            raise self._error(ref, "the file is not UTF-8 text") from None
        return text.removesuffix("\n").removesuffix("\r")

    @staticmethod
    def _error(ref: SecretRef, why: str) -> SecretResolutionError:
        return SecretResolutionError(
            f"secret {ref} could not be resolved: {why}", secret_ref=str(ref)
        )


class SecretsSettings(BaseSettings):
    """Secret provider configuration, from ``OPSC_SECRETS_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="OPSC_SECRETS_", frozen=True, extra="ignore")

    #: Enabled providers; a reference to a disabled one fails to resolve.
    providers: tuple[str, ...] = ("env", "file")
    #: Prefix of the environment variables the ``env`` provider may read.
    env_prefix: str = DEFAULT_ENV_PREFIX
    #: Directory the ``file`` provider is confined to.
    file_root: Path = DEFAULT_FILE_ROOT


class SecretResolver:
    """Replaces secret references by their values just in time, registering them for masking."""

    def __init__(self, providers: Iterable[SecretProvider]) -> None:
        self._providers: dict[str, SecretProvider] = {p.name: p for p in providers}

    @classmethod
    def from_settings(cls, settings: SecretsSettings) -> SecretResolver:
        """The resolver with the providers ``settings`` enables (unknown names are ignored)."""
        available: dict[str, SecretProvider] = {
            "env": EnvSecretProvider(prefix=settings.env_prefix),
            "file": FileSecretProvider(settings.file_root),
        }
        return cls(available[name] for name in settings.providers if name in available)

    @property
    def provider_names(self) -> frozenset[str]:
        """Names of the enabled providers."""
        return frozenset(self._providers)

    def resolve(self, ref: SecretRef) -> str:
        """The value of one reference (not registered with the masker: prefer resolve_params)."""
        provider = self._providers.get(ref.provider)
        if provider is None:
            raise SecretResolutionError(
                f"secret {ref} could not be resolved: provider {ref.provider!r} is not enabled",
                secret_ref=str(ref),
            )
        value = provider.fetch(ref)
        if not value:
            # An empty secret is a misconfiguration, and masking "" would mean nothing.
            raise SecretResolutionError(
                f"secret {ref} could not be resolved: it is empty", secret_ref=str(ref)
            )
        return value

    def resolve_params(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """A copy of ``params`` with every reference replaced by its value, and the values.

        Every value is registered with the masker before this returns, so it is redacted from
        logs even if the caller fails right after. The returned dict holds secrets: keep it in
        memory for the step only, never persist or log it. Raises ``SecretResolutionError``
        (naming the reference and its field, never a value) for a malformed reference, a
        disabled provider or a missing secret.
        """
        values: list[str] = []
        resolved = self._replace(params, "params", values)
        return resolved, values

    def _replace(self, value: Any, path: str, values: list[str]) -> Any:
        if is_secret_ref(value):
            try:
                ref = _parse(value)
            except ValueError as exc:
                raise SecretResolutionError(
                    f"malformed secret reference at {path}: {exc}", field=path
                ) from exc
            try:
                secret = self.resolve(ref)
            except SecretResolutionError as exc:
                exc.details.setdefault("field", path)
                raise
            if secret not in values:
                # Registered at once: even if a later reference fails, this one is masked.
                register_secret(secret)
                values.append(secret)
            return secret
        if isinstance(value, Mapping):
            return {
                key: self._replace(item, f"{path}.{key}", values) for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._replace(item, f"{path}[{i}]", values) for i, item in enumerate(value)]
        return value
