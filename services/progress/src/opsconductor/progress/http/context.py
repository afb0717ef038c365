"""What every HTTP route reaches: the service's event access, verifier, tickets and settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from opsconductor.common.auth import Principal
from opsconductor.progress.app import ProgressApp
from opsconductor.progress.http.auth import authenticate
from opsconductor.progress.http.event_frames import EventFrames
from opsconductor.progress.http.tickets import TicketIssuer
from opsconductor.progress.logic.access import EventAccess
from opsconductor.progress.settings import ProgressSettings


@dataclass(frozen=True)
class HttpContext:
    """Held on ``app.state.ctx`` of the Starlette application."""

    app: ProgressApp
    tickets: TicketIssuer
    #: Event frames encoded once for every subscriber of this process.
    frames: EventFrames = field(default_factory=EventFrames)

    @staticmethod
    def of(connection: HTTPConnection) -> HttpContext:
        ctx: HttpContext = connection.app.state.ctx
        return ctx

    @property
    def settings(self) -> ProgressSettings:
        return self.app.settings

    @property
    def access(self) -> EventAccess:
        return self.app.access

    async def authenticate(self, connection: HTTPConnection) -> Principal:
        return await authenticate(connection, self.app.verifier, self.tickets)
