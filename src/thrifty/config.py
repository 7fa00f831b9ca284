"""Typed configuration: one YAML file, overridden by CLI flags. Secrets are names of environment variables.

    model: qwen2.5-coder-0.5b-instruct     # zoo name, .gguf file or Hugging Face folder
    engine:                                # EngineConfig fields (thrifty.engine.engine)
      dtype: auto
      kv_cache_memory: 1.0
      kv_cache_dtype: auto                 # or bfloat16, float16, float32, int8, fp8_e4m3, fp8_e5m2
      max_num_seqs: 64
    server:
      host: 127.0.0.1
      port: 8000
      api_key_env: THRIFTY_API_KEY         # the API key is read from this variable; unset: no auth
      max_waiting_requests: 128
      max_output_tokens: 4096
      default_max_tokens: 512
      max_body_bytes: 1048576
    cache:                                 # response caching (thrifty.gateway.cache); see CacheSettings
      enabled: true
      store: embedded                      # embedded (SQLite + FAISS under $THRIFTY_HOME) | redis
      semantic: false                      # opt in: answers similar questions (MiniLM + guard)
    model_list:                            # tiers, cheapest first (LiteLLM-like); none: one tier from `model`
      - name: small
        model: qwen2.5-coder-0.5b-instruct
        price: {input: auto, cached_input: auto, output: auto}   # USD per 1M tokens, or auto
      - name: cloud
        model: gpt-4o-mini                 # the remote model name
        api_base: https://example.invalid/v1
        api_key_env: CLOUD_API_KEY         # read from the environment; never logged
        price: {input: 0.15, cached_input: 0.075, output: 0.60}
    router:                                # `model: auto` routes; naming a tier pins it
      strategy: cascade                    # fixed | classifier | cascade
      machine_usd_per_hour: 0.10           # what `auto` prices are derived from

Importing this module is cheap (no torch); `ThriftyConfig.engine_config()` checks the engine fields.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thrifty.errors import ThriftyError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


class ConfigError(ThriftyError):
    """A config file that cannot be read or holds unknown keys or wrong types."""


@dataclass(slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None     # default: the model name (a path's file stem)
    api_key_env: str | None = "THRIFTY_API_KEY"
    max_waiting_requests: int = 128          # accepted but not yet running; beyond it: 429 + Retry-After
    deadline_admission: bool = True          # refuse (400) or defer (429) a prompt whose prefill would end past its
                                             # tier's timeout_s at the measured prefill rate (thrifty.server.deadline)
    max_prompt_tokens: int | None = None     # default: the model's context
    max_output_tokens: int = 4096            # largest max_tokens a request may ask for
    default_max_tokens: int = 512            # a chat request without max_tokens (completions: OpenAI's 16)
    max_body_bytes: int = 1 << 20            # larger request bodies: 413
    shutdown_timeout_s: float = 30.0         # SIGTERM: finish running requests up to this long
    log_level: str = "info"
    ledger_path: str | None = None           # the cost ledger (SQLite); default $THRIFTY_HOME/ledger/ledger.sqlite3
    virtual_keys: bool = False               # API keys from `thrifty keys add` (tenant, rpm, tpm, budget each)
    keys_path: str | None = None             # their store (SQLite); default $THRIFTY_HOME/keys/keys.sqlite3

    def __post_init__(self) -> None:
        for name in ("max_waiting_requests", "max_output_tokens", "default_max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"server.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"server.port must be in [0, 65535], got {self.port}")

    def api_key(self) -> str | None:
        """The API key from the environment variable named by api_key_env (None: no auth)."""
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None


@dataclass(slots=True)
class CacheSettings:
    """Exact and semantic response caching, and coalescing of identical in-flight requests.

    Exact caching is on by default: it can only answer the very same request (same tenant, model,
    messages, parameters), and only deterministic ones (temperature 0 or a fixed seed). Semantic caching
    is opt-in: it answers a *different* question with a stored answer, which is a product decision;
    run `thrifty cache eval` on your own traffic's pairs before turning it on."""
    enabled: bool = True
    store: str = "embedded"                  # embedded | redis
    path: str | None = None                  # embedded: SQLite file; default $THRIFTY_HOME/cache/responses.sqlite3
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_url_env: str | None = "THRIFTY_REDIS_URL"  # when this variable is set it wins (URLs may hold passwords)
    namespace: str = "default"
    ttl_s: float | None = 86400.0            # entries live this long (None: until evicted)
    max_entries: int = 100_000               # size bound; least recently used out first
    cache_nondeterministic: bool = False     # also cache temperature > 0 without a seed
    coalesce: bool = True                    # identical in-flight requests run once
    semantic: bool = False
    embedder: str = "all-minilm-l6-v2"
    same_words: float = 0.30                 # guard thresholds (thrifty.gateway.cache.guard.GuardConfig)
    small_edit: float | None = 0.85          # a swap among generic verbs ("check"/"find"); None: never
    reworded: float | None = None            # None: a larger rewording never hits
    verify_soft: float | None = None         # cosine that overrules a soft refusal (never a hard fact); None: never
    semantic_max_chars: int = 2000           # longer texts: exact cache only
    timeout_ms: float | None = None          # per store call; default 50 (redis), 1000 (embedded)
    breaker_failures: int = 3                # errors in a row that open the circuit
    breaker_cooldown_s: float = 10.0

    def __post_init__(self) -> None:
        if self.store not in ("embedded", "redis"):
            raise ConfigError(f"cache.store must be 'embedded' or 'redis', got {self.store!r}")
        if self.max_entries < 1 or self.breaker_failures < 1:
            raise ConfigError("cache.max_entries and cache.breaker_failures must be >= 1")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ConfigError(f"cache.ttl_s must be > 0 or null, got {self.ttl_s}")

    def url(self) -> str:
        return (os.environ.get(self.redis_url_env) if self.redis_url_env else None) or self.redis_url

    def timeout_s(self) -> float:
        if self.timeout_ms is not None:
            return self.timeout_ms / 1000
        return 0.05 if self.store == "redis" else 1.0


