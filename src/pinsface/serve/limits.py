"""What keeps slow or greedy clients from starving the server: connection caps and timeouts.

uvicorn has no timeout for a request's headers or body: a client that sends a few bytes a minute holds its
connection (and, once the headers are in, a request slot) for ever. Here:

- ``guarded_protocol`` is uvicorn's h11 protocol with a cap on open connections per client address and in all,
  and a deadline for each request's headers (from its first byte, or from the connection's opening);
- ``BodyClock`` gives each request's body a deadline that grows with what has arrived: at least
  ``min_rate`` bytes per second after a grace period, and no pause longer than ``idle`` seconds.

``ConnectionCounts`` is shared with the app, which reports them (and whether the server is saturated) in
``/v1/health``.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ConnectionCounts:
    """Open connections, by client address; the protocol instances update it."""

    max_per_client: int = 64
    max_total: int = 1024
    per_client: collections.Counter = field(default_factory=collections.Counter)
    total: int = 0
    refused: int = 0
    timed_out: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, client: str) -> bool:
        with self._lock:
            if self.per_client[client] >= self.max_per_client or self.total >= self.max_total:
                self.refused += 1
                return False
            self.per_client[client] += 1
            self.total += 1
            return True

    def release(self, client: str) -> None:
        with self._lock:
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]
            self.total -= 1

    def snapshot(self) -> dict:
        with self._lock:
            busiest = max(self.per_client.values(), default=0)
            return {
                "open": self.total,
                "max_open": self.max_total,
                "busiest_client": busiest,
                "max_per_client": self.max_per_client,
                "refused": self.refused,
                "timed_out": self.timed_out,
            }


def _closing_response(status: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response that ends the connection, for a client refused before any request is read."""
    import json

    body = json.dumps({"code": code, "message": message}).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body


_TOO_MANY = _closing_response("429 Too Many Requests", "too_many_connections", "too many connections from you")
_TIMEOUT = _closing_response("408 Request Timeout", "request_timeout", "the request headers came too slowly")


def guarded_protocol(counts: ConnectionCounts, header_timeout: float):
    """uvicorn's h11 protocol class with the caps of ``counts`` and a deadline for headers."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    attributes = {"_counts": counts, "_header_timeout": header_timeout}
    return type("GuardedH11Protocol", (_Guarded, H11Protocol), attributes)


class _Guarded:
    """What ``guarded_protocol`` adds to uvicorn's h11 protocol (the class after this one in the MRO)."""

    _counts: ConnectionCounts
    _header_timeout: float
    _peer: str | None = None
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = self.client[0] if self.client else "unknown"
        if not self._counts.admit(peer):
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._peer = peer
        self._start_header_clock()

    def _start_header_clock(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_timeout, self._headers_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request under way: headers late
            self._counts.timed_out += 1
            if not self.transport.is_closing():
                self.transport.write(_TIMEOUT)
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle:
            self._start_header_clock()
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._stop_header_clock()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._stop_header_clock()  # uvicorn's keep-alive timeout takes over until the next byte

    def connection_lost(self, exc) -> None:
        self._stop_header_clock()
        if self._peer is not None:
            self._counts.release(self._peer)
            self._peer = None
        super().connection_lost(exc)


class BodyTooSlow(Exception):
    """A request body that came slower than the minimum rate, or paused too long."""


class BodyClock:
    """The deadline of one request's body: ``grace`` seconds, plus one second per ``min_rate`` bytes that have
    arrived; and no wait for the next part longer than ``idle`` seconds."""

    def __init__(self, min_rate: float, grace: float, idle: float):
        self.min_rate, self.grace, self.idle = min_rate, grace, idle
        self.started = time.monotonic()
        self.received = 0

    def wait_for_next(self) -> float:
        """Seconds the next part of the body may take; ``BodyTooSlow`` when none are left."""
        left = self.started + self.grace + self.received / self.min_rate - time.monotonic()
        if left <= 0:
            raise BodyTooSlow(f"the request body came slower than {self.min_rate / 1024:g} KB/s")
        return min(left, self.idle)
