"""Virtual API keys, as LiteLLM's proxy has them: many keys, each with a tenant, a requests-per-minute and a
tokens-per-minute limit and a USD budget per day or month (the spend is read from the cost ledger).

Keys are stored hashed (SHA-256) in SQLite, never in clear: `thrifty keys add` shows a new key once. A key is
named by its id (`key-` and 12 hex digits of its hash) in lists, logs and the ledger. Revoking takes effect on
the next request (every look-up reads the store).
"""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from thrifty.errors import InvalidRequestError, ThriftyError

PERIODS = ("day", "month")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY, key_id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, rpm INTEGER, tpm INTEGER,
    budget_usd REAL, period TEXT NOT NULL, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
"""
_FIELDS = ("key_id", "tenant", "rpm", "tpm", "budget_usd", "period", "created", "revoked")


@dataclass(slots=True, frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    rpm: int | None = None            # requests per minute (None: no limit)
    tpm: int | None = None            # prompt + completion tokens per minute
    budget_usd: float | None = None   # spend per `period`, from the ledger
    period: str = "month"             # day | month (UTC calendar)
    created: float = 0.0
    revoked: bool = False


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(secret: str) -> str:
    """The name a key goes by in lists, logs and the ledger (never the key itself)."""
    return "key-" + hash_secret(secret)[:12]


def default_path() -> Path:
    from thrifty.paths import home

    return home() / "keys" / "keys.sqlite3"


class KeyStore:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False)
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise ThriftyError(f"cannot open the key store {self.path}: {e}", "check the path and its permissions") \
                from None
        self._lock = threading.Lock()

    def add(self, tenant: str, rpm: int | None = None, tpm: int | None = None, budget_usd: float | None = None,
            period: str = "month") -> tuple[str, ApiKey]:
        """(the secret, shown once; its record)."""
        _check(tenant, rpm, tpm, budget_usd, period)
        secret = "sk-thrifty-" + secrets.token_urlsafe(24)
        key = ApiKey(key_id_of(secret), tenant, rpm, tpm, budget_usd, period, time.time())
        with self._lock:
            self._db.execute(f"INSERT INTO api_keys (key_hash, {', '.join(_FIELDS)}) VALUES (?{', ?' * len(_FIELDS)})",
                             (hash_secret(secret), *(_column(getattr(key, f)) for f in _FIELDS)))
            self._db.commit()
        return secret, key

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM api_keys ORDER BY created").fetchall()
        return [_key(row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        """True when an active key of that id was revoked."""
        with self._lock:
            changed = self._db.execute("UPDATE api_keys SET revoked = 1 WHERE key_id = ? AND revoked = 0",
                                       (key_id,)).rowcount
            self._db.commit()
        return changed > 0

    def lookup(self, secret: str) -> ApiKey | None:
        """The active key with this secret, or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM api_keys WHERE key_hash = ? AND revoked = 0",
                                   (hash_secret(secret),)).fetchone()
        return _key(row) if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _check(tenant: str, rpm: int | None, tpm: int | None, budget_usd: float | None, period: str) -> None:
    if not tenant:
        raise InvalidRequestError("a key needs a tenant", "pass --tenant NAME", param="tenant")
    for name, value in (("rpm", rpm), ("tpm", tpm), ("budget_usd", budget_usd)):
        if value is not None and value <= 0:
            raise InvalidRequestError(f"{name} must be > 0, got {value}", "leave it out for no limit", param=name)
    if period not in PERIODS:
        raise InvalidRequestError(f"unknown budget period '{period}'", f"use one of {', '.join(PERIODS)}",
                                  param="period")


def _column(value):
    return int(value) if isinstance(value, bool) else value


def _key(row: tuple) -> ApiKey:
    d = dict(zip(_FIELDS, row))
    d["revoked"] = bool(d["revoked"])
    return ApiKey(**d)
