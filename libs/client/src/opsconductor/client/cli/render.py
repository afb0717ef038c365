"""How ``opsctl`` prints: rich tables for people, one JSON document for scripts (``-o json``).

Every command hands its result to :meth:`Output.emit` with the columns of its table; in JSON
mode the same values are printed as JSON (dataclasses as objects, datetimes as ISO 8601), so a
script never parses a table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["Column", "Output", "jsonable"]

Column = tuple[str, Callable[[Any], object]]


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (dataclasses, tuples, datetimes and sets included)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return [jsonable(v) for v in items]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list | tuple | frozenset | set):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


class Output:
    """Where results go: ``stdout`` as tables or JSON; messages to ``stderr``."""

    def __init__(self, fmt: str = "table") -> None:
        self.json = fmt == "json"
        self.console = Console(highlight=False, soft_wrap=True, markup=False)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

    def emit(self, value: Any, columns: Sequence[Column] | None = None) -> None:
        """Print ``value`` (one item, or a list when ``columns`` describe its rows)."""
        if self.json:
            sys.stdout.write(json.dumps(jsonable(value), indent=2, sort_keys=True) + "\n")
            return
        if columns is None:
            self.fields(value)
            return
        rows: Iterable[Any] = value if isinstance(value, list | tuple) else [value]
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name, _ in columns:
            table.add_column(name.upper())
        for row in rows:
            table.add_row(*(_cell(get(row)) for _, get in columns))
        self.console.print(table)

    def fields(self, value: Any, *, skip: Iterable[str] = ()) -> None:
        """One item as ``name: value`` lines (nested lists and dicts on one line as JSON)."""
        data = jsonable(value)
        skipped = set(skip)
        table = Table(box=None, pad_edge=False, show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for key, item in data.items():
            if key in skipped:
                continue
            text = json.dumps(item, sort_keys=True) if isinstance(item, dict | list) else item
            table.add_row(key, _cell(text))
        self.console.print(table)

    def line(self, text: str) -> None:
        """A line for people (not printed in JSON mode, where stdout is one document)."""
        if not self.json:
            self.console.print(text)

    def note(self, text: str) -> None:
        """A remark on stderr, in both modes."""
        self.err.print(text)
