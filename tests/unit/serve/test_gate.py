"""The body limits at the ASGI level, where a stalled client can be simulated exactly."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import PlainTextResponse

from visiontune.serve.gate import BodyLimits


async def echo_length(scope, receive, send) -> None:
    body = await Request(scope, receive).body()
    await PlainTextResponse(str(len(body)))(scope, receive, send)


def call(app, messages, headers=()) -> tuple[int, bytes]:
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client stalls

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/models/m/predict", "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_a_client_that_stops_sending_gets_408_after_the_read_timeout() -> None:
    refused = []
    app = BodyLimits(echo_length, max_bytes=1000, read_timeout_s=0.05, on_refused=lambda scope, kind: refused.append(kind))
    status, body = call(app, [{"type": "http.request", "body": b"abc", "more_body": True}])
    assert status == 408 and json.loads(body)["error"] == "timeout"


def test_a_stream_passing_the_limit_is_cut_off_and_a_small_one_passes() -> None:
    app = BodyLimits(echo_length, max_bytes=1000, read_timeout_s=1)
    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 3
    assert call(app, list(chunks))[0] == 413
    assert call(app, [{"type": "http.request", "body": b"x" * 600, "more_body": False}]) == (200, b"600")
    assert call(app, [], headers=[(b"content-length", b"5000")])[0] == 413  # refused before reading
    assert call(app, [], headers=[(b"content-length", b"-1")])[0] == 400
