"""Connection-level limit uvicorn lacks: a deadline for a request's headers (slowloris).

uvicorn times out idle keep-alive connections, but its timer is reset by every byte received and is
not armed before the first request, so a client that sends its headers one byte at a time holds a
connection (and a file descriptor) for ever. This protocol gives each request's headers a fixed
deadline from the moment the connection opens, or the previous response ends; a connection whose
headers are not complete by then is closed. Bodies are bounded by RequestGuard (middleware.py).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request headers take longer than `seconds`.

    h11, unlike uvicorn's httptools protocol, also caps a request's headers (16 KiB).
    """

    class HeaderDeadlineProtocol(H11Protocol):
        header_timeout_s = seconds

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_deadline: asyncio.TimerHandle | None = None
            self._arm_header_deadline()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle and self._header_deadline is not None:  # a request's headers arrived
                self._header_deadline.cancel()
                self._header_deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle.response_complete and not self.transport.is_closing():  # not while a pipelined request is answered
                self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                self.logger.info("closed a connection whose request headers took over %g s", self.header_timeout_s)
                self.transport.close()

    return HeaderDeadlineProtocol
