"""OpenAI bodies -> gateway requests, without a server: the default output length and the Unicode check."""
from __future__ import annotations

import pytest

from thrifty.config import ServerSettings
from thrifty.errors import InvalidRequestError
from thrifty.server import schemas as s
from thrifty.server.requests import Caller, chat_request, check_unicode, completion_request


def chat(**extra) -> s.ChatCompletionRequest:
    return s.ChatCompletionRequest(model="m", messages=[s.ChatMessage(role="user", content="hi")], **extra)


def test_a_chat_without_max_tokens_gets_the_configured_default():
    assert chat_request(chat(), ServerSettings(), Caller()).params.max_tokens == 512
    assert chat_request(chat(), ServerSettings(default_max_tokens=64), Caller()).params.max_tokens == 64
    # never above the largest a request may ask for
    assert chat_request(chat(), ServerSettings(max_output_tokens=100), Caller()).params.max_tokens == 100
    assert chat_request(chat(max_tokens=7), ServerSettings(), Caller()).params.max_tokens == 7
    # completions keep OpenAI's 16
    req = s.CompletionRequest(model="m", prompt="x")
    assert completion_request(req, ServerSettings(), Caller()).params.max_tokens == 16


def test_lone_surrogates_are_named_by_field():
    check_unicode({"messages": [{"content": "emoji \U0001F600 and \u00e9"}]})  # whole pairs are text
    with pytest.raises(InvalidRequestError) as e:
        check_unicode({"messages": [{"role": "user", "content": "cut \ud83d"}]})
    assert e.value.param == "messages.0.content" and "U+D83D" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        check_unicode({"stop": ["a", "\udfff"]})
    assert e.value.param == "stop.1"
    with pytest.raises(InvalidRequestError) as e:
        chat_request(chat(user="\ud800"), ServerSettings(), Caller())
    assert e.value.param == "user"
