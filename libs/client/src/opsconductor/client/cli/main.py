"""``opsctl``: the operators' command line for OpsConductor Execution.

The command tree is built here (global connection options, ``--output``, shell completion) and
its commands live in :mod:`.executions` and :mod:`.operations`. :func:`main` is the console
script: whatever goes wrong ends as one line on stderr and an exit code of
:mod:`.exit_codes`, never a traceback (``OPSC_DEBUG=1`` shows one, for bug reports).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from click.shell_completion import get_completion_class

from opsconductor.client.cli import exit_codes
from opsconductor.client.cli.config import ConfigError, Connection, resolve
from opsconductor.client.cli.dev_token import DevKeyError
from opsconductor.client.cli.plan_file import PlanFileError
from opsconductor.client.cli.render import Output
from opsconductor.client.errors import RpcError
from opsconductor.contract.errors import OpsConductorError, PlanValidationError

__all__ = ["Cli", "cli", "main", "run_async"]

T = TypeVar("T")


@dataclass
class Cli:
    """What every command gets: the output and the (lazily resolved) connection settings."""

    out: Output
    flags: dict[str, str | None]
    context_name: str | None
    config_path: Path | None
    _connection: Connection | None = field(default=None, repr=False)

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = resolve(
                self.flags, config_path=self.config_path, context=self.context_name
            )
        return self._connection


pass_cli = click.make_pass_decorator(Cli)


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one command's coroutine to completion on a fresh event loop."""
    return asyncio.run(factory())


class _Group(click.Group):
    """Lists commands in the order they were added (the order of the help text)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="How results are printed (json: one document on stdout, for scripts).",
)
@click.option("--context", "context_name", help="Context of the config file to use.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file (default ~/.config/opsctl/config.toml, or $OPSC_CONFIG).",
)
@click.option("--api", help="ExecutionService/AdminService address [$OPSC_API_ADDR].")
@click.option("--approvals", help="ApprovalService address [$OPSC_APPROVALS_ADDR].")
@click.option("--progress", help="ProgressService address [$OPSC_PROGRESS_ADDR].")
@click.option("--token", help="Bearer token [$OPSC_TOKEN].")
@click.option("--token-file", help="File holding the bearer token [$OPSC_TOKEN_FILE].")
@click.option("--tenant", help="Tenant the commands act in [$OPSC_TENANT].")
@click.option("--timeout", help="Seconds each call may take [$OPSC_TIMEOUT, 30].")
@click.option("--ca-file", help="CA bundle verifying the services (turns TLS on) [$OPSC_CA_FILE].")
@click.option("--cert-file", help="Client certificate for mTLS [$OPSC_CLIENT_CERT_FILE].")
@click.option("--key-file", help="Client key for mTLS [$OPSC_CLIENT_KEY_FILE].")
@click.option("--server-name", help="Name expected in the services' certificates.")
@click.version_option(package_name="opsconductor-client", prog_name="opsctl")
@click.pass_context
def cli(
    ctx: click.Context,
    /,
    output: str,
    context_name: str | None,
    config_path: Path | None,
    **flags: str | None,
) -> None:
    """Operate OpsConductor Execution: submit and follow executions, decide approvals, work the
    dead-letter queue, drain dispatch and roll Stage E out (or back) with feature flags.

    Connection settings come from these options, the OPSC_* environment variables, or a context
    of ~/.config/opsctl/config.toml, in that order. Exit codes: 0 ok/succeeded, 1 error,
    2 bad usage or plan file, 3 failed, 4 cancelled, 5 timed out, 6 rejected, 7 watch gave up,
    8 mismatches found.
    """
    ctx.obj = Cli(
        out=Output(output),
        flags={key.replace("_", "-"): value for key, value in flags.items()},
        context_name=context_name,
        config_path=config_path,
    )


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(opsctl completion bash)"."""
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click knows every listed shell
        raise click.UsageError(f"no completion for {shell}")
    click.echo(cls(cli, {}, "opsctl", "_OPSCTL_COMPLETE").source())


def _register() -> None:
    # Imported here: the command modules import this one for ``cli``/``pass_cli``.
    from opsconductor.client.cli import executions, operations

    executions.register(cli)
    operations.register(cli)


_register()


def _describe(error: OpsConductorError) -> str:
    if isinstance(error, RpcError):
        code = str(error.details.get("code", ""))
        if code == "UNAVAILABLE":
            return f"cannot reach the service ({error.message.splitlines()[0]})"
        return f"{code or 'RPC_ERROR'}: {error.message.splitlines()[0]}"
    return f"{error.reason}: {error.message}"


def _fail(text: str, code: int) -> int:
    click.echo(f"opsctl: error: {' '.join(text.split())}", err=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run ``opsctl`` with ``argv``; returns the exit code (the console script exits with it)."""
    try:
        result = cli.main(args=argv, prog_name="opsctl", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.Abort:
        return _fail("interrupted", exit_codes.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        return _fail("interrupted", exit_codes.INTERRUPTED)
    except PlanFileError as exc:
        return _fail(str(exc), exit_codes.USAGE)
    except PlanValidationError as exc:
        where = "; ".join(str(v) for v in exc.violations[:5]) or exc.message
        return _fail(f"the service rejected the plan: {where}", exit_codes.USAGE)
    except (ConfigError, DevKeyError) as exc:
        return _fail(str(exc), exit_codes.USAGE)
    except OpsConductorError as exc:
        return _fail(_describe(exc), exit_codes.ERROR)
    except Exception as exc:
        if os.environ.get("OPSC_DEBUG"):
            raise
        return _fail(
            f"unexpected {type(exc).__name__}: {exc} (set OPSC_DEBUG=1 for a traceback)",
            exit_codes.ERROR,
        )
    return result if isinstance(result, int) else exit_codes.OK


def console_script() -> None:
    """Entry point of the ``opsctl`` console script."""
    sys.exit(main())