AUTO = "auto"
STRATEGIES = ("fixed", "classifier", "cascade")
CASCADE_CHECKS = ("code", "logprob", "code+logprob")


@dataclass(slots=True)
class PriceSettings:
    """USD per 1M tokens. `auto` (local tiers only): derived from router.machine_usd_per_hour and the
    throughput measured on this machine (thrifty.gateway.costs)."""
    input: float | str = AUTO
    cached_input: float | str = AUTO         # auto: the input price x cached_input_fraction (local: auto)
    output: float | str = AUTO

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output"):
            v = getattr(self, name)
            if isinstance(v, str) and v != AUTO:
                raise ConfigError(f"price.{name} must be a number (USD per 1M tokens) or 'auto', got {v!r}")
            if isinstance(v, float) and v < 0:
                raise ConfigError(f"price.{name} must be >= 0, got {v}")

    @property
    def is_auto(self) -> bool:
        return AUTO in (self.input, self.cached_input, self.output)


@dataclass(slots=True)
class TierSettings:
    """One backend the router can send a request to: the local engine, or a remote OpenAI-compatible API."""
    name: str = ""
    model: str = ""                          # local: zoo name / .gguf / HF folder; remote: the remote model name
    engine: dict[str, Any] = field(default_factory=dict)   # local: EngineConfig fields
    api_base: str | None = None              # set: a remote tier (base URL ending in /v1)
    api_key_env: str | None = None           # remote: the API key is read from this environment variable
    price: PriceSettings | None = None       # required
    timeout_s: float = 120.0                 # a request slower than this counts as a failure (fallback)

    @property
    def remote(self) -> bool:
        return self.api_base is not None


