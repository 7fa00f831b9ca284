"""`thrifty serve`: check the tiers, load them, build the app, run uvicorn (SIGTERM: stop accepting, drain, exit)."""
from __future__ import annotations

import logging
import sys

from thrifty.config import ThriftyConfig

log = logging.getLogger("thrifty.server")


def build_server_app(config: ThriftyConfig, api_key: str | None = None):
    """The app for `config`, with its tiers loaded. api_key None: no authentication. A bad config
    (ConfigError) is refused before any model loads."""
    from thrifty.gateway.tiers import build_gateway, check_tiers
    from thrifty.server.app import create_gateway_app

    router = check_tiers(config)  # every tier, the router, the engine sections: before the slow loads
    cache = None
    if config.cache.enabled:
        from thrifty.gateway.cache import build_cache

        cache = build_cache(config.cache)  # connects to nothing yet: a server starts with Redis down
    gateway = build_gateway(config, router, cache)
    if cache is not None:
        print(f"thrifty: response cache on ({config.cache.store}, semantic "
              f"{'on' if config.cache.semantic else 'off'})", file=sys.stderr, flush=True)
    keys = None
    if config.server.virtual_keys:
        from thrifty.server.api_keys import KeyStore

        keys = KeyStore(config.server.keys_path)
    return create_gateway_app(gateway, config.server, api_key, keys=keys)


def serve(config: ThriftyConfig, api_key: str | None = None) -> None:
    import uvicorn

    s = config.server
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_server_app(config, api_key)
    auth = "on" if api_key else "off"
    names = ", ".join(f"'{n}'" for n in app.state.gateway.listed_names())
    print(f"thrifty: serving {names} on http://{s.host}:{s.port}/v1 (API key {auth}); the port opens after a "
          "warm-up (one token through each local tier; the first start also builds the CPU kernels)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=s.host, port=s.port, log_level=s.log_level,
                timeout_graceful_shutdown=max(1, round(s.shutdown_timeout_s)))
