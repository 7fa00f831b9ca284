"""Servers that `thrifty bench serve --serve ...` starts itself, one after another, on the same GGUF file and
thread count: thrifty's own (`thrifty serve`, as a user runs it, with variants that turn a technique off or on),
llama.cpp's C++ `llama-server` (parallel slots, continuous batching: the strong peer) and llama-cpp-python's
server (`python -m llama_cpp.server`, one request at a time).

Each runs in its own process, so the benchmark's client never shares an interpreter with the server it measures.
All are asked for exactly max_tokens tokens: thrifty and llama-server through `ignore_eos`, llama-cpp-python
through a logit bias that bans the end-of-turn tokens (its server has no ignore_eos).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from thrifty.errors import ThriftyError

# `thrifty` is `thrifty serve` as it starts (dense bf16 weights, prefill budget 2x, prefix caching, no speculation);
# each `+modifier` changes one thing in its engine section: `thrifty+gguf+no-prefill-budget`
MODIFIERS: dict[str, dict] = {
    "gguf": {"weights": "gguf"},                        # the GGUF's own quantized blocks, as llama.cpp runs them
    "int4": {"weights": "int4"},                        # the GGUF's weights requantized to int4 groups of 32
    "ngram": {"speculative": {"method": "ngram"}},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "no-prefill-budget": {"max_decode_slowdown": None},  # whole prefill chunks beside decoding streams
}


def thrifty_engine(name: str) -> dict | None:
    """The engine section's changes of a `thrifty[+modifier...]` name; None for another name."""
    base, *mods = name.split("+")
    if base != "thrifty" or any(m not in MODIFIERS for m in mods):
        return None
    engine: dict = {}
    for m in mods:
        engine.update(MODIFIERS[m])
    return engine


LLAMACPP_SERVER_REQUIREMENTS = ("llama-cpp-python==0.3.36", "sse-starlette==3.7.1", "starlette-context==0.3.6",
                                "pydantic-settings==2.16.3")


@dataclass(slots=True)
class ServerSpec:
    """How to start one server and what each request to it carries besides the OpenAI fields."""
    name: str
    argv: list[str]
    extra_body: dict = field(default_factory=dict)
    describe: dict = field(default_factory=dict)        # for the report: no paths, no ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thrifty_spec(name: str, model: str, threads: int, port: int, workdir: Path) -> ServerSpec:
    engine = {"num_threads": threads, **(thrifty_engine(name) or {})}
    config = {"model": model, "engine": engine,
              "server": {"host": "127.0.0.1", "port": port, "log_level": "warning",
                         "ledger_path": str(workdir / f"{name}-ledger.sqlite3")},
              # the response cache would answer a repeated prompt without any model: not what is measured here
              "cache": {"enabled": False}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-c", "import sys; from thrifty.cli import main; sys.exit(main())", "serve",
            "--config", str(path)]
    return ServerSpec(name, argv, {"ignore_eos": True},
                      {"server": "thrifty serve", "engine": engine, "response_cache": False})


def llamacpp_spec(model_path: Path, model_name: str, threads: int, port: int, stop_ids: tuple[int, ...],
                  n_ctx: int = 4096) -> ServerSpec:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
        raise ThriftyError("llama.cpp's server is not installed",
                           "pip install " + " ".join(f"'{r}'" for r in LLAMACPP_SERVER_REQUIREMENTS)
                           + " (or `pip install -e '.[bench]'`; llama.cpp builds from source, ~5 min)")
    import llama_cpp

    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", model_name,
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_threads_batch",
            str(threads), "--n_ctx", str(n_ctx),
            # its default stops the running request whenever another arrives: every request must run to its end
            "--interrupt_requests", "False"]
    ban = {str(t): -100.0 for t in stop_ids}
    return ServerSpec("llamacpp", argv, {"logit_bias": ban},
                      {"server": "llama_cpp.server", "llama_cpp_python": llama_cpp.__version__, "n_ctx": n_ctx,
                       "interrupt_requests": False,
                       "note": "llama-cpp-python's server runs one request at a time (no continuous batching)"})


LLAMA_SERVER_ENV = "THRIFTY_LLAMA_SERVER"
LLAMA_SERVER_SLOTS = 16         # parallel slots: the most requests it decodes in one batch
LLAMA_SERVER_SLOT_CTX = 4096    # context per slot (its -c is the total, shared by the slots)


def find_llama_server() -> Path:
    """$THRIFTY_LLAMA_SERVER, else `llama-server` beside this Python (where `make llama-server` puts it), else PATH."""
    given = os.environ.get(LLAMA_SERVER_ENV)
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ThriftyError(f"{LLAMA_SERVER_ENV}={given} is not an executable file",
                               "point it at a built llama-server binary, or unset it")
        return path
    beside = Path(sys.executable).parent / "llama-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise ThriftyError("llama.cpp's llama-server is not built",
                       f"`make llama-server` builds it into the venv from the llama.cpp source that "
                       f"llama-cpp-python's sdist vendors (~8 min on 2 cores), or set {LLAMA_SERVER_ENV}")


def llama_server_spec(model_path: Path, model_name: str, threads: int, port: int, binary: Path | None = None,
                      slots: int = LLAMA_SERVER_SLOTS, slot_ctx: int = LLAMA_SERVER_SLOT_CTX) -> ServerSpec:
    """llama-server as a user would start it for many users: the same GGUF and threads, `slots` parallel slots of
    `slot_ctx` tokens each, continuous batching (its default, named anyway), its own prompt cache left on."""
    binary = binary or find_llama_server()
    argv = [str(binary), "--model", str(model_path), "--alias", model_name, "--host", "127.0.0.1",
            "--port", str(port), "--threads", str(threads), "--threads-batch", str(threads),
            "--parallel", str(slots), "--ctx-size", str(slots * slot_ctx), "--cont-batching"]
    return ServerSpec("llama-server", argv, {"ignore_eos": True},
                      {"server": "llama.cpp llama-server", "built_from": "llama-cpp-python==0.3.36 sdist (vendored "
                       "llama.cpp)", "parallel_slots": slots, "ctx_per_slot": slot_ctx, "continuous_batching": True})


class ServerProcess:
    """A server in a subprocess; ready when GET /v1/models answers."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path, startup_timeout_s: float = 900.0) -> None:
        self.spec, self.port, self.log_path, self.timeout = spec, port, log_path, startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ServerProcess:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.spec.argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ThriftyError(f"{self.spec.name} exited with {self.proc.returncode} while starting",
                                   f"see its log: {self._tail()}")
            try:
                if httpx.get(self.base_url + "/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise ThriftyError(f"{self.spec.name} did not answer within {self.timeout:.0f} s", self._tail())

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-800:]
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
