"""Only the lifecycle core touches the queue's stores (issue 10's acceptance).

No service module writes ``execution_queue``, ``execution_dlq`` or a Redis queue key except
through ``opsconductor.lifecycle``: a service sends no SQL of its own (every statement lives in
the lifecycle storage and queue modules), never holds a Redis client (it gets a
:class:`~opsconductor.lifecycle.queue.redis_queue.RedisQueue` from ``open_queue``) and never
builds or reads a queue key. The scan reads each module's syntax tree, so docstrings and comments
that name the tables do not count, and the checks are themselves tested against offending code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE_MODULES = sorted(ROOT.glob("services/*/src/**/*.py"))

#: A string that starts like a SQL statement (asyncpg takes each as one).
_SQL = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|MERGE|TRUNCATE|COPY|LOCK|NOTIFY|LISTEN|CALL)\b",
    re.IGNORECASE,
)
_QUEUE_TABLE = re.compile(r"\bexecution_(queue|dlq)\b", re.IGNORECASE)
#: What only the lifecycle core may hold: the Redis client and the queue's key layout.
_REDIS_MODULES = ("redis",)
_CORE_ONLY_NAMES = {"create_redis_client", "KEY_VERSION", "DEFAULT_PREFIX"}
_CORE_ONLY_ATTRIBUTES = {"_redis", "key_prefix", "job_key", "wake_channel", "_keys", "_scripts"}
#: The version segment of every queue key (``{prefix}q:v2:...``).
_QUEUE_KEY = re.compile(r"\bq:v\d+:")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose, not statements)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal that is not a docstring; an f-string as its literal parts joined."""
    skip = _docstrings(tree)
    inner: set[int] = set()
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = [v for v in node.values if isinstance(v, ast.Constant)]
            inner.update(id(v) for v in parts)
            out.append((node.lineno, "".join(str(v.value) for v in parts)))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in skip
            and id(node) not in inner
        ):
            out.append((node.lineno, node.value))
    return out


def offences(source: str) -> list[str]:
    """What in ``source`` reaches the queue's stores (or any SQL) around the lifecycle core."""
    tree = ast.parse(source)
    found: list[str] = []
    for line, text in _strings(tree):
        if _SQL.match(text):
            kind = "queue-table SQL" if _QUEUE_TABLE.search(text) else "SQL"
            found.append(f"line {line}: {kind} {text.strip().splitlines()[0][:60]!r}")
        elif _QUEUE_KEY.search(text):
            found.append(f"line {line}: Redis queue key {text[:60]!r}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for module in modules:
                if module.split(".")[0] in _REDIS_MODULES:
                    found.append(f"line {node.lineno}: imports the Redis client ({module})")
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name in _CORE_ONLY_NAMES:
                        found.append(f"line {node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in _CORE_ONLY_ATTRIBUTES:
            found.append(f"line {node.lineno}: uses the queue's .{node.attr}")
    return found


def test_service_modules_are_found() -> None:
    # The glob must keep matching the services' layout, or the scan below checks nothing.
    names = {p.relative_to(ROOT).parts[1] for p in SERVICE_MODULES}
    assert names == {"api", "approvals", "progress", "worker"}
    assert len(SERVICE_MODULES) > 40


@pytest.mark.parametrize("path", SERVICE_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_service_module_reaches_queue_only_through_the_core(path: Path) -> None:
    assert offences(path.read_text()) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('await conn.execute("DELETE FROM execution_queue WHERE id = $1", job_id)', "queue-table"),
        (
            'q = """\n  INSERT INTO execution_dlq (execution_id) VALUES ($1)"""\nawait c.fetch(q)',
            "queue-table",
        ),
        ('sql = f"UPDATE execution_queue SET attempts = {n}"', "queue-table"),
        ('await pool.fetchrow("SELECT * FROM executions WHERE id = $1", eid)', "SQL"),
        ("from redis.asyncio import Redis", "Redis client"),
        ("import redis", "Redis client"),
        ("from opsconductor.lifecycle.queue.redis_queue import create_redis_client", "imports"),
        ("await queue._redis.lpush('x', 1)", "._redis"),
        ("key = queue.job_key(job_id)", ".job_key"),
        ('key = f"{prefix}q:v2:ready:5"', "Redis queue key"),
    ],
)
def test_the_scan_catches_offenders(source: str, expected: str) -> None:
    found = offences(source)
    assert len(found) == 1, found
    assert expected in found[0]


def test_the_scan_ignores_prose() -> None:
    source = '''
"""Writes the execution_queue row. SELECT the job, then UPDATE execution_dlq."""


def f() -> None:
    """DELETE FROM execution_queue is the core's job."""
    log.info("job_removed", where="the core")  # DELETE FROM execution_queue
'''
    assert offences(source) == []
