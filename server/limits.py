"""Request body size limit for the scoring endpoint."""

from __future__ import annotations

import logging
from typing import Any

from server.errors import error_response

logger = logging.getLogger(__name__)


class BodySizeLimitMiddleware:
    """Respond with 413 when a POST body to ``paths`` exceeds ``max_bytes``.

    Rendering and tokenizing run on the event loop, so one huge conversation
    would stall every other request; the limit bounds that work. Bodies with a
    Content-Length are rejected before they are read, chunked ones as soon as
    they pass the limit.
    """

    def __init__(self, app: Any, paths: set[str], max_bytes: int) -> None:
        self.app = app
        self.paths = paths
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, int(declared))
            return

        received = 0
        rejected = False

        async def receive_counted() -> dict:
            nonlocal received, rejected
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes and not rejected:
                rejected = True
                await self._reject(scope, receive, send, received)
                # The app stops reading, and whatever it sends is dropped.
                return {"type": "http.disconnect"}
            return message

        async def send_unless_rejected(message: dict) -> None:
            if not rejected:
                await send(message)

        await self.app(scope, receive_counted, send_unless_rejected)

    async def _reject(self, scope: dict, receive: Any, send: Any, size: int) -> None:
        logger.warning(
            "%s %s: body of %s bytes rejected", scope["method"], scope["path"], size
        )
        response = error_response(
            413,
            "request_too_large",
            f"the request body has more than {self.max_bytes} bytes, this server's "
            f"max_request_bytes; send fewer or shorter messages, or score large "
            f"sets with a batch job",
        )
        await response(scope, receive, send)
