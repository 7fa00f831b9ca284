"""The soak's traffic: a mix of request kinds, each sent over raw HTTP and judged by what came back.

    short      a chat question, 16 tokens, one JSON answer
    streamed   a ~200-token prompt, 64 tokens streamed
    long       a ~1,500-token prompt, 32 tokens streamed
    cancelled  streamed, and the client hangs up after a few chunks
    malformed  broken JSON, missing or ill-typed fields, a lone surrogate, an unknown model: a 4xx is right
    too_long   a prompt past what the server can prefill within its deadline: a 400 (or 429) is right

Outcomes: completed, cancelled (by the client, as planned), rejected (429), refused (the 4xx a malformed or too
long request should get), client_error (a 4xx a good request should not get), server_error (5xx), lost (accepted,
then neither finished nor cancelled by the client: a broken stream, a transport error)."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

KINDS = ("short", "streamed", "long", "cancelled", "malformed", "too_long")
DEFAULT_MIX = {"short": 0.35, "streamed": 0.25, "long": 0.08, "cancelled": 0.15, "malformed": 0.15, "too_long": 0.02}
CANCEL_AFTER_CHUNKS = 4
OUTCOMES = ("completed", "cancelled", "rejected", "refused", "client_error", "server_error", "lost")


@dataclass(slots=True)
class Prompts:
    """Text to cut prompts from (the standard library's own sources), sized with the served model's tokenizer."""
    text: str
    tokenizer: Any
    long_tokens: int = 1500
    too_long_tokens: int = 24000

    def cut(self, rng: random.Random, tokens: int) -> str:
        """About `tokens` tokens of text from a random place, behind a random tag so no two share a prefix."""
        start = rng.randrange(0, max(1, len(self.text) - tokens * 6))
        ids = self.tokenizer.encode(self.text[start:start + tokens * 6])[:tokens]
        return f"[{rng.getrandbits(48):x}] " + self.tokenizer.decode(ids)


@dataclass(slots=True)
class Result:
    kind: str
    sent: float                              # seconds since the soak began
    outcome: str = "lost"
    status: int | None = None
    ttft: float | None = None                # streamed: first content chunk; short: the whole answer (a bound)
    tpot: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    detail: str = ""


@dataclass(slots=True)
class Request:
    kind: str
    body: dict | None                        # None: `raw` is sent as the body as it is
    raw: bytes | None = None
    model_ok: bool = True
    headers: dict = field(default_factory=lambda: {"content-type": "application/json"})


def make_request(kind: str, model: str, prompts: Prompts, rng: random.Random) -> Request:
    tag = f"[{rng.getrandbits(48):x}]"
    if kind == "short":
        q = rng.choice(("What is a Python list?", "Name a sorting algorithm.", "What does HTTP 429 mean?",
                        "Write a haiku about caches.", "What is 17 times 23?"))
        return Request(kind, {"model": model, "messages": [{"role": "user", "content": f"{tag} {q}"}],
                              "max_tokens": 16, "temperature": 0})
    if kind in ("streamed", "long", "cancelled", "too_long"):
        tokens = {"streamed": 200, "cancelled": 200, "long": prompts.long_tokens,
                  "too_long": prompts.too_long_tokens}[kind]
        max_tokens = {"streamed": 64, "long": 32, "cancelled": 256, "too_long": 8}[kind]
        text = prompts.cut(rng, tokens)
        return Request(kind, {"model": model, "stream": True, "stream_options": {"include_usage": True},
                              "max_tokens": max_tokens, "temperature": 0.7, "seed": rng.getrandbits(31),
                              "messages": [{"role": "user", "content": f"Explain this code:\n{text}"}]})
    return _malformed(model, rng)


def _malformed(model: str, rng: random.Random) -> Request:
    msg = [{"role": "user", "content": "hi"}]
    choice = rng.randrange(7)
    if choice == 0:
        return Request("malformed", None, b'{"model": "' + model.encode() + b'", "messages": [')
    if choice == 1:
        return Request("malformed", None, b'{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}]}'
                       .replace(b'"x"', json.dumps(model).encode()))
    bodies = [{"model": model}, {"model": model, "messages": "not a list"},
              {"model": model, "messages": msg, "max_tokens": -5},
              {"model": "no-such-model", "messages": msg, "max_tokens": 4},
              {"model": model, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}]
    return Request("malformed", bodies[choice - 2])


async def send(client: httpx.AsyncClient, url: str, req: Request, sent: float) -> Result:
    """Send one request and judge its outcome (see the module's doc)."""
    res = Result(req.kind, sent)
    content = req.raw if req.body is None else json.dumps(req.body).encode()
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, content=content, headers=req.headers) as r:
            res.status = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                res.outcome, res.detail = _refusal(req.kind, r.status_code), text[:160]
                return res
            if not (req.body or {}).get("stream"):
                data = json.loads(await r.aread())
                res.e2e = res.ttft = time.perf_counter() - start
                res.output_tokens = int(data["usage"]["completion_tokens"])
                res.outcome = "completed" if data["choices"][0].get("finish_reason") else "lost"
                return res
            await _read_stream(r, req, res, start)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        res.outcome, res.detail = "lost", f"{type(e).__name__}: {e}"[:160]
    return res


async def _read_stream(r: httpx.Response, req: Request, res: Result, start: float) -> None:
    chunks, finished = 0, False
    async for line in r.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        data = json.loads(payload)
        if "error" in data:
            res.outcome, res.detail = "server_error", str(data["error"])[:160]
            return
        if data.get("usage"):
            res.output_tokens = int(data["usage"]["completion_tokens"])
        for choice in data.get("choices") or ():
            finished = finished or bool(choice.get("finish_reason"))
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
                if res.ttft is None:
                    res.ttft = time.perf_counter() - start
        if req.kind == "cancelled" and chunks >= CANCEL_AFTER_CHUNKS:
            res.outcome = "cancelled"     # leaving the `async with` closes the connection mid-stream
            return
    res.e2e = time.perf_counter() - start
    if res.ttft is not None and res.output_tokens > 1:
        res.tpot = (res.e2e - res.ttft) / (res.output_tokens - 1)
    res.outcome = "completed" if finished or res.output_tokens else "lost"


def _refusal(kind: str, status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == 429 and kind != "malformed":
        return "rejected"
    expected = kind in ("malformed", "too_long")
    return "refused" if expected else "client_error"
