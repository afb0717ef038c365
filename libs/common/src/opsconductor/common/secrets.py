"""Secret references in plans, and their just-in-time resolution in the worker.

A plan never carries a secret value, only a reference, a JSON object with exactly one key,
naming a secret *in the submitting tenant's namespace* (tenant ``acme`` below)::

    {"$secret": "env:DB_PASSWORD"}     the environment variable OPSC_SECRET_ACME__DB_PASSWORD
    {"$secret": "file:db_password"}    the file <root>/acme/db_password

The reference syntax (``SecretRef``, ``parse_secret_ref``) is defined with the plan model in
``opsconductor.common.plan``, which rejects malformed references when a plan is parsed. Where a
secret may be used is the secret catalogue's business (``secret_catalogue``, with the mapping of
tenant ids to namespaces).

Two moments, two tools:

* **Submit (api):** ``secret_ref_violations`` / ``find_secret_refs`` check the references'
  syntax, ``literal_credential_violations`` refuses credentials written into a plan, and
  ``policy_enforcement.enforce_secret_uses`` checks every use against the catalogue. Nothing is
  resolved and no provider is consulted, so the api needs no access to any secret.
* **Run (worker):** just before a step runs, ``SecretResolver.resolve_params`` checks each
  reference against the catalogue again, replaces it by its value (at least
  ``MIN_SECRET_LENGTH`` characters), and registers every value with the masker before handing
  them back, so a value that ends up in a log line, an event or a result is redacted.

**Resolved parameters must never be persisted**: callers keep them in memory for the duration of
the step (``ActionContext.params``) and store only the plan as submitted (with its references).

Providers are deliberately narrow, because a plan author chooses the reference and could
otherwise read any credential of the worker itself or of another tenant:

* ``env`` reads only variables named ``<prefix><NS>__<NAME>`` (prefix ``OPSC_SECRET_`` by
  default, e.g. filled by a Kubernetes ``envFrom`` with that prefix), never the worker's own
  configuration nor another tenant's namespace.
* ``file`` reads only regular files whose real path (symlinks resolved) lies inside
  ``<root>/<tenant>`` (root default ``/var/run/secrets/opsconductor``, where Kubernetes Secrets
  are mounted), so ``..`` or a symlink cannot reach elsewhere.

A secret that is not catalogued for this use, not set, or in a disabled provider gets one and
the same answer (`unavailable_error`), which never quotes a value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeGuard, runtime_checkable

import structlog
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsconductor.common.errors import FieldViolation, PlanValidationError, SecretResolutionError
from opsconductor.common.identifiers import is_valid_tenant_id
from opsconductor.common.masking import DEFAULT_ALLOWED_KEYS, normalise_key, register_secret
from opsconductor.common.plan import SECRET_PROVIDERS, SECRET_REF_KEY, SecretRef, parse_secret_ref
from opsconductor.common.secret_catalogue import SecretCatalogue, env_namespace
from opsconductor.common.secret_patterns import credential_kind

__all__ = [
    "DEFAULT_ENV_PREFIX",
    "DEFAULT_FILE_ROOT",
    "KNOWN_PROVIDERS",
    "MIN_SECRET_LENGTH",
    "SECRET_KEY",
    "EnvSecretProvider",
    "FileSecretProvider",
    "SecretProvider",
    "SecretRef",
    "SecretResolver",
    "SecretUse",
    "SecretsSettings",
    "find_secret_refs",
    "is_credential_key",
    "is_secret_ref",
    "literal_credential_violations",
    "secret_ref_violations",
    "unavailable_error",
]

#: The single key of a secret reference object (defined with the plan model).
SECRET_KEY = SECRET_REF_KEY
#: Providers this module implements.
KNOWN_PROVIDERS = SECRET_PROVIDERS
DEFAULT_ENV_PREFIX = "OPSC_SECRET_"
DEFAULT_FILE_ROOT = Path("/var/run/secrets/opsconductor")

log = structlog.get_logger(__name__)

#: Shorter secrets are refused at resolution: guessable, and masking them would redact common
#: substrings everywhere (and which fragments got redacted would reveal them).
MIN_SECRET_LENGTH = 8
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


@dataclass(frozen=True)
class SecretUse:
    """Who uses a step's secrets for what: the catalogue decides on exactly this."""

    tenant_id: str
    action: str
    #: The URL of an ``http`` step, the program of a ``shell`` step, None for other actions.
    destination: str | None = None


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
    """Looks a secret up by tenant and name; raises `SecretUnavailable` naming nothing."""

    @property
    def name(self) -> str:
        """The provider part of references this provider resolves (``env``, ``file``)."""
        ...

    def fetch(self, tenant_id: str, ref: SecretRef) -> str:
        """The value ``ref`` names in ``tenant_id``'s namespace."""
        ...


