"""The lifecycle core's named SQL (``opsconductor/lifecycle/sql/*.sql``, :mod:`.storage.queries`).

Every named statement is used by code and every name the code asks for exists (a typo fails
here, not in production); the loader refuses malformed files; the statements live in the
``.sql`` files, not in Python strings, except the ones composed at run time, each listed with
why; and a built (non-editable) wheel ships the files and its loader finds them.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from opsconductor.devstack import queries as devstack_queries
from opsconductor.lifecycle.storage import queries
from opsconductor.lifecycle.storage.events import EVENTS_CHANNEL
from opsconductor.lifecycle.storage.queries import QUERIES, parse, query

ROOT = Path(__file__).resolve().parents[2]
LIFECYCLE = ROOT / "libs/lifecycle"
SOURCES = sorted((LIFECYCLE / "src").rglob("*.py"))
SQL_DIR = LIFECYCLE / "src/opsconductor/lifecycle/sql"
DEVSTACK = ROOT / "libs/devstack/src/opsconductor/devstack"
#: Each package with named SQL: its sources, its sql/ folder and its loaded statements.
PACKAGES = {
    "lifecycle": (SOURCES, SQL_DIR, QUERIES),
    "devstack": (sorted(DEVSTACK.rglob("*.py")), DEVSTACK / "sql", devstack_queries.QUERIES),
}

#: A string that starts like a SQL statement or holds a clause of one.
_SQL = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|MERGE|TRUNCATE|COPY|LOCK|NOTIFY|LISTEN|CALL)\b"
    r"|\b(FROM|WHERE|RETURNING)\b"
)
#: Modules that still build SQL in Python, each with why it cannot be a fixed statement.
COMPOSED = {
    # transition(): the SET list names the caller's fields, and the lock release, the step
    # finish and the reaper's counter are CTEs added only when asked for.
    "libs/lifecycle/src/opsconductor/lifecycle/storage/executions.py": "the transition UPDATE",
}


def _names_used(sources: list[Path]) -> dict[str, list[str]]:
    """Each name passed to ``query(...)`` in ``sources``, with where."""
    used: dict[str, list[str]] = {}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "query"
            ):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            arg = node.args[0] if len(node.args) == 1 and not node.keywords else None
            # A literal name only: a computed one would hide a typo from this test.
            assert isinstance(arg, ast.Constant), where
            assert isinstance(arg.value, str), where
            used.setdefault(arg.value, []).append(where)
    return used


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_named_query_is_used_and_every_used_name_exists(package: str) -> None:
    sources, _, loaded = PACKAGES[package]
    used = _names_used(sources)
    assert sorted(set(used) - set(loaded)) == [], "names asked for that no .sql file defines"
    assert sorted(set(loaded) - set(used)) == [], "named queries no code uses"


def test_query_of_an_unknown_name_says_which() -> None:
    with pytest.raises(KeyError, match="no_such_query"):
        query("no_such_query")
    with pytest.raises(KeyError, match=r"no_such_query.*opsconductor\.devstack"):
        devstack_queries.query("no_such_query")


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_statements_are_loaded_from_the_sql_files(package: str) -> None:
    _, folder, loaded = PACKAGES[package]
    from_files: dict[str, str] = {}
    for path in sorted(folder.glob("*.sql")):
        from_files.update(parse(path.read_text(), path.name))
    assert dict(loaded) == from_files
    assert len(loaded) >= 3


def test_parse_keeps_the_statement_and_drops_its_description() -> None:
    text = (
        "-- header of the file\n\n"
        "-- name: one\n-- why one exists\n-- more of why\nSELECT 1\n-- kept: inside the statement\n"
        "FROM t\n\n-- name: two\nSELECT 2\n"
    )
    assert parse(text) == {
        "one": "SELECT 1\n-- kept: inside the statement\nFROM t\n",
        "two": "SELECT 2\n",
    }


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n", "defined twice"),
        ("-- name: a\n-- only a description\n\n-- name: b\nSELECT 1\n", "'a' is empty"),
        ("-- name: b\nSELECT 1\n-- name: \n", "malformed"),
        ("-- name: Bad-Name\nSELECT 1\n", "malformed"),
        ("SELECT 1\n-- name: a\nSELECT 2\n", "before the first"),
    ],
)
def test_parse_refuses_malformed_files(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse(text, "bad.sql")


def test_no_statement_left_in_python_but_the_composed_ones() -> None:
    found: dict[str, int] = {}
    for path in SOURCES + PACKAGES["devstack"][0]:
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and _SQL.search(node.value)
            ):
                name = str(path.relative_to(ROOT))
                found[name] = found.get(name, 0) + 1
    assert sorted(set(found) - set(COMPOSED)) == [], "SQL in Python: move it to a .sql file"
    assert sorted(set(COMPOSED) - set(found)) == [], "COMPOSED lists a module with no SQL"


def test_notify_channels_written_into_statements_are_the_listeners() -> None:
    # A channel spelled in a statement must be the one the listeners subscribe to.
    channels = {
        channel
        for statement in QUERIES.values()
        for channel in re.findall(r"pg_notify\('([^']*)'", statement)
    }
    assert channels <= {EVENTS_CHANNEL}


@pytest.mark.slow
def test_a_built_wheel_ships_the_sql_files_and_its_loader_finds_them(tmp_path: Path) -> None:
    wheels = str(tmp_path / "wheels")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            wheels,
            str(LIFECYCLE),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".sql")}
        assert shipped == {f"opsconductor/lifecycle/sql/{p.name}" for p in SQL_DIR.glob("*.sql")}
        archive.extractall(tmp_path / "site")
    # The unpacked wheel (as an installed one lies) comes first on the path: the loader must
    # find its files through importlib.resources there, not in this checkout.
    script = (
        "import json; from opsconductor.lifecycle.storage import queries as q; "
        "print(json.dumps([q.__file__, sorted(q.QUERIES)]))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert ran.returncode == 0, ran.stderr
    loaded_from, names = json.loads(ran.stdout)
    assert Path(loaded_from).is_relative_to(tmp_path / "site")
    assert Path(queries.__file__).is_relative_to(LIFECYCLE)
    assert names == sorted(QUERIES)