@dataclass(slots=True)
class RouterSettings:
    """How `model: auto` picks a tier (tiers are ordered cheapest first), and how failures fall back."""
    strategy: str = "fixed"                  # fixed | classifier | cascade
    tier: str | None = None                  # fixed: the tier (default: the first)
    threshold: float | None = None           # classifier: P(cheapest tier fails) above it -> next tier;
                                             # cascade: confidence (exp of mean token logprob) below it -> escalate.
                                             # None: what `thrifty router calibrate` stored, else 0.5
    classifier_path: str | None = None       # default $THRIFTY_HOME/router/classifier.json
    calibration_path: str | None = None      # default $THRIFTY_HOME/router/calibration.json
    check: str = "code+logprob"              # cascade: code | logprob | code+logprob
    sandbox_timeout_s: float = 5.0           # cascade code check: per answer
    sandbox_memory_mb: int = 512
    machine_usd_per_hour: float = 0.10       # auto prices: what this machine costs
    cached_input_fraction: float = 0.1       # auto cached-input price = input price x this
    retries: int = 1                         # per tier, before falling to the next
    backoff_s: float = 0.5                   # first retry waits this long, then doubles
    cooldown_s: float = 30.0                 # a tier that failed is skipped this long
    fallback: bool = True                    # a failing tier falls to the next one

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"router.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.check not in CASCADE_CHECKS:
            raise ConfigError(f"router.check must be one of {', '.join(CASCADE_CHECKS)}, got {self.check!r}")
        if self.machine_usd_per_hour < 0 or self.retries < 0 or self.backoff_s < 0 or self.cooldown_s < 0:
            raise ConfigError("router.machine_usd_per_hour, retries, backoff_s and cooldown_s must be >= 0")


DEFAULT_TIERS = (("small", "qwen2.5-coder-0.5b-instruct"), ("large", "qwen2.5-coder-1.5b-instruct"))


@dataclass(slots=True)
class ThriftyConfig:
    model: str = DEFAULT_MODEL
    engine: dict[str, Any] = field(default_factory=dict)
    server: ServerSettings = field(default_factory=ServerSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    model_list: list[TierSettings] | None = None
    router: RouterSettings | None = None

    def tiers(self) -> list[TierSettings]:
        """The tiers, cheapest first: model_list; else small + large when a router is configured; else one
        tier serving `model`."""
        if self.model_list is not None:
            return list(self.model_list)
        if self.router is not None:
            return [TierSettings(name, model, price=PriceSettings()) for name, model in DEFAULT_TIERS]
        return [TierSettings(self.served_model_name(), self.model, dict(self.engine), price=PriceSettings())]

    def engine_config(self):
        """The engine section as an EngineConfig (imports torch)."""
        from thrifty.engine.engine import EngineConfig

        try:
            return EngineConfig(**self.engine)
        except TypeError as e:
            known = ", ".join(f.name for f in dataclasses.fields(EngineConfig))
            raise ConfigError(f"bad engine section: {e}", f"known engine fields: {known}") from None

    def served_model_name(self) -> str:
        if self.server.served_model_name:
            return self.server.served_model_name
        path = Path(self.model)
        return path.stem if path.suffix.lower() == ".gguf" else path.name if os.sep in self.model else self.model


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """`value` if it fits the (simple) type hint; ints are accepted for floats."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for opt in options:
        origin = typing.get_origin(opt) or opt
        if opt is type(None) and value is None:
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, bool):
            continue
        if isinstance(origin, type) and origin is not type(None) and isinstance(value, origin):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{where} must be {names}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or 'the config'}: {', '.join(map(str, unknown))}",
                          f"known keys: {', '.join(sorted(known))}")
    values = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        values[key] = _build_value(hints[key], value, name)
    return cls(**values)


def _build_value(hint: Any, value: Any, where: str) -> Any:
    """A dataclass, a list of dataclasses (optional or not) from YAML data; other values type-checked."""
    options = [o for o in typing.get_args(hint) if o is not type(None)] if isinstance(hint, types.UnionType) \
        else [hint]
    if value is None and len(options) < len(typing.get_args(hint) or (hint,)):
        return None
    inner = options[0] if len(options) == 1 else None
    if inner is not None and dataclasses.is_dataclass(inner):
        return _build(inner, value or {}, where)
    if inner is not None and typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_build(typing.get_args(inner)[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    return _check_type(value, hint, where)


def load_config(path: str | Path | None = None) -> ThriftyConfig:
    """The config in `path` (YAML), or the defaults when path is None."""
    if path is None:
        return ThriftyConfig()
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist", "check the --config path") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    return _build(ThriftyConfig, data or {}, "")
