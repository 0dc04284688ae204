"""uvicorn's h11 protocol with what it lacks: a deadline for a request's headers (slowloris), and one write per small response.

uvicorn times out idle keep-alive connections, but its timer is reset by every byte received and is
not armed before the first request, so a client that sends its headers one byte at a time holds a
connection (and a file descriptor) for ever. This protocol gives each request's headers a fixed
deadline from the moment the connection opens, or the previous response ends; a connection whose
headers are not complete by then is closed. Bodies are bounded by RequestGuard (middleware.py).

uvicorn writes a response's head and its body separately: two TCP segments, and two wake-ups of
the client, for every small JSON answer. Each request's cycle here writes through `OneWrite`,
which holds the head until the first body bytes and sends both at once.
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
            if self.cycle is not cycle:  # a request's headers arrived; its app task has not started yet
                self.cycle.transport = OneWrite(self.transport)
                if self._header_deadline is not None:
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


class OneWrite:
    """The transport as one request's cycle sees it: the response's head waits for the first body bytes, and both leave in one write.

    An interim `100 Continue` (written before the response starts) and everything after the first
    body bytes go straight through; closing sends a waiting head first.
    """

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self._head: bytes | None = None
        self._headed = False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif not self._headed and not data.startswith(b"HTTP/1.1 1"):  # h11 writes every status line as HTTP/1.1
            self._head, self._headed = data, True
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            self._transport.write(self._head)
            self._head = None
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)
