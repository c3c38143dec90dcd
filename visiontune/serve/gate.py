"""What every request passes before a route sees it: the API key, the body limits, the counting.

Plain ASGI middlewares (Starlette's BaseHTTPMiddleware would wrap errors raised while the body
is read in task groups, out of reach of the app's handlers).

`BodyLimits`: a declared Content-Length over the limit is refused (413) before a byte is
read; a chunked body is counted as it streams and refused the moment it passes the limit; a
client that stops sending mid-body is cut off after `read_timeout_s` (408). So neither a huge
upload nor a slow one can hold memory or a connection for long.
"""

from __future__ import annotations

import asyncio
import hmac
import json


class Refused(Exception):
    """A request refused with `status`; the app's handler turns it into the JSON error response."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class BodyLimits:
    def __init__(self, app, max_bytes: int, read_timeout_s: float, on_refused=None) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s
        self.on_refused = on_refused or (lambda scope, kind: None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await self._refuse(scope, send, Refused(400, "bad_request", "invalid Content-Length header"))
        if declared is not None and int(declared) > self.max_bytes:
            return await self._refuse(scope, send, Refused(
                413, "too_large", f"the upload is larger than the limit of {self.max_bytes:,} bytes"))
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                raise Refused(408, "timeout", f"the client sent nothing for {self.read_timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise Refused(413, "too_large", f"the upload is larger than the limit of {self.max_bytes:,} bytes")
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Refused as refused:
            if started:
                raise
            await self._refuse(scope, send, refused)

    async def _refuse(self, scope, send, refused: Refused) -> None:
        self.on_refused(scope, refused.kind)
        await send_json(send, refused.status, {"error": refused.kind, "detail": str(refused)}, close=True)


class KeyAndCount:
    """Checks the API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`) on every path but
    `open_paths`, and reports each response's status to `on_response(scope, status)`."""

    def __init__(self, app, api_key: str | None, open_paths: frozenset[str], on_response, on_refused) -> None:
        self.app, self.api_key, self.open_paths = app, api_key, open_paths
        self.on_response, self.on_refused = on_response, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.on_response(scope, message["status"])
            await send(message)

        if self.api_key and scope["path"] not in self.open_paths and not self._has_key(scope):
            self.on_refused(scope, "unauthorized")
            return await send_json(counting_send, 401, {
                "error": "unauthorized", "detail": "a valid API key is required: 'Authorization: Bearer KEY' or "
                "'X-API-Key: KEY'"}, extra_headers=[(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, counting_send)

    def _has_key(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
        return hmac.compare_digest(given, self.api_key.encode())


async def send_json(send, status: int, body: dict, close: bool = False, extra_headers=()) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": data})
