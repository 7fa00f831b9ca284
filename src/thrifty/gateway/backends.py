"""Backends: where a tier's requests run. The local engine here, a remote OpenAI-compatible API over HTTP
in thrifty.gateway.remote.

Each backend owns its tokenization and checks: `prepare(request)` turns a GatewayRequest into a
BackendRequest (prompt ids in its vocabulary, max_tokens fitted to its context) or raises
InvalidRequestError, once; `generate(prepared)` runs it without checking again. Both stream
`RequestOutput`s (the engine's own type), so an answer is formatted, cached and counted the same way
whichever tier produced it. A backend raises

- `BackendError` when the tier failed (unreachable, 5xx, 429, a refused API key, a broken stream): the
  gateway retries it, falls to another tier and lets it cool down (thrifty.gateway.fallback);
- `InvalidRequestError` when the request itself is bad: no other tier would do better, so it goes
  straight back to the client as a 400.

Remote API keys come from the environment (the tier's api_key_env), travel only in the Authorization
header, and are scrubbed from every error message.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from thrifty.engine.engine import RequestOutput
from thrifty.engine.sampling import SamplingParams
from thrifty.errors import InvalidRequestError, ThriftyError
from thrifty.gateway.request import BackendRequest, GatewayRequest


class BackendError(ThriftyError):
    """A tier failed to answer (not the request's fault): retry, fall back, cool down."""

    def __init__(self, tier: str, message: str, fix: str = "") -> None:
        super().__init__(f"tier '{tier}' failed: {message}", fix)
        self.tier = tier


class TierTimeoutError(BackendError):
    """A tier took longer than its timeout_s."""


class RemoteRequestError(InvalidRequestError):
    """A remote tier refused the request as invalid (HTTP 400, 413, 422)."""


@dataclass(slots=True)
class TextLogprob:
    """A remote tier's token logprob: it names tokens by text, not by our vocabulary's ids."""
    token: str
    logprob: float
    top: list[tuple[str, float]] | None = None
    bytes: list[int] | None = None


class Backend(Protocol):
    name: str
    remote: bool

    def prepare(self, request: GatewayRequest) -> BackendRequest:
        """`request` tokenized and checked for this backend; InvalidRequestError when it is bad."""
        ...

    def generate(self, request: BackendRequest, logprobs: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream the outputs; `logprobs`: also return the sampled tokens' logprobs (the cascade's check)."""
        ...

    async def warm_up(self) -> None:
        """Whatever makes the first request as fast as the next (a server calls it before it says ready)."""
        ...

    async def close(self) -> None: ...


def prompt_ids(tokenizer: Any, chat: bool, messages: list[dict] | None, prompt: str | list[int] | None) -> list[int]:
    """A request's prompt as token ids of `tokenizer`: chat messages through the chat template."""
    if chat:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special_tokens=False)
    return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt or [])


def fit_max_tokens(request: GatewayRequest, num_prompt: int, max_model_len: int | None) -> SamplingParams:
    """The request's params with max_tokens checked against the limits and the context (None: a remote
    context, which the remote checks), or lowered to fit when the client did not ask for a number."""
    params, limit = request.params, request.limits.max_output_tokens
    asked = params.max_tokens
    room = max_model_len - num_prompt if max_model_len is not None else 1 << 62
    if not request.max_tokens_given:
        fitted = max(1, min(asked, limit, room))
        return params if fitted == asked else dataclasses.replace(params, max_tokens=fitted)
    if asked > limit:
        raise InvalidRequestError(f"max_tokens is {asked}, above this server's limit of {limit}",
                                  f"ask for at most {limit} tokens", param="max_tokens")
    if asked > room:
        raise InvalidRequestError(
            f"this model's context holds {max_model_len} tokens, but {num_prompt + asked} were "
            f"requested ({num_prompt} in the prompt, {asked} for the output)",
            "shorten the prompt or lower max_tokens", param="max_tokens")
    return params


class LocalBackend:
    """The local engine (thrifty.engine.async_engine.AsyncEngine) of one tier."""

    remote = False

    def __init__(self, name: str, engine: Any, model: str = "") -> None:
        self.name, self.engine, self.model = name, engine, model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats_snapshot(self) -> Any:
        return self.engine.stats_snapshot()

    def prepare(self, request: GatewayRequest) -> BackendRequest:
        ids = prompt_ids(self.tokenizer, request.chat, request.messages, request.prompt)
        param = "messages" if request.chat else "prompt"
        limit = request.limits.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens, above this server's limit of {limit}",
                                      "shorten the prompt", param=param)
        try:
            valid = self.engine.validate(ids, request.params)
        except InvalidRequestError as e:
            e.param = param if e.param == "prompt" else e.param
            raise
        params = fit_max_tokens(request, len(ids), self.max_model_len)
        valid = dataclasses.replace(valid, params=params)
        return BackendRequest(request, valid.prompt_token_ids, params, self.name, valid)

    async def generate(self, request: BackendRequest, logprobs: bool = False) -> AsyncIterator[RequestOutput]:
        if request.checked_by != self.name:  # checked by another tier: its vocabulary and context differ
            request = self.prepare(request.request)
        valid = request.valid
        if logprobs and valid.params.logprobs is None:  # 0: the sampled token's logprob only, no top list
            valid = dataclasses.replace(valid, params=dataclasses.replace(valid.params, logprobs=0))
        gen = self.engine.generate(valid, request_id=request.request_id)
        try:
            async for out in gen:
                yield out
        finally:
            await gen.aclose()

    async def warm_up(self) -> None:
        """One token through the whole path: builds the native kernels on a first start and runs one forward,
        so the first request does not pay for them (and a server says ready only after)."""
        gen = self.engine.generate([0], SamplingParams(max_tokens=1, temperature=0.0),
                                   request_id=f"warm-up-{self.name}")
        try:
            async for _ in gen:
                pass
        finally:
            await gen.aclose()

    async def close(self) -> None:
        await self.engine.shutdown()
