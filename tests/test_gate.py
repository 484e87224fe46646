"""The Fleet gate forwards the Fleet API to the SuperLink and nothing else (server/gate.py).

A stand-in upstream (an echo app served by uvicorn on loopback) takes the SuperLink's place;
tests/test_deploy.py runs the real SuperLink behind the gate.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn

from common.flower.processes import free_port
from server.gate import start_gate


async def echo(scope, receive, send) -> None:
    """Answers with what it was sent: method, path, query, headers and body."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen = {
        "method": scope["method"],
        "path": scope["path"],
        "query": scope["query_string"].decode(),
        "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
        "body": body.decode("latin-1"),
    }
    payload = json.dumps(seen).encode()
    headers = [(b"content-type", b"application/json"), (b"x-upstream", b"yes")]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def gate():
    upstream_port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(echo, host="127.0.0.1", port=upstream_port, log_level="warning")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = free_port()
    running = start_gate(
        host="127.0.0.1", port=port, upstream_port=upstream_port, tls=None, max_body_bytes=100_000
    )
    yield f"http://127.0.0.1:{port}", running.gate
    running.stop()
    server.should_exit = True
    thread.join(10)


def test_fleet_calls_pass_through_with_their_headers_and_body(gate) -> None:
    url, _ = gate
    body = bytes(range(256)) * 4  # protobuf bytes, not text
    res = httpx.post(
        f"{url}/v1/fleet/pull-messages?x=1",
        content=body,
        headers={"content-type": "application/protobuf", "x-flwr-signature": "abc"},
    )
    assert res.status_code == 201 and res.headers["x-upstream"] == "yes"
    seen = res.json()
    assert (seen["method"], seen["path"], seen["query"]) == (
        "POST",
        "/v1/fleet/pull-messages",
        "x=1",
    )
    assert seen["headers"]["x-flwr-signature"] == "abc"
    assert seen["headers"]["content-type"] == "application/protobuf"
    assert seen["body"].encode("latin-1") == body


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/list-runs"),  # flwr ls
        ("POST", "/v1/control/start-run"),  # flwr run: a ServerApp of the caller's
        ("POST", "/v1/control/register-node"),  # flwr supernode register
        ("POST", "/v1/runtime/pull-messages"),  # the ServerApp's API
        ("GET", "/health"),
        ("GET", "/docs"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ],
)
def test_everything_else_is_refused_before_it_reaches_the_superlink(gate, method, path) -> None:
    url, running = gate
    before = running.refused
    with httpx.Client() as client:
        # a raw path: httpx would otherwise resolve the dot segments itself
        request = client.build_request(method, url)
        request.url = request.url.copy_with(raw_path=path.encode())
        res = client.send(request)
    assert res.status_code == 404
    assert "x-upstream" not in res.headers
    assert running.refused == before + 1


def test_a_body_over_the_limit_is_cut_off_chunked_or_not(gate) -> None:
    url, _ = gate
    res = httpx.post(f"{url}/v1/fleet/push-messages", content=b"x" * 200_000)
    assert res.status_code == 413

    def chunks():
        for _ in range(50):
            yield b"y" * 10_000

    res = httpx.post(f"{url}/v1/fleet/push-messages", content=chunks())  # no Content-Length
    assert res.status_code == 413
