"""From the config to a running gateway: check every tier (before any model loads), then build them.

`check_tiers(config)` refuses, with one clear ConfigError, a tier without a price, a remote tier priced
`auto`, a remote tier whose api_key_env is not set, duplicate or reserved tier names, and a router that
cannot route over these tiers. `build_gateway(config)` then loads the local engines, measures their
throughput for `auto` prices (thrifty.engine.throughput), opens the cost ledger and wires it together.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from thrifty import paths
from thrifty.config import AUTO, ConfigError, RouterSettings, ThriftyConfig, TierSettings
from thrifty.gateway.costs import Price, auto_price


def router_settings(config: ThriftyConfig) -> RouterSettings:
    """The router section; without one, a single tier is served exactly as before tiers existed
    (no retries), several tiers with the defaults (fixed on the cheapest)."""
    if config.router is not None:
        return config.router
    return RouterSettings(retries=0) if len(config.tiers()) == 1 else RouterSettings()


def check_tiers(config: ThriftyConfig):
    """The router over the configured tiers, or ConfigError naming the first problem. Loads no model."""
    from thrifty.gateway.router import build_router

    tiers = config.tiers()
    seen: set[str] = set()
    for i, t in enumerate(tiers):
        where = f"model_list[{i}]"
        if not t.name:
            raise ConfigError(f"{where} has no name", "give every tier a name (what clients send as model)")
        if t.name == AUTO:
            raise ConfigError(f"{where}: the tier name 'auto' is reserved (it asks the router to choose)",
                              "rename the tier")
        if t.name in seen:
            raise ConfigError(f"duplicate tier name '{t.name}' in model_list", "give every tier its own name")
        seen.add(t.name)
        _check_tier(t)
    try:
        return build_router(router_settings(config), [t.name for t in tiers])
    except ImportError as e:
        raise ConfigError(f"router.strategy {router_settings(config).strategy!r} is not available in this build "
                          f"({e})", "use strategy: fixed") from None


def _check_tier(t: TierSettings) -> None:
    if not t.model:
        raise ConfigError(f"tier '{t.name}' has no model", "set model: a zoo name, .gguf file or folder "
                          "(local), or the remote model's name")
    if t.price is None:
        raise ConfigError(f"tier '{t.name}' has no price",
                          "add price: {input: ..., cached_input: ..., output: ...} in USD per 1M tokens "
                          "(or auto for a local tier)")
    if t.timeout_s <= 0:
        raise ConfigError(f"tier '{t.name}': timeout_s must be > 0, got {t.timeout_s}")
    if t.remote:
        if not str(t.api_base).startswith(("http://", "https://")):
            raise ConfigError(f"tier '{t.name}': api_base must be an http(s) URL, got {t.api_base!r}")
        if AUTO in (t.price.input, t.price.output):
            raise ConfigError(f"tier '{t.name}' is remote: its price cannot be auto (auto is measured on this "
                              "machine)", "give the provider's USD per 1M input and output tokens")
        if t.api_key_env and not os.environ.get(t.api_key_env):
            raise ConfigError(f"tier '{t.name}': the environment variable {t.api_key_env} (its api_key_env) is "
                              "not set", f"export {t.api_key_env}=<key>, or remove api_key_env for an API "
                              "without keys")
        if t.engine:
            raise ConfigError(f"tier '{t.name}' is remote: it takes no engine options")
    else:
        try:  # unknown engine fields fail before any model loads
            ThriftyConfig(engine=dict(t.engine)).engine_config()
        except ConfigError as e:
            raise ConfigError(f"tier '{t.name}': {e.message}", e.fix) from None


def resolve_price(t: TierSettings, router: RouterSettings,
                  throughput: Callable[[], tuple[float, float]] | None = None) -> tuple[Price, str]:
    """(price, how it was set). `throughput()` -> (prefill, decode) tokens/s, called only for auto fields."""
    p = t.price
    assert p is not None
    if not p.is_auto:
        return Price(float(p.input), float(p.cached_input), float(p.output)), "configured"
    how = "configured"
    derived = Price(0.0, 0.0, 0.0)
    if AUTO in (p.input, p.output):
        assert throughput is not None, "auto input/output prices need a local tier"
        prefill, decode = throughput()
        derived = auto_price(router.machine_usd_per_hour, prefill, decode, router.cached_input_fraction)
        how = (f"auto: ${router.machine_usd_per_hour:g}/h, prefill {prefill:.0f} tok/s, decode {decode:.0f} tok/s "
               "on this machine")
    input_ = derived.input if p.input == AUTO else float(p.input)
    output = derived.output if p.output == AUTO else float(p.output)
    cached = input_ * router.cached_input_fraction if p.cached_input == AUTO else float(p.cached_input)
    return Price(input_, cached, output), how


def ledger_path(config: ThriftyConfig) -> Path:
    return Path(config.server.ledger_path) if config.server.ledger_path else paths.home() / "ledger" / "ledger.sqlite3"


def build_gateway(config: ThriftyConfig, router=None, cache=None):
    """Load the tiers of `config` (checked first unless `router` is given) into a Gateway, behind `cache`
    (a thrifty.gateway.cache.ResponseCache; None: no response cache, no coalescing)."""
    from thrifty.gateway.remote import RemoteBackend
    from thrifty.gateway.gateway import Gateway, Tier
    from thrifty.gateway.ledger import Ledger

    router = router if router is not None else check_tiers(config)
    settings = router_settings(config)
    tiers = []
    for t in config.tiers():
        if t.remote:
            key = os.environ.get(t.api_key_env) if t.api_key_env else None
            backend = RemoteBackend(t.name, str(t.api_base), t.model, key, t.timeout_s)
            price, how = resolve_price(t, settings)
            aliases: tuple[str, ...] = ()
        else:
            backend, price, how = _load_local(t, settings, config.server.deadline_admission)
            aliases = (t.model,)
        print(f"thrifty: tier {t.name} ({'remote ' + str(t.api_base) if t.remote else 'local'}): "
              f"{price.describe()} ({how})", file=sys.stderr, flush=True)
        tiers.append(Tier(t.name, backend, price, aliases, t.timeout_s))
    return Gateway(tiers, router, settings, Ledger(ledger_path(config)), cache, config.cache)


# A server keeps streaming requests' time per token within 2x while long prompts prefill (scheduler fairness);
# offline batches (LLM, benchmarks) keep EngineConfig's default, full-budget prefill chunks, for throughput.
SERVING_ENGINE_DEFAULTS = {"max_decode_slowdown": 2.0}


def _load_local(t: TierSettings, settings: RouterSettings, seed_prefill_rate: bool = False):
    from thrifty.engine.async_engine import AsyncEngine
    from thrifty.engine.engine import LLMEngine
    from thrifty.gateway.backends import LocalBackend
    from thrifty.engine.throughput import measured_throughput

    print(f"thrifty: loading {t.model} for tier {t.name} ...", file=sys.stderr, flush=True)
    engine = LLMEngine.from_model(t.model, **{**SERVING_ENGINE_DEFAULTS, **t.engine})

    def throughput() -> tuple[float, float]:
        result, reused = measured_throughput(engine)
        if not reused:
            print(f"thrifty: measured tier {t.name}'s throughput in {result.seconds:.1f} s", file=sys.stderr,
                  flush=True)
        return result.prefill_tokens_per_s, result.decode_tokens_per_s

    price, how = resolve_price(t, settings, throughput)
    if seed_prefill_rate:  # admission by deadline judges the first prompts by the probe, later ones by traffic
        engine.prefill_rate.seed(throughput()[0])
    return LocalBackend(t.name, AsyncEngine(engine), t.model), price, how
