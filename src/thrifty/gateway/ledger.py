"""The cost ledger: what each request cost, on which tier, and what it would have cost without thrifty.

One row per tier a request ran on (a cascade that escalated has two: it pays for both), written to SQLite
(one file under $THRIFTY_HOME/ledger/, or the path in the config) so `thrifty report` and
GET /v1/thrifty/report can add them up later. The final row of a request also carries

- baseline_usd: the same tokens on the baseline tier (the most expensive by output price), what the
  request would have cost with no routing and no response cache;
- saved_cache_usd: for an answer from the response cache or a coalesced request (cost 0), what it
  would have cost on its own tier.

Savings are derived, never stored: saved by caching = sum(saved_cache_usd); saved by routing =
baseline - cost - saved by caching (negative when escalations cost more than routing saved).
"""
from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thrifty.errors import ThriftyError

log = logging.getLogger("thrifty.gateway")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    ts REAL NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL, tier TEXT NOT NULL, reason TEXT NOT NULL,
    cache TEXT NOT NULL, final INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL, baseline_usd REAL NOT NULL,
    saved_cache_usd REAL NOT NULL, key_id TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS charges_ts ON charges (ts);
"""
_COLUMNS = ("ts", "request_id", "model", "tier", "reason", "cache", "final", "prompt_tokens", "cached_tokens",
            "completion_tokens", "cost_usd", "baseline_usd", "saved_cache_usd", "key_id")


@dataclass(slots=True)
class Charge:
    """One tier's part of one request."""
    request_id: str
    tier: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float
    baseline_usd: float = 0.0                # final rows only
    saved_cache_usd: float = 0.0             # final rows of cache hits / coalesced requests only
    final: bool = True                       # False: an answer the cascade threw away
    model: str = ""                          # the model name the client asked for ("auto", a tier)
    reason: str = ""                         # the route, as in the x-thrifty-route header
    cache: str = ""                          # "", hit, semantic-hit, coalesced
    key_id: str = ""                         # the virtual API key that paid (thrifty.server.api_keys), if any
    ts: float = field(default_factory=time.time)


@dataclass(slots=True)
class Totals:
    name: str                                # a tier, or "total"
    requests: int = 0                        # answered (final rows)
    attempts: int = 0                        # rows, escalated ones included
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    baseline_usd: float = 0.0
    saved_cache_usd: float = 0.0

    @property
    def saved_routing_usd(self) -> float:
        return self.baseline_usd - self.cost_usd - self.saved_cache_usd

    def add(self, c: Charge) -> None:
        self.requests += int(c.final)
        self.attempts += 1
        self.prompt_tokens += c.prompt_tokens
        self.cached_tokens += c.cached_tokens
        self.completion_tokens += c.completion_tokens
        self.cost_usd += c.cost_usd
        self.baseline_usd += c.baseline_usd
        self.saved_cache_usd += c.saved_cache_usd

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saved_routing_usd": self.saved_routing_usd}


@dataclass(slots=True)
class Report:
    by_tier: list[Totals]
    total: Totals
    since: float | None = None
    series: list[tuple[float, float, float]] = field(default_factory=list)  # (ts, cost, baseline) per row

    def as_dict(self) -> dict[str, Any]:
        return {"since": _iso(self.since) if self.since else None, "by_tier": [t.as_dict() for t in self.by_tier],
                "total": self.total.as_dict(), "table": self.table()}

    def table(self) -> str:
        from thrifty.reporting import markdown_table

        headers = ("tier", "requests", "attempts", "prompt tokens", "cached", "completion tokens", "cost $",
                   "baseline $", "saved by routing $", "saved by caching $")
        rows = [(t.name, t.requests, t.attempts, t.prompt_tokens, t.cached_tokens, t.completion_tokens,
                 _usd(t.cost_usd), _usd(t.baseline_usd), _usd(t.saved_routing_usd), _usd(t.saved_cache_usd))
                for t in [*self.by_tier, self.total]]
        return markdown_table(headers, rows)

    def plot(self, path: str | Path) -> Path:
        """Cumulative cost against the baseline over the requests, and cost vs baseline by tier (PNG)."""
        from thrifty.reporting import pyplot, save_figure

        plt = pyplot()
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        cost = baseline = 0.0
        xs, costs, baselines = [], [], []
        for i, (_, c, b) in enumerate(self.series):
            cost, baseline = cost + c, baseline + b
            xs.append(i + 1)
            costs.append(cost)
            baselines.append(baseline)
        ax1.plot(xs, baselines, label="baseline (largest tier only)")
        ax1.plot(xs, costs, label="thrifty (routing + caching)")
        ax1.set_xlabel("ledger rows (oldest first)")
        ax1.set_ylabel("cumulative USD")
        ax1.set_title("cost against the baseline")
        ax1.legend(fontsize=8)
        names = [t.name for t in self.by_tier]
        pos = range(len(names))
        ax2.bar([p - 0.2 for p in pos], [t.cost_usd for t in self.by_tier], 0.4, label="cost")
        ax2.bar([p + 0.2 for p in pos], [t.baseline_usd for t in self.by_tier], 0.4, label="baseline")
        ax2.set_xticks(list(pos), names)
        ax2.set_ylabel("USD")
        ax2.set_title("by tier (the tier that answered carries the baseline)")
        ax2.legend(fontsize=8)
        for ax in (ax1, ax2):
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        return save_figure(fig, plt, path)


