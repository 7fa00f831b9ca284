"""thrifty.server: the OpenAI-compatible HTTP server (FastAPI + uvicorn), its schemas, errors and metrics.

    app = create_app(AsyncEngine(LLMEngine.from_model(...)), "model-name", ServerSettings(), api_key=None)
    with ServerThread(app) as server: ...            # or: thrifty serve --config thrifty.yaml
"""
from __future__ import annotations

__all__ = ["create_app", "ServerThread", "serve"]


def __getattr__(name: str):
    # Lazy, so importing thrifty.server (or the CLI) does not pay for torch and FastAPI.
    if name == "create_app":
        from thrifty.server.app import create_app
        return create_app
    if name == "ServerThread":
        from thrifty.server.background import ServerThread
        return ServerThread
    if name == "serve":
        from thrifty.server.run import serve
        return serve
    raise AttributeError(name)
