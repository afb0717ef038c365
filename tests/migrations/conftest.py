"""Fixtures of the migration tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def write_migrations(tmp_path: Path) -> Callable[[dict[str, str]], Path]:
    """Write a migrations folder from ``{file name: sql}``; returns the folder (rewritable)."""
    folder = tmp_path / "migrations"
    folder.mkdir()

    def write(files: dict[str, str]) -> Path:
        for name, sql in files.items():
            (folder / name).write_text(sql)
        return folder

    return write