class LedgerError(ThriftyError):
    """The ledger file cannot be opened or read."""


class Ledger:
    """The ledger in SQLite (path None: in memory, for tests and embedded apps), plus running totals of
    this process for the Prometheus counters. `book` only queues the rows: a writer thread commits them
    (one small WAL transaction per batch, no fsync), so booking costs the request's event loop
    microseconds; every read (`charges`, `report`) and `close` writes what is queued first."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False)
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            if "key_id" not in {row[1] for row in self._db.execute("PRAGMA table_info(charges)")}:
                self._db.execute("ALTER TABLE charges ADD COLUMN key_id TEXT NOT NULL DEFAULT ''")  # older files
        except (sqlite3.Error, OSError) as e:
            raise LedgerError(f"cannot open the cost ledger {self.path or ':memory:'}: {e}",
                              "check the path and its permissions") from None
        self._db_lock = threading.Lock()      # the connection; held across a batch's swap and write
        self._queue_lock = threading.Lock()   # the queued rows only: book() never waits for a write
        self._queued: list[tuple] = []
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None
        self._closed = False
        self.live: dict[str, Totals] = {}    # since this process started, by tier

    def book(self, charges: list[Charge]) -> None:
        for c in charges:
            self.live.setdefault(c.tier, Totals(c.tier)).add(c)
        rows = [tuple(int(v) if isinstance(v, bool) else v for v in (getattr(c, k) for k in _COLUMNS))
                for c in charges]
        with self._queue_lock:
            if self._closed:
                raise LedgerError("the cost ledger is closed")
            self._queued.extend(rows)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="thrifty-ledger", daemon=True)
                self._writer.start()
        self._wake.set()

    def _write_loop(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 -- a ledger that cannot write must not stop the server
                log.error("the cost ledger could not write: %s", e)

    def flush(self) -> None:
        """Write the queued rows now."""
        with self._db_lock:
            with self._queue_lock:
                rows, self._queued = self._queued, []
            if rows:
                self._db.executemany(f"INSERT INTO charges ({', '.join(_COLUMNS)}) VALUES "
                                     f"({', '.join('?' * len(_COLUMNS))})", rows)
                self._db.commit()

    def charges(self, since: float | None = None) -> list[Charge]:
        self.flush()
        where, args = ("WHERE ts >= ?", (since,)) if since is not None else ("", ())
        with self._db_lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM charges {where} ORDER BY ts, rowid",
                                    args).fetchall()
        out = []
        for row in rows:
            d = dict(zip(_COLUMNS, row))
            d["final"] = bool(d["final"])
            out.append(Charge(**d))
        return out

    def report(self, since: float | None = None, order: list[str] | None = None) -> Report:
        return summarize(self.charges(since), since, order)

    def spend(self, key_id: str, since: float) -> float:
        """USD charged to the API key `key_id` since `since` (Unix time)."""
        self.flush()
        with self._db_lock:
            row = self._db.execute("SELECT SUM(cost_usd) FROM charges WHERE key_id = ? AND ts >= ?",
                                   (key_id, since)).fetchone()
        return float(row[0] or 0.0)

    def close(self) -> None:
        self.flush()
        with self._queue_lock:
            self._closed = True
        self._wake.set()
        with self._db_lock:
            self._db.close()


def summarize(charges: list[Charge], since: float | None = None, order: list[str] | None = None) -> Report:
    """Totals by tier (in `order`, cheapest first, then any others by name) and overall."""
    by_tier: dict[str, Totals] = {}
    total = Totals("total")
    for c in charges:
        by_tier.setdefault(c.tier, Totals(c.tier)).add(c)
        total.add(c)
    rank = {name: i for i, name in enumerate(order or [])}
    return Report(sorted(by_tier.values(), key=lambda t: (rank.get(t.name, len(rank)), t.name)), total, since,
                  [(c.ts, c.cost_usd, c.baseline_usd) for c in charges])


def open_ledger(path: str | Path) -> Ledger:
    """An existing ledger file for reading (a clear error when there is none yet)."""
    p = Path(path)
    if not p.exists():
        raise LedgerError(f"no cost ledger at {p} yet", "serve some requests first (thrifty serve), or pass --ledger")
    return Ledger(p)


def parse_since(text: str | None) -> float | None:
    """An ISO 8601 date or time (local time when no zone is given) as a Unix time."""
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise LedgerError(f"--since {text!r} is not an ISO 8601 date or time",
                          "use e.g. 2025-01-31 or 2025-01-31T08:00:00+00:00") from None
    return when.timestamp()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat()


def _usd(v: float) -> str:
    return f"{v:.8f}"
