"""A thrifty server on one engine, in a background thread, and the official SDK pointed at it: the fixture
that the server tests share."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import openai

from thrifty.config import ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread


@contextmanager
def engine_server(engine: LLMEngine, model: str, settings: ServerSettings) -> Iterator[ServerThread]:
    """Serve `engine` as `model`; the thread's `engine` attribute lets tests check its blocks afterwards."""
    with ServerThread(create_app(AsyncEngine(engine), model, settings)) as srv:
        srv.engine = engine
        yield srv


def sdk_client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
