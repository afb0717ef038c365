"""Which secrets each tenant has, and where each one may be used: the secret catalogue.

A ``$secret`` reference names a secret *inside the submitting tenant's namespace*; the
catalogue (operator-owned YAML, the file ``OPSC_SECRETS_CATALOGUE_FILE`` names, loaded at
startup by the api and the worker) declares, per tenant and per secret, the only uses allowed::

    tenants:
      acme:
        "env:DB_PASSWORD":                   # the reference as plans write it
          http:                              # the http action, to these destinations only:
            - db-admin.acme.example          #   a host name: any URL on that host
            - https://api.acme.example/v2/   #   a URL prefix: scheme, host, port and path
          shell: [/usr/bin/psql]             # the shell action, running exactly these programs
          actions: [db_migrate]              # other actions (plugins) that may receive it

Anything not listed is refused: at submit by the api (``PERMISSION_DENIED``, reason
``SECRET_USE_DENIED``, audited) and again by the worker before it resolves anything. A tenant
without an entry, a secret without an entry and an entry without this use are refused with the
same words, and the worker answers a secret that is allowed but not set with those words too,
so a caller cannot probe which secrets exist.

**Namespaces.** The ``env`` provider reads ``OPSC_SECRET_<NS>__<NAME>`` where ``NS`` is
`env_namespace` of the tenant id: upper-cased, ``.`` and ``-`` become ``_``. That mapping folds
some tenant ids together (``a-b``, ``a.b``, ``A_B``), so the catalogue refuses to load when two
of its tenants share a namespace, and a tenant whose namespace contains ``__`` or ends with
``_`` has none (``__`` separates the namespace from the name; without both rules two
(tenant, name) pairs could name one variable). A tenant that is not in the catalogue can use no
secret at all, so an uncatalogued tenant sharing a namespace with a catalogued one gains
nothing. The ``file`` provider reads ``<root>/<tenant id>/<name>`` (tenant ids are valid
directory names: no ``/``, never ``.`` or ``..``).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from opsconductor.common.errors import InvalidArgumentError
from opsconductor.common.identifiers import is_valid_tenant_id
from opsconductor.common.plan import SecretRef, parse_secret_ref

__all__ = [
    "SecretCatalogue",
    "SecretCatalogueError",
    "SecretGrant",
    "env_namespace",
    "normalise_url",
]

#: Actions whose destination the catalogue checks itself (they have lists of their own).
DESTINATION_ACTIONS: Final = frozenset({"http", "shell"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_HOST = re.compile(r"[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*")


class SecretCatalogueError(InvalidArgumentError):
    """The secret catalogue file is unreadable or invalid."""


def env_namespace(tenant_id: str) -> str | None:
    """The ``<NS>`` of ``tenant_id``'s environment variables, or None if it can have none.

    ``acme`` -> ``ACME``, ``team-a.prod`` -> ``TEAM_A_PROD``; ``a--b`` (``A__B``) and ``x_``
    have none (see the module docstring for why).
    """
    if not is_valid_tenant_id(tenant_id):
        return None
    namespace = tenant_id.upper().replace("-", "_").replace(".", "_")
    if "__" in namespace or namespace.endswith("_"):
        return None
    return namespace


def _host(name: str) -> str:
    return name.lower().removesuffix(".")


def normalise_url(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of an http(s) URL for prefix matching; None if unusable.

    Dot segments are removed (``/a/../b`` is ``/b``, as clients send it); a path with an
    encoded dot, slash or backslash (``%2e``, ``%2f``, ``%5c``) is unusable: servers decode
    those differently, so no prefix can be trusted to contain it.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    path = parts.path or "/"
    lowered = path.lower()
    if any(code in lowered for code in ("%2e", "%2f", "%5c")) or "\\" in path:
        return None
    normal = posixpath.normpath(path)
    if path.endswith("/") and not normal.endswith("/"):
        normal += "/"
    normal = "/" + normal.lstrip("/")  # normpath keeps a leading "//"
    return scheme, _host(host), port or _DEFAULT_PORTS[scheme], normal


def _path_within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


class SecretGrant(BaseModel):
    """Where one secret may be used (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    http: tuple[str, ...] = ()
    shell: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()

    @field_validator("http")
    @classmethod
    def _check_http(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if "://" in entry:
                if normalise_url(entry) is None or urlsplit(entry).query:
                    raise ValueError(f"{entry!r} is not an http(s) URL prefix without a query")
            elif not _HOST.fullmatch(_host(entry)):
                raise ValueError(f"{entry!r} is not a host name (or a URL prefix with ://)")
        return value

    @field_validator("shell")
    @classmethod
    def _check_shell(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/") or posixpath.normpath(path) != path:
                raise ValueError(f"{path!r} is not a normalised absolute path")
        return value

    @field_validator("actions")
    @classmethod
    def _check_actions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for action in value:
            if action in DESTINATION_ACTIONS:
                raise ValueError(f"{action!r} has its own destination list; use {action}: [...]")
        return value

    def allows(self, action: str, destination: str | None) -> bool:
        """Whether ``action`` may receive the secret for ``destination`` (URL, program)."""
        if action == "shell":
            return destination is not None and destination in self.shell
        if action != "http":
            return action in self.actions
        target = normalise_url(destination) if destination is not None else None
        if target is None:
            return False
        scheme, host, port, path = target
        for entry in self.http:
            if "://" not in entry:
                if _host(entry) == host:
                    return True
                continue
            prefix = normalise_url(entry)
            if (
                prefix is not None
                and prefix[:3] == (scheme, host, port)
                and _path_within(path, prefix[3])
            ):
                return True
        return False


class SecretCatalogue:
    """Every tenant's secrets and their allowed uses, from one document (module docstring)."""

    def __init__(self, tenants: Mapping[str, Mapping[SecretRef, SecretGrant]]) -> None:
        self._tenants = {tenant: dict(grants) for tenant, grants in tenants.items()}

    @classmethod
    def empty(cls) -> SecretCatalogue:
        """No tenant may use any secret (the default without a catalogue file)."""
        return cls({})

    @classmethod
    def from_document(cls, doc: object, source: str = "<secret catalogue>") -> SecretCatalogue:
        """Validate ``doc`` (the parsed YAML); ``SecretCatalogueError`` names what is wrong."""
        if doc is None:
            doc = {}
        if not isinstance(doc, Mapping) or set(doc) - {"tenants"}:
            raise SecretCatalogueError(f"{source}: expected a mapping with 'tenants'")
        tenants_doc = doc.get("tenants") or {}
        if not isinstance(tenants_doc, Mapping):
            raise SecretCatalogueError(f"{source}: 'tenants' must be a mapping")
        tenants: dict[str, dict[SecretRef, SecretGrant]] = {}
        namespaces: dict[str, str] = {}
        for tenant, secrets_doc in tenants_doc.items():
            where = f"{source}: tenants.{tenant}"
            if not isinstance(tenant, str) or not is_valid_tenant_id(tenant):
                raise SecretCatalogueError(f"{where}: not a valid tenant id")
            namespace = env_namespace(tenant)
            if namespace is not None:
                other = namespaces.setdefault(namespace, tenant)
                if other != tenant:
                    raise SecretCatalogueError(
                        f"{where}: shares the environment namespace {namespace} with tenant "
                        f"{other}; rename one of them or keep one out of the catalogue"
                    )
            tenants[tenant] = cls._grants(where, secrets_doc)
        return cls(tenants)

    @staticmethod
    def _grants(where: str, secrets_doc: object) -> dict[SecretRef, SecretGrant]:
        if secrets_doc is None:
            return {}
        if not isinstance(secrets_doc, Mapping):
            raise SecretCatalogueError(f"{where}: must map secret references to their uses")
        grants: dict[SecretRef, SecretGrant] = {}
        for name, grant_doc in secrets_doc.items():
            try:
                ref = parse_secret_ref({"$secret": name})
            except ValueError as exc:
                raise SecretCatalogueError(f"{where}.{name}: {exc}") from None
            if ref is None:  # pragma: no cover - the key is always there
                continue
            try:
                grants[ref] = SecretGrant.model_validate(grant_doc or {})
            except ValidationError as exc:
                problem = "; ".join(
                    ".".join(str(p) for p in err["loc"]) + ": " + err["msg"] for err in exc.errors()
                )
                raise SecretCatalogueError(f"{where}.{name}: {problem}") from None
        return grants

    @classmethod
    def load(cls, path: Path | None) -> SecretCatalogue:
        """The catalogue in ``path``; the empty catalogue (nothing allowed) when None."""
        if path is None:
            return cls.empty()
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise SecretCatalogueError(
                f"cannot read secret catalogue {path}: {exc.strerror}"
            ) from None
        try:
            doc: Any = yaml.safe_load(text)
        except yaml.YAMLError:
            raise SecretCatalogueError(f"{path}: not valid YAML") from None
        return cls.from_document(doc, str(path))

    @property
    def tenants(self) -> frozenset[str]:
        """Tenants with an entry (the only ones that may use any secret)."""
        return frozenset(self._tenants)

    def allows(self, tenant_id: str, ref: SecretRef, action: str, destination: str | None) -> bool:
        """Whether a step of ``tenant_id`` running ``action`` for ``destination`` uses ``ref``."""
        grant = self._tenants.get(tenant_id, {}).get(ref)
        return grant is not None and grant.allows(action, destination)
