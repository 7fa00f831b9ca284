"""Typed configuration: one YAML file, overridden by CLI flags. Secrets are names of environment variables.

    model: qwen2.5-coder-0.5b-instruct     # zoo name, .gguf file or Hugging Face folder
    engine:                                # EngineConfig fields (thrifty.engine.engine)
      dtype: auto
      kv_cache_memory: 1.0
      max_num_seqs: 64
    server:
      host: 127.0.0.1
      port: 8000
      api_key_env: THRIFTY_API_KEY         # the API key is read from this variable; unset: no auth
      max_waiting_requests: 128
      max_output_tokens: 4096
      max_body_bytes: 1048576

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
    max_prompt_tokens: int | None = None     # default: the model's context
    max_output_tokens: int = 4096            # largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20            # larger request bodies: 413
    shutdown_timeout_s: float = 30.0         # SIGTERM: finish running requests up to this long
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("max_waiting_requests", "max_output_tokens", "max_body_bytes"):
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
class ThriftyConfig:
    model: str = DEFAULT_MODEL
    engine: dict[str, Any] = field(default_factory=dict)
    server: ServerSettings = field(default_factory=ServerSettings)

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
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build(hints[key], value or {}, name)
        else:
            values[key] = _check_type(value, hints[key], name)
    return cls(**values)


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
