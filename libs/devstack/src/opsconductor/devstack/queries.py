"""The devstack's own SQL statements, by name, from its ``sql/*.sql`` package data.

The same procrastinate-style named blocks and loader as the lifecycle core's
(:mod:`opsconductor.lifecycle.storage.queries`): unknown names fail at import of the module
asking, and ``tests/unit/test_sql_queries.py`` checks both ways.
"""

from __future__ import annotations

from opsconductor.lifecycle.storage.queries import load, lookup

__all__ = ["QUERIES", "query"]

#: Every named statement of the devstack, loaded once at import.
QUERIES = load("opsconductor.devstack")


def query(name: str) -> str:
    """The devstack statement called ``name``; KeyError (with the name) when there is none."""
    return lookup(QUERIES, name, "opsconductor.devstack")
