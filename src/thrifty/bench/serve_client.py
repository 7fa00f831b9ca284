"""One streamed chat request to an OpenAI-compatible server, timed as the client sees it (httpx, SSE)."""
from __future__ import annotations

import json
import time

import httpx

from thrifty.bench.serve_data import ServeRequest
from thrifty.bench.serve_metrics import RequestTiming


def request_body(model: str, req: ServeRequest, extra_body: dict | None = None) -> dict:
    body = {"model": model, "messages": req.messages, "max_tokens": req.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    body.update(extra_body or {})
    return body


async def send(client: httpx.AsyncClient, base_url: str, body: dict, prompt_tokens: int,
               api_key: str | None = None, sent: float = 0.0) -> RequestTiming:
    """POST /chat/completions and read the stream: first content chunk -> TTFT, gaps -> ITL, the usage chunk
    (when the server sends one) -> token counts, else one token per content chunk."""
    timing = RequestTiming(sent=sent, prompt_tokens=prompt_tokens)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = last = time.perf_counter()
    chunks, usage = 0, None
    try:
        async with client.stream("POST", base_url.rstrip("/") + "/chat/completions", json=body,
                                 headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                timing.error = f"HTTP {r.status_code}: {text[:200]}"
                return timing
            async for line in r.aiter_lines():
                data = _data(line)
                if data is None:
                    continue
                if data.get("usage"):
                    usage = data["usage"]
                if not _has_text(data):
                    continue
                now = time.perf_counter()
                if timing.ttft is None:
                    timing.ttft = now - start
                else:
                    timing.itls.append(now - last)
                last, chunks = now, chunks + 1
    except (httpx.HTTPError, ValueError) as e:
        timing.error = f"{type(e).__name__}: {e}"[:200]
        return timing
    timing.e2el = time.perf_counter() - start
    timing.output_tokens = int(usage.get("completion_tokens") or chunks) if usage else chunks
    if usage and usage.get("prompt_tokens"):
        timing.prompt_tokens = int(usage["prompt_tokens"])
    if timing.ttft is None:
        timing.error = "no content streamed"
    return timing


def _data(line: str) -> dict | None:
    """The JSON of one SSE `data:` line; None for other lines and the final [DONE]."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    return json.loads(payload)


def _has_text(data: dict) -> bool:
    for choice in data.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or choice.get("text"):
            return True
    return False