class SecretUnavailable(Exception):
    """A provider has no such secret for this tenant; ``why`` is for the operator's log only."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class EnvSecretProvider:
    """Secrets from environment variables ``<prefix><NS>__<NAME>`` (mounted Kubernetes Secrets).

    ``NS`` is the tenant's namespace (`env_namespace`): a tenant reads only its own variables.
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

    def variable(self, tenant_id: str, ref: SecretRef) -> str | None:
        """The variable holding ``ref`` for ``tenant_id`` (None: the tenant has no namespace)."""
        namespace = env_namespace(tenant_id)
        return None if namespace is None else f"{self._prefix}{namespace}__{ref.name}"

    def fetch(self, tenant_id: str, ref: SecretRef) -> str:
        """The value of ``<prefix><NS>__<ref.name>``."""
        variable = self.variable(tenant_id, ref)
        if variable is None:
            raise SecretUnavailable("the tenant id has no environment namespace")
        environ = os.environ if self._environ is None else self._environ
        value = environ.get(variable)
        if value is None:
            raise SecretUnavailable(f"environment variable {variable} is not set")
        return value


class FileSecretProvider:
    """Secrets from files ``<root>/<tenant id>/<name>`` (Kubernetes Secret volumes).

    The real path (symlinks resolved) must lie inside the tenant's own directory, so neither
    ``..`` nor a symlink reaches another tenant's files or anything else. One trailing newline
    is stripped, since files written by ``echo`` or editors end with one and a password never
    does.
    """

    name: ClassVar[str] = "file"

    def __init__(self, root: Path | str = DEFAULT_FILE_ROOT) -> None:
        self._root = Path(root)

    def fetch(self, tenant_id: str, ref: SecretRef) -> str:
        """The text of the file ``ref`` names, if it is inside the tenant's directory."""
        if not is_valid_tenant_id(tenant_id):
            raise SecretUnavailable("the tenant id is not a directory name")
        try:
            home = (self._root / tenant_id).resolve(strict=True)
            # plan.py already allows only one path segment; resolving and checking containment
            # again here also stops a symlink planted inside the folder from pointing outside.
            path = (home / ref.name).resolve(strict=True)
        except (ValueError, OSError, RuntimeError):
            raise SecretUnavailable("no such file in the tenant's secrets folder") from None
        if not path.is_relative_to(home) or not home.is_relative_to(self._root.resolve()):
            raise SecretUnavailable("the path leaves the tenant's secrets folder")
        try:
            if not path.is_file():
                raise SecretUnavailable("not a regular file")
            with path.open("rb") as handle:
                data = handle.read(_MAX_SECRET_BYTES + 1)
        except OSError:
            raise SecretUnavailable("the file cannot be read") from None
        if len(data) > _MAX_SECRET_BYTES:
            raise SecretResolutionError(
                f"secret {ref} is not usable: larger than {_MAX_SECRET_BYTES} bytes",
                secret_ref=str(ref),
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            # Not chained, not quoted: the codec's message shows bytes of the value.
            raise SecretResolutionError(
                f"secret {ref} is not usable: not UTF-8 text", secret_ref=str(ref)
            ) from None
        return text.removesuffix("\n").removesuffix("\r")


class SecretsSettings(BaseSettings):
    """Secret provider configuration, from ``OPSC_SECRETS_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="OPSC_SECRETS_", frozen=True, extra="ignore")

    #: Enabled providers; a reference to a disabled one fails to resolve.
    providers: tuple[str, ...] = ("env", "file")
    #: Prefix of the environment variables the ``env`` provider may read.
    env_prefix: str = DEFAULT_ENV_PREFIX
    #: Directory the ``file`` provider is confined to (one folder per tenant inside).
    file_root: Path = DEFAULT_FILE_ROOT
    #: The secret catalogue (``secret_catalogue``); without one no secret may be used.
    catalogue_file: Path | None = None

    def catalogue(self) -> SecretCatalogue:
        """The catalogue ``catalogue_file`` holds (``SecretCatalogueError`` if invalid)."""
        return SecretCatalogue.load(self.catalogue_file)


def unavailable_error(ref: SecretRef, path: str) -> SecretResolutionError:
    """The one answer for a secret that is not allowed here, not catalogued or not set.

    Identical in every case (and at submit: ``policy_enforcement``), so a caller cannot tell
    whether a secret exists; the true cause goes to the worker's log only.
    """
    return SecretResolutionError(
        f"secret {ref} at {path} is not available to this step: the tenant's secret catalogue "
        "must allow it for this action and destination, and it must be set in the tenant's "
        "namespace",
        secret_ref=str(ref),
        field=path,
    )


class SecretResolver:
    """Replaces secret references by their values just in time, registering them for masking.

    Every reference is checked against ``catalogue`` (default: empty, nothing allowed) for the
    step's tenant, action and destination before any provider is asked.
    """

    def __init__(
        self, providers: Iterable[SecretProvider], catalogue: SecretCatalogue | None = None
    ) -> None:
        self._providers: dict[str, SecretProvider] = {p.name: p for p in providers}
        self._catalogue = catalogue if catalogue is not None else SecretCatalogue.empty()

    @classmethod
    def from_settings(cls, settings: SecretsSettings) -> SecretResolver:
        """The resolver with the providers ``settings`` enables and its catalogue."""
        available: dict[str, SecretProvider] = {
            "env": EnvSecretProvider(prefix=settings.env_prefix),
            "file": FileSecretProvider(settings.file_root),
        }
        return cls(
            (available[name] for name in settings.providers if name in available),
            settings.catalogue(),
        )

    @property
    def provider_names(self) -> frozenset[str]:
        """Names of the enabled providers."""
        return frozenset(self._providers)

    @property
    def catalogue(self) -> SecretCatalogue:
        """The catalogue every reference is checked against."""
        return self._catalogue

    def resolve(self, use: SecretUse, ref: SecretRef, *, path: str = "params") -> str:
        """The value of one reference (not registered with the masker: prefer resolve_params)."""
        provider = self._providers.get(ref.provider)
        try:
            if not self._catalogue.allows(use.tenant_id, ref, use.action, use.destination):
                raise SecretUnavailable("the secret catalogue does not allow this use")
            if provider is None:
                raise SecretUnavailable(f"provider {ref.provider!r} is not enabled")
            value = provider.fetch(use.tenant_id, ref)
        except SecretUnavailable as exc:
            log.warning(
                "secret_unavailable",
                tenant_id=use.tenant_id,
                secret_ref=str(ref),
                action=use.action,
                field=path,
                why=exc.why,
            )
            raise unavailable_error(ref, path) from None
        if len(value) < MIN_SECRET_LENGTH:
            # Short values cannot be masked safely (and are guessable): a misconfiguration.
            raise SecretResolutionError(
                f"secret {ref} at {path} is not usable: shorter than {MIN_SECRET_LENGTH} "
                "characters",
                secret_ref=str(ref),
                field=path,
            )
        return value

    def resolve_params(
        self, params: Mapping[str, Any], use: SecretUse
    ) -> tuple[dict[str, Any], list[str]]:
        """A copy of ``params`` with every reference replaced by its value, and the values.

        ``use`` says who (tenant) uses them for what (action, destination). Every value is
        registered with the masker before this returns, so it is redacted from logs even if
        the caller fails right after. The returned dict holds secrets: keep it in memory for the
        step only, never persist or log it. Raises ``SecretResolutionError`` (naming the
        reference and its field, never a value) for a malformed reference or a secret that is
        not available (`unavailable_error`) or too short.
        """
        values: list[str] = []
        resolved = self._replace(params, "params", values, use)
        return resolved, values

    def _replace(self, value: Any, path: str, values: list[str], use: SecretUse) -> Any:
        if is_secret_ref(value):
            try:
                ref = _parse(value)
            except ValueError as exc:
                raise SecretResolutionError(
                    f"malformed secret reference at {path}: {exc}", field=path
                ) from exc
            secret = self.resolve(use, ref, path=path)
            if secret not in values:
                # Registered at once: even if a later reference fails, this one is masked.
                register_secret(secret)
                values.append(secret)
            return secret
        if isinstance(value, Mapping):
            return {
                key: self._replace(item, f"{path}.{key}", values, use)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [
                self._replace(item, f"{path}[{i}]", values, use) for i, item in enumerate(value)
            ]
        return value
