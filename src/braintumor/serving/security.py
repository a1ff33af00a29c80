"""What makes the service safe to expose beyond localhost: an optional API key, an explicit origin
policy, security headers on every answer, and a deadline for slow request bodies.

- API key (``AccessPolicy.api_key``, from ``--api-key`` or ``BRAINTUMOR_API_KEY``): every
  ``/v1/...`` request must carry it in ``X-API-Key`` or ``Authorization: Bearer``; compared in
  constant time. ``/``, ``/healthz`` and ``/openapi.json`` stay open (the page asks for the key).
- Hosts: a request whose ``Host`` header names a host outside ``allowed_hosts`` (localhost by
  default; ``--allow-host``) is refused with 400 before any work, so a DNS-rebinding page (a name
  of the attacker's that resolves to this machine) cannot reach the service through the browser.
- Origins: a request that says it comes from another web origin (an ``Origin`` header that is not
  this server's own and not in ``allowed_origins``) is refused with 403 before any work, so a page
  elsewhere cannot make a visitor's browser use the service. Allowed origins get CORS headers.
- Headers: a Content-Security-Policy that lets the page load nothing from elsewhere and be framed
  by no one, ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``.
- Slow clients: a body that does not arrive within ``body_timeout`` seconds is answered with 408;
  a connection that has not sent a whole request head within ``header_deadline_protocol``'s
  seconds of opening (or of its previous answer) is closed, so idle and slow-header connections
  cannot hold the ``--max-connections`` places (uvicorn itself times out only idle keep-alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
OPEN_PATHS = frozenset({"/", "/healthz", "/openapi.json"})
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class AccessPolicy:
    """Who may use the service and how long a request body may take to arrive."""

    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    body_timeout: float = 30.0
    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS  # names or addresses; "*.example.org" for subdomains; "*": any


def host_name(host_header: str) -> str:
    """The host of a ``Host`` header, without its port and IPv6 brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` (``host_name``'s result) matches a name of ``allowed``."""
    for pattern in allowed:
        pattern = pattern.lower().strip("[]")
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def _headers(scope: dict) -> dict[bytes, bytes]:
    return {key.lower(): value for key, value in scope["headers"]}


def _own_origin(scope: dict, headers: dict[bytes, bytes]) -> str:
    host = headers.get(b"host", b"").decode("latin-1")
    return f"{scope.get('scheme', 'http')}://{host}"


def _has_key(headers: dict[bytes, bytes], key: str) -> bool:
    given = headers.get(b"x-api-key", b"").decode("latin-1")
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    if not given and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    return hmac.compare_digest(given.encode(), key.encode())


class AccessGuard:
    """ASGI middleware applying an ``AccessPolicy`` and the security headers."""

    def __init__(self, app: Any, policy: AccessPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        origin = headers.get(b"origin", b"").decode("latin-1")
        allowed = origin in self.policy.allowed_origins
        refusal = self._refusal(scope, headers, origin, allowed)
        extra = list(SECURITY_HEADERS)
        if allowed:
            extra += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        if refusal is not None:
            status, message = refusal
            await JSONResponse({"error": message}, status_code=status)(scope, receive, _adding(send, extra))
            return
        if scope["method"] == "OPTIONS" and allowed:  # a CORS preflight from an allowed origin
            preflight = [(b"access-control-allow-methods", b"GET, POST"),
                         (b"access-control-allow-headers", b"x-api-key, authorization, content-type")]
            await JSONResponse({}, status_code=204)(scope, receive, _adding(send, extra + preflight))
            return
        try:
            await self.app(scope, _deadline(receive, self.policy.body_timeout), _adding(send, extra))
        except asyncio.CancelledError:
            # Cancelled by a shutdown's deadline: one JSON answer (if none began) instead of a traceback
            # in the server's log; the process is stopping, so the cancellation goes no further.
            with contextlib.suppress(Exception):
                answer = JSONResponse({"error": "the server is shutting down; send the request again"}, 503)
                await answer(scope, receive, _adding(send, extra))

    def _refusal(self, scope: dict, headers: dict[bytes, bytes], origin: str, allowed: bool) -> tuple[int, str] | None:
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if not host_allowed(host, self.policy.allowed_hosts):
            return 400, f"the host name {host or '(none)'!r} is not one this service answers to (see --allow-host)"
        if origin and origin != _own_origin(scope, headers) and not allowed:
            return 403, f"requests from the web origin {origin} are not allowed (see --allow-origin)"
        key = self.policy.api_key
        if key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS" and not _has_key(headers, key):
            return 401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)"
        return None


def _adding(send: Any, extra: list[tuple[bytes, bytes]]) -> Any:
    async def sending(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


def _deadline(receive: Any, seconds: float) -> Any:
    """``receive`` that fails a request whose whole body has not arrived ``seconds`` after start
    (after the last body chunk, ``receive`` is passed through untouched)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    done = False

    async def receiving() -> dict:
        nonlocal done
        if done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            # FastAPI passes its own HTTPException through body parsing (any other becomes a 400).
            raise HTTPException(408, f"the request body did not arrive within {seconds:g} s") from None
        done = message.get("type") != "http.request" or not message.get("more_body", False)
        return message

    return receiving


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 HTTP protocol with a deadline for each request head: ``uvicorn.run(...,
    http=header_deadline_protocol(10))``. Trickling a byte now and then does not extend it."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _waiting_cycle: Any = None
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            """Start the clock for the next request head (the cycle now current is the last one)."""
            self._disarm()
            self._waiting_cycle = self.cycle
            self._timer = self.loop.call_later(seconds, self._late)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self._waiting_cycle:  # a whole request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # before the next pipelined request may start inside
            super().on_response_complete()
            if self.cycle is not self._waiting_cycle or self.transport.is_closing():
                self._disarm()

        def _late(self) -> None:
            self._timer = None
            if self.cycle is self._waiting_cycle and not self.transport.is_closing():
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline
