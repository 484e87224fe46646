"""The Fleet gate: the only thing a deployed server exposes to devices.

Flower 1.42's SuperLink serves the Fleet API (devices), the Control API (`flwr` CLI: list and
submit runs, register node keys) and the Runtime API (the ServerApp) on one HTTP port, with
nothing but TLS between them and anyone holding the CA certificate. `fedrec-server run`
therefore binds the SuperLink to loopback and puts this gate on the public address:

    devices ──TLS──▶ gate (HOST:PORT) ──TLS, loopback──▶ SuperLink (127.0.0.1:OPERATOR_PORT)
                     POST /v1/fleet/* only              ◀── flwr CLI, ServerApp (operator)

Every other method or path gets a 404 and a log line, before anything is read from the body.
Requests and responses are streamed through unchanged (headers included, so Flower's SuperNode
signatures still verify at the SuperLink); a request body over `max_body_bytes` is cut off
with a 413 by the same body limit as the device's service (common/asgi.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn

from common.asgi import BodyLimit
from common.flower.processes import Tls

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
MAX_BODY_BYTES = 256 * 1024 * 1024  # a pushed model message is a few MB; Flower's own cap is higher
# hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx sets itself
_NOT_FORWARDED = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"content-length",
}


class FleetGate:
    """An ASGI app that forwards POST /v1/fleet/* to `upstream` and refuses everything else."""

    def __init__(
        self,
        upstream: str,
        *,
        verify: ssl.SSLContext | bool = True,
    ):
        self.upstream = upstream.rstrip("/")
        self.verify = verify
        self.refused = 0  # requests answered 404 (for reports and tests)
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websockets and anything else: not served (uvicorn closes the connection)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # no overall timeout: Flower's long calls set their own; connects are bounded
                timeout = httpx.Timeout(None, connect=10.0)
                self._client = httpx.AsyncClient(verify=self.verify, timeout=timeout)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        method, path = scope["method"], scope["path"]
        if method != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path:
            self.refused += 1
            client = scope.get("client") or ("?", 0)
            log.warning(
                "Refused %s %s from %s: only the Fleet API is served here", method, path, client[0]
            )
            await _respond(
                send, 404, b'{"detail":"Not found: this address serves the Fleet API only."}'
            )
            return
        assert self._client is not None, "the gate's lifespan did not start"
        query = scope.get("query_string", b"")
        url = self.upstream + path + (("?" + query.decode("latin-1")) if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _NOT_FORWARDED]
        request = self._client.build_request(
            method, url, headers=headers, content=self._body(receive)
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("The SuperLink did not answer %s: %s", path, exc)
            await _respond(send, 502, b'{"detail":"The server is not ready."}')
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in _NOT_FORWARDED]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _body(self, receive) -> AsyncIterator[bytes]:
        """The request body as it arrives (BodyLimit around the gate counts it)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if chunk := message.get("body", b""):
                yield chunk
            if not message.get("more_body", False):
                return


async def _respond(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RunningGate:
    """A gate served by uvicorn in a background thread of this process."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, gate: FleetGate):
        self._server, self._thread, self.gate = server, thread, gate

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)


def start_gate(
    *,
    host: str,
    port: int,
    upstream_port: int,
    tls: Tls | None,
    max_body_bytes: int = MAX_BODY_BYTES,
    timeout_s: float = 30.0,
) -> RunningGate:
    """Serve the gate on host:port in a thread, forwarding to the SuperLink on loopback;
    request bodies over max_body_bytes get a 413 (common/asgi.py, counting what is read)."""
    if tls is None:
        gate = FleetGate(f"http://127.0.0.1:{upstream_port}")
        ssl_options = {}
    else:
        verify = ssl.create_default_context(cafile=str(tls.ca_cert))
        gate = FleetGate(f"https://127.0.0.1:{upstream_port}", verify=verify)
        ssl_options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    config = uvicorn.Config(
        BodyLimit(gate, max_bytes=max_body_bytes),
        host=host,
        port=port,
        lifespan="on",
        log_level="warning",
        access_log=False,
        ws="none",
        timeout_keep_alive=30,
        **ssl_options,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve()), name="fleet-gate", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise OSError(f"The Fleet gate could not listen on {host}:{port} (see the log above).")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(
                f"The Fleet gate did not start on {host}:{port} in {timeout_s:.0f} s."
            )
        time.sleep(0.05)
    return RunningGate(server, thread, gate)
