"""`thrifty serve`: load the model, build the app, run uvicorn (SIGTERM: stop accepting, drain, exit)."""
from __future__ import annotations

import logging
import sys

from thrifty.config import ThriftyConfig

log = logging.getLogger("thrifty.server")


def build_server_app(config: ThriftyConfig, api_key: str | None = None):
    """The app for `config`, with its engine loaded. api_key None: no authentication."""
    from thrifty.engine.async_engine import AsyncEngine
    from thrifty.engine.engine import LLMEngine
    from thrifty.server.app import create_app

    engine_config = config.engine_config()  # checks the engine section before the slow load
    print(f"thrifty: loading {config.model} ...", file=sys.stderr, flush=True)
    engine = LLMEngine.from_model(config.model, **{f: getattr(engine_config, f) for f in config.engine})
    name = config.served_model_name()
    cache = None
    if config.cache.enabled:
        from thrifty.gateway.cache import build_cache

        cache = build_cache(config.cache)  # connects to nothing yet: a server starts with Redis down
        print(f"thrifty: response cache on ({config.cache.store}, semantic "
              f"{'on' if config.cache.semantic else 'off'})", file=sys.stderr, flush=True)
    return create_app(AsyncEngine(engine), name, config.server, api_key, aliases=(config.model,), cache=cache,
                      cache_settings=config.cache)


def serve(config: ThriftyConfig, api_key: str | None = None) -> None:
    import uvicorn

    s = config.server
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_server_app(config, api_key)
    auth = "on" if api_key else "off"
    print(f"thrifty: serving '{config.served_model_name()}' on http://{s.host}:{s.port}/v1 (API key {auth})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=s.host, port=s.port, log_level=s.log_level,
                timeout_graceful_shutdown=max(1, round(s.shutdown_timeout_s)))
