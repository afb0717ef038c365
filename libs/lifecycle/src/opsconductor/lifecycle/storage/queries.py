"""The lifecycle core's SQL statements, by name, read once from the package's ``sql/*.sql`` files.

Each file holds named blocks in procrastinate's style::

    -- name: retire_idempotency_keys
    -- Retire the keys of terminal executions past the dedup window, one batch (reaper).
    WITH due AS (...)

A block runs from its ``-- name:`` line to the next one; the comment lines right after the name
say why it exists and are not sent. Names are unique across files. A duplicate name, an empty
block, a malformed ``-- name`` line or a statement before the first name fails at import, and
:func:`query` of an unknown name raises ``KeyError``; every caller looks its statements up at
module level, so a typo fails as soon as its module is imported. ``tests/unit/test_sql_queries.py``
checks that every name is used by code and every name used exists. Another package with SQL of
its own (``opsconductor.devstack``) loads its ``sql/`` folder with :func:`load` the same way.

Why not aiosql (the maintained library for this file format): it turns each block into a
generated function (``queries.name(conn, **params)``) with its own parameter syntax (``:name``),
result operators (``^``, ``$``, ``!``) and calls the driver itself. Our storage calls asyncpg
directly (``conn.fetchrow(sql, *args)``, with positional ``$n`` parameters, in the caller's
transaction, and some statements composed from fixed parts), so what it needs is the text by
name: a loader of a few lines, no dependency and no second way of calling the database.
"""

from __future__ import annotations

import re
from importlib import resources
from types import MappingProxyType

__all__ = ["QUERIES", "load", "lookup", "parse", "query"]

_NAME = re.compile(r"^-- name: ([a-z][a-z0-9_]*)\s*$")


def parse(text: str, source: str = "<sql>") -> dict[str, str]:
    """The named statements of one file's ``text``; ValueError on anything malformed."""
    found: dict[str, str] = {}
    name: str | None = None
    body: list[str] = []
    describing = False

    def close() -> None:
        if name is None:
            return
        statement = "\n".join(body).strip()
        if not statement:
            raise ValueError(f"{source}: query {name!r} is empty")
        found[name] = statement + "\n"

    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("-- name"):
            match = _NAME.match(line)
            if match is None:
                raise ValueError(f"{source}:{number}: malformed name line {line!r}")
            close()
            name, body, describing = match[1], [], True
            if name in found:
                raise ValueError(f"{source}:{number}: query {name!r} defined twice")
        elif name is None:
            # Before the first name: a file's own header comment, nothing else.
            if line.strip() and not line.startswith("--"):
                raise ValueError(f"{source}:{number}: statement before the first '-- name:'")
        elif describing and line.startswith("--"):
            continue  # the block's description: documentation, not sent to Postgres
        else:
            describing = False
            body.append(line)
    close()
    return found


def load(package: str) -> MappingProxyType[str, str]:
    """Every named statement of ``package``'s ``sql/*.sql`` files (its package data)."""
    found: dict[str, str] = {}
    folder = resources.files(package) / "sql"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for name, statement in parse(entry.read_text(encoding="utf-8"), entry.name).items():
            if name in found:
                raise ValueError(f"{entry.name}: query {name!r} is also defined in another file")
            found[name] = statement
    return MappingProxyType(found)


def lookup(queries: MappingProxyType[str, str], name: str, package: str) -> str:
    """``queries[name]``; KeyError saying which name and which package when there is none."""
    try:
        return queries[name]
    except KeyError:
        raise KeyError(f"no SQL query named {name!r} in {package}'s sql/*.sql") from None


#: Every named statement of the lifecycle core, loaded once at import.
QUERIES = load("opsconductor.lifecycle")


def query(name: str) -> str:
    """The lifecycle statement called ``name``; KeyError (with the name) when there is none."""
    return lookup(QUERIES, name, "opsconductor.lifecycle")
