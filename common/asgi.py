"""ASGI pieces shared by the device's HTTP service and the server's Fleet gate."""

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """A request body over the limit, found while it was being read."""


class BodyLimit:
    """ASGI middleware: a 413 once a request body exceeds max_bytes, counting what is read.

    A Content-Length over the limit is refused before reading; a chunked body (or one whose
    header lies) is refused as soon as the bytes received pass the limit, without reading on.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = BodyTooLarge(413, f"Request body over {self.max_bytes} bytes.")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(too_large, scope, send)
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large  # FastAPI answers it; a raw reader gets it below
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except BodyTooLarge as exc:
            if started:
                raise
            await self._refuse(exc, scope, send)

    @staticmethod
    async def _refuse(exc: BodyTooLarge, scope: Scope, send: Send) -> None:
        response = JSONResponse(status_code=exc.status_code, content={"detail": exc.detail})
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
