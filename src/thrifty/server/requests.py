"""OpenAI request bodies -> GatewayRequests: the checks that need no tokens (what thrifty does not support
yet, the field combinations OpenAI refuses), SamplingParams, the caller's identity and cache controls.
Everything that needs the prompt's tokens (lengths, the context, the vocabulary) is the backend's check
(thrifty.gateway.backends), done once when the gateway prepares the request."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from thrifty.config import ServerSettings
from thrifty.engine.sampling import SamplingParams
from thrifty.errors import InvalidRequestError
from thrifty.gateway.cache.keys import Controls
from thrifty.gateway.request import GatewayRequest, Limits
from thrifty.server import schemas as s

# OpenAI fields a remote tier is not sent from the client's body (the gateway sets or replaces them)
_NOT_FORWARDED = {"model", "stream", "stream_options", "cache", "messages", "prompt", "speculative"}
_SAMPLING = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "top_k", "min_p",
             "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
             "include_stop_str_in_output", "speculative")


@dataclass(slots=True, frozen=True)
class Caller:
    """Who sent the request, from its headers (and its virtual key, when the guard found one)."""
    api_key: str | None = None
    tenant: str | None = None
    cache_control: str | None = None
    key_id: str | None = None

    @staticmethod
    def of(headers: Any, key: Any = None) -> Caller:
        """`key`: the request's thrifty.server.api_keys.ApiKey; its tenant wins over the x-thrifty-tenant header."""
        secret = headers.get("authorization", "").partition(" ")[2].strip() or None
        tenant = key.tenant if key is not None else headers.get("x-thrifty-tenant")
        return Caller(secret, tenant, headers.get("cache-control"), key.key_id if key is not None else None)


def unsupported(param: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} is not supported by this server yet", f"remove '{param}' from the request",
                               param=param)


def _params(req: s._SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    if req.n is not None and req.n > 1:
        raise unsupported("n", "n > 1 (several choices per request)")
    if req.logit_bias:
        raise unsupported("logit_bias", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError("stream_options is only allowed with stream=true", param="stream_options")
    given = {k: getattr(req, k) for k in _SAMPLING if getattr(req, k) is not None}
    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **given)


def _request(prefix: str, req: s._SamplingFields, asked: int | None, default: int, logprobs: int | None,
             settings: ServerSettings, caller: Caller, **content: Any) -> GatewayRequest:
    limit = settings.max_output_tokens
    params = _params(req, asked if asked is not None else min(default, limit), logprobs)
    opts = req.cache.model_dump(by_alias=True) if req.cache is not None else None
    forward = {k: v for k, v in req.model_dump(exclude_unset=True).items() if k not in _NOT_FORWARDED}
    return GatewayRequest(f"{prefix}-{uuid.uuid4().hex}", req.model, params=params, max_tokens_given=asked is not None,
                          limits=Limits(settings.max_prompt_tokens, limit), forward=forward, api_key=caller.api_key,
                          tenant=caller.tenant, key_id=caller.key_id, cache=Controls.parse(opts, caller.cache_control),
                          **content)


def completion_request(req: s.CompletionRequest, settings: ServerSettings, caller: Caller) -> GatewayRequest:
    check_unicode(req.model_dump())
    if req.echo:
        raise unsupported("echo", "echo")
    if req.suffix:
        raise unsupported("suffix", "suffix")
    if req.best_of is not None and req.best_of > 1:
        raise unsupported("best_of", "best_of > 1")
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequestError(f"{len(prompt)} prompts in one request; batched prompts are not "
                                      "supported yet", "send one prompt per request", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise InvalidRequestError("the prompt is empty", "send at least one token", param="prompt")
    return _request("cmpl", req, req.max_tokens, 16, req.logprobs, settings, caller, chat=False, prompt=prompt)


def chat_request(req: s.ChatCompletionRequest, settings: ServerSettings, caller: Caller) -> GatewayRequest:
    check_unicode(req.model_dump())
    if req.tools or req.functions:
        raise unsupported("tools" if req.tools else "functions", "tool / function calling")
    if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
        raise unsupported("tool_choice", "tool / function calling")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise unsupported("response_format", "structured output (response_format other than text)")
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true", "set logprobs to true", param="top_logprobs")
    messages = [_message(m) for m in req.messages]
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top = (req.top_logprobs or 0) if req.logprobs else None
    return _request("chatcmpl", req, asked, settings.default_max_tokens, top, settings, caller, chat=True,
                    messages=messages)


def max_tokens_param(req: s.ChatCompletionRequest | s.CompletionRequest) -> str:
    """The field a max_tokens error names: the one the client used."""
    return "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"


def check_unicode(value: Any, path: str = "") -> None:
    """400 naming the field for a string that is not Unicode text: JSON allows a lone surrogate ("\\ud800"),
    which clients send when they cut a string inside an emoji, and no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(f"{path or 'a string'} holds a lone surrogate (U+{ord(value[e.start]):04X} at "
                                      f"character {e.start}), which is not text", "send valid UTF-8 text; a string cut "
                                      "inside an emoji leaves half of a surrogate pair", param=path or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, path)
            check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_unicode(item, f"{path}.{i}")  # the dotted form pydantic's errors use


def _message(m: s.ChatMessage) -> dict[str, Any]:
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.name is not None:  # part of the cache's scope
        out["name"] = m.name
    return out
