"""A remote OpenAI-compatible API as a tier's backend (vLLM, SGLang, llama.cpp, a cloud API, another thrifty).

It has no tokenizer of ours: `prepare` checks only what needs no tokens (max_tokens against the limit) and
the remote checks the rest, its 400s coming back as InvalidRequestError. API keys come from the
environment (the tier's api_key_env), travel only in the Authorization header, and are scrubbed from
every error message.
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator

from thrifty.engine.engine import RequestOutput, Usage
from thrifty.errors import ThriftyError
from thrifty.gateway.backends import (BackendError, RemoteRequestError, TextLogprob, TierTimeoutError,
                                      fit_max_tokens)
from thrifty.gateway.request import BackendRequest, GatewayRequest

_CLIENT_ERRORS = (400, 413, 422)            # the request's fault; anything else is the tier's


class RemoteBackend:
    """A remote OpenAI-compatible server (/v1/chat/completions, /v1/completions), always streamed (SSE)
    so a long answer is not held in a proxy's buffer and usage arrives in the last chunk."""

    remote = True

    def __init__(self, name: str, api_base: str, model: str, api_key: str | None = None,
                 timeout_s: float = 120.0, transport: Any = None) -> None:
        self.name, self.api_base, self.model = name, api_base.rstrip("/"), model
        self._key = api_key
        self.timeout_s = timeout_s
        self._transport = transport
        self._client = None

    def _http(self):
        import httpx

        if self._client is None:  # created on first use, inside the loop that uses it
            headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
            self._client = httpx.AsyncClient(base_url=self.api_base, headers=headers, transport=self._transport,
                                             timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)))
        return self._client

    def prepare(self, request: GatewayRequest) -> BackendRequest:
        return BackendRequest(request, [], fit_max_tokens(request, 0, None), self.name)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def body(self, request: BackendRequest, logprobs: bool) -> dict[str, Any]:
        body = {k: v for k, v in request.forward.items() if k not in ("model", "stream", "stream_options", "cache")}
        body.update(model=self.model, stream=True, stream_options={"include_usage": True})
        if request.chat:
            body["messages"] = request.messages
            if logprobs and not body.get("logprobs"):
                body["logprobs"] = True
        else:
            body["prompt"] = request.prompt
            if logprobs and body.get("logprobs") is None:
                body["logprobs"] = 0
        if "max_tokens" not in body and "max_completion_tokens" not in body:  # our limit, not the remote's default
            body["max_tokens"] = request.params.max_tokens
        return body

    async def generate(self, request: BackendRequest, logprobs: bool = False) -> AsyncIterator[RequestOutput]:
        import httpx

        path = "/chat/completions" if request.chat else "/completions"
        try:
            async with self._http().stream("POST", path, json=self.body(request, logprobs)) as r:
                if r.status_code != 200:
                    raise self._status_error(r.status_code, (await r.aread()).decode("utf-8", "replace"))
                async for out in self._parse(request, r.aiter_lines()):
                    yield out
        except httpx.TimeoutException as e:
            raise TierTimeoutError(self.name, f"{self.api_base} did not answer in time ({type(e).__name__})") from None
        except httpx.HTTPError as e:
            raise BackendError(self.name, f"{self.api_base}: {self._scrub(str(e)) or type(e).__name__}") from None

    def _status_error(self, status: int, text: str) -> ThriftyError:
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text.strip()[:300]
        message = self._scrub(str(message))
        if status in _CLIENT_ERRORS:
            return RemoteRequestError(f"tier '{self.name}' refused the request: {message}")
        fix = "check the tier's api_key_env" if status in (401, 403) else ""
        return BackendError(self.name, f"{self.api_base} answered HTTP {status}: {message}", fix)

    async def _parse(self, request: BackendRequest, lines: AsyncIterator[str]) -> AsyncIterator[RequestOutput]:
        text, lps, finish, usage, n_chunks = "", [], None, None, 0
        ids = list(request.prompt_ids)
        async for line in lines:
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise BackendError(self.name, "the stream held a line that is not JSON") from None
            if "error" in chunk:
                raise BackendError(self.name, self._scrub(str(chunk["error"].get("message", chunk["error"]))))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content") if request.chat else choice.get("text")
                lps.extend(_logprobs(choice.get("logprobs"), request.chat))
                finish = choice.get("finish_reason") or finish
                if delta:
                    n_chunks += 1
                    text += delta
                    yield RequestOutput(request.request_id, None, ids, text, [], delta, [], False, None, None,
                                        list(lps), _usage(usage, ids, n_chunks, len(lps)))
        if finish is None and usage is None:
            raise BackendError(self.name, "the stream ended before the answer did")
        yield RequestOutput(request.request_id, None, ids, text, [], "", [], True, finish or "stop", None,
                            list(lps), _usage(usage, ids, n_chunks, len(lps)))

    async def warm_up(self) -> None:
        """Nothing: a remote server warms itself, and a down one must not keep this one from starting."""

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _usage(usage: dict | None, ids: list[int], n_chunks: int, n_logprobs: int) -> Usage:
    """The remote's usage; before it arrives (or from a server that sends none), our best count."""
    if usage:
        details = usage.get("prompt_tokens_details") or {}
        return Usage(int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0),
                     int(usage.get("completion_tokens", 0)), None, None)
    return Usage(len(ids), 0, max(n_chunks, n_logprobs), None, None)


def _logprobs(data: dict | None, chat: bool) -> list[TextLogprob]:
    if not data:
        return []
    if chat:
        return [TextLogprob(e["token"], float(e["logprob"]),
                            [(t["token"], float(t["logprob"])) for t in e.get("top_logprobs") or []], e.get("bytes"))
                for e in data.get("content") or []]
    tops = data.get("top_logprobs") or []
    return [TextLogprob(tok, float(lp) if lp is not None else float("-inf"),
                        list((tops[i] or {}).items()) if i < len(tops) else None)
            for i, (tok, lp) in enumerate(zip(data.get("tokens") or [], data.get("token_logprobs") or []))]
