"""Where ``opsctl`` connects and as whom: flags, then the environment, then a config context.

The config file (``~/.config/opsctl/config.toml``, or ``$OPSC_CONFIG``) holds named contexts,
as kubectl's kubeconfig does::

    current-context = "dev"

    [contexts.dev]
    api = "127.0.0.1:50051"
    approvals = "127.0.0.1:50053"
    progress = "127.0.0.1:50054"
    tenant = "dev"
    token-file = "~/.config/opsctl/dev.token"   # or token = "..."

    [contexts.prod]
    api = "api.opsc.example.com:443"
    tenant = "_system"
    ca-file = "/etc/opsc/ca.crt"
    server-name = "api.opsc.svc"

Each setting is taken from the first of: the command-line flag, its environment variable
(:data:`ENV`), the selected context (``--context``, ``$OPSC_CONTEXT`` or ``current-context``),
the default. A missing config file is fine; a broken one, or a context that does not exist, is
a :class:`ConfigError` naming the file and the problem.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from opsconductor.client.tls import ClientTls

__all__ = ["DEFAULTS", "ENV", "ConfigError", "Connection", "default_config_path", "resolve"]

#: Environment variable of each setting.
ENV: Final = {
    "api": "OPSC_API_ADDR",
    "approvals": "OPSC_APPROVALS_ADDR",
    "progress": "OPSC_PROGRESS_ADDR",
    "token": "OPSC_TOKEN",
    "token-file": "OPSC_TOKEN_FILE",
    "tenant": "OPSC_TENANT",
    "timeout": "OPSC_TIMEOUT",
    "ca-file": "OPSC_CA_FILE",
    "cert-file": "OPSC_CLIENT_CERT_FILE",
    "key-file": "OPSC_CLIENT_KEY_FILE",
    "server-name": "OPSC_SERVER_NAME",
}

#: The ``make run`` stack on this machine.
DEFAULTS: Final = {
    "api": "127.0.0.1:50051",
    "approvals": "127.0.0.1:50053",
    "progress": "127.0.0.1:50054",
    "timeout": "30",
}

_KNOWN: Final = frozenset(ENV)


class ConfigError(Exception):
    """The connection settings are incomplete or the config file cannot be used."""


@dataclass(frozen=True)
class Connection:
    """Everything a command needs to reach the services."""

    api: str
    approvals: str
    progress: str
    token: str | None
    tenant: str | None
    timeout_s: float
    tls: ClientTls | None
    context: str | None

    def require_token(self) -> str:
        if not self.token:
            raise ConfigError(
                "no token: pass --token, set OPSC_TOKEN (or OPSC_TOKEN_FILE), or put token/"
                "token-file in the config context (opsctl token mints a development token)"
            )
        return self.token

    def require_tenant(self, override: str | None = None) -> str:
        tenant = override or self.tenant
        if not tenant:
            raise ConfigError("no tenant: pass --tenant, set OPSC_TENANT or set it in the context")
        return tenant


def default_config_path(env: Mapping[str, str]) -> Path:
    if env.get("OPSC_CONFIG"):
        return Path(env["OPSC_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")) / ".config")
    return Path(base).expanduser() / "opsctl" / "config.toml"


def _load_context(path: Path, name: str | None) -> tuple[str | None, dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        if name:
            raise ConfigError(f"context {name!r} requested but {path} does not exist") from None
        return None, {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    contexts = data.get("contexts", {})
    if not isinstance(contexts, dict):
        raise ConfigError(f"{path}: 'contexts' must be a table of named contexts")
    chosen = name or data.get("current-context")
    if chosen is None:
        return None, {}
    if not isinstance(chosen, str) or chosen not in contexts:
        known = ", ".join(sorted(contexts)) or "none"
        raise ConfigError(f"{path}: no context {chosen!r} (contexts: {known})")
    context = contexts[chosen]
    if not isinstance(context, dict):
        raise ConfigError(f"{path}: contexts.{chosen} must be a table")
    unknown = sorted(set(context) - _KNOWN)
    if unknown:
        raise ConfigError(
            f"{path}: contexts.{chosen} has unknown keys {unknown} (known: {sorted(_KNOWN)})"
        )
    return chosen, context


def _read_token_file(value: str) -> str:
    path = Path(value).expanduser()
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from None


def resolve(
    flags: Mapping[str, str | None],
    env: Mapping[str, str] | None = None,
    *,
    config_path: Path | None = None,
    context: str | None = None,
) -> Connection:
    """The connection from ``flags`` (setting → value or None), ``env`` and the config file."""
    env = os.environ if env is None else env
    path = config_path or default_config_path(env)
    name, ctx = _load_context(path, context or env.get("OPSC_CONTEXT") or None)

    def pick(key: str) -> str | None:
        for value in (flags.get(key), env.get(ENV[key]), ctx.get(key), DEFAULTS.get(key)):
            if value not in (None, ""):
                return str(value)
        return None

    token = pick("token")
    if token is None and (token_file := pick("token-file")):
        token = _read_token_file(token_file)
    timeout_text = pick("timeout") or DEFAULTS["timeout"]
    try:
        timeout_s = float(timeout_text)
    except ValueError:
        raise ConfigError(f"timeout must be a number of seconds, not {timeout_text!r}") from None
    if timeout_s <= 0:
        raise ConfigError("timeout must be positive")
    ca, cert, key, server_name = (
        pick(k) for k in ("ca-file", "cert-file", "key-file", "server-name")
    )
    tls = None
    if ca or cert or key or server_name:
        if (cert is None) != (key is None):
            raise ConfigError("a client certificate needs both cert-file and key-file")
        tls = ClientTls(ca_file=ca, cert_file=cert, key_file=key, server_name=server_name)
    return Connection(
        api=pick("api") or DEFAULTS["api"],
        approvals=pick("approvals") or DEFAULTS["approvals"],
        progress=pick("progress") or DEFAULTS["progress"],
        token=token,
        tenant=pick("tenant"),
        timeout_s=timeout_s,
        tls=tls,
        context=name,
    )
