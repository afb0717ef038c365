"""The progress process's event loop: uvloop by default, the standard library's on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from pydantic import ValidationError

from opsconductor.progress.__main__ import loop_factory
from opsconductor.progress.settings import ProgressSettings


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings need a database URL (never connected to here), whether or not the run has one;
    # the loop's default is what is tested, not what the caller's environment says.
    monkeypatch.setenv("OPSC_DATABASE_URL", "postgresql://unused@127.0.0.1:1/unused")
    monkeypatch.delenv("OPSC_EVENT_LOOP", raising=False)


def test_uvloop_by_default_and_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    factory = loop_factory(ProgressSettings())
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    monkeypatch.setenv("OPSC_EVENT_LOOP", "asyncio")
    assert loop_factory(ProgressSettings()) is None  # asyncio.Runner's default loop


def test_an_unknown_event_loop_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSC_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError, match="event_loop"):
        ProgressSettings()


def test_asyncio_default_loop_is_not_uvloop() -> None:
    with asyncio.Runner(loop_factory=loop_factory(ProgressSettings(event_loop="asyncio"))) as r:
        assert not isinstance(r.get_loop(), uvloop.Loop)
