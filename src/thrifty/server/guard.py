"""The server's guard, a pure ASGI middleware: API key (401), body-size limit (413), requests counted by status."""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thrifty.server.api_keys import KeyStore
from thrifty.server.errors import AuthenticationError, PayloadTooLargeError, error_response
from thrifty.server.metrics import ServerMetrics

# With an API key set, only health (load balancers probe it) and the dashboard's page are open: the page holds no
# data and a browser cannot send a bearer header when it loads one; its data endpoint, metrics and docs need the key.
_PUBLIC_PATHS = ("/health", "/dashboard")


class Guard:
    """Pure ASGI middleware: API key (401), body-size limit (413), request counting by status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int,
                 keys: KeyStore | None = None) -> None:
        self.app, self.metrics, self.api_key, self.max_body = app, metrics, api_key, max_body_bytes
        self.keys = keys   # virtual keys (thrifty.server.api_keys); `api_key` stays the unlimited master key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ROUTES else "other"
        status_box = [500]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            error = self._authorize(scope, path)
            if error is None:
                receive, error = await self._read_body(scope, receive)
            if error is not None:
                await error_response(error)(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status_box[0])).inc()

    def _authorize(self, scope: Scope, path: str) -> Exception | None:
        """None when the request may pass; a virtual key's record goes into the request's state (`api_key`)."""
        if (self.api_key is None and self.keys is None) or path in _PUBLIC_PATHS:
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if not auth:
            return AuthenticationError("no API key given", "send the header 'Authorization: Bearer <key>'")
        if scheme.lower() == "bearer":
            if self.api_key is not None and hmac.compare_digest(token.encode(), self.api_key.encode()):
                return None
            key = self.keys.lookup(token) if self.keys is not None and token else None
            if key is not None:
                scope.setdefault("state", {})["api_key"] = key
                return None
        return AuthenticationError("the API key is not valid", "check the key, or ask for a new one")

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive, Exception | None]:
        """Buffer the body (at most max_body bytes) and replay it; 413 beyond the limit."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive, None
        too_large = PayloadTooLargeError(f"the request body is larger than this server's limit of {self.max_body} "
                                         "bytes", "send a smaller request")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                return receive, too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None  # the client left; the app will see the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return receive, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/thrifty/report", "/v1/thrifty/dashboard",
          "/health", "/metrics", "/dashboard")
