"""Run an ASGI app under uvicorn in a background thread (tests, notebooks, embedding in other programs)."""
from __future__ import annotations

import threading
import time

import uvicorn


class ServerThread:
    """`with ServerThread(app) as server: httpx.get(server.url + "/health")` -- a real server on loopback.

    port=0 picks a free port. Exiting the block stops the server the way SIGTERM does (graceful)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 60.0,
                 **uvicorn_options) -> None:
        uvicorn_options.setdefault("log_level", "warning")
        self.config = uvicorn.Config(app, host=host, port=port, lifespan="on", **uvicorn_options)
        self.server = uvicorn.Server(self.config)
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._thread = threading.Thread(target=self.server.run, name="thrifty-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
