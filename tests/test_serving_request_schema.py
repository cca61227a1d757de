"""The request bodies: OpenAI's fields read, unsupported ones refused by name, stops checked."""

import pytest
from pydantic import ValidationError

from experiments.serving.errors import RequestError
from experiments.serving.request_schema import ChatBody, CompletionBody

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def test_defaults_follow_openai():
    chat, completion = ChatBody.model_validate(CHAT), CompletionBody.model_validate({"model": "m", "prompt": "x"})
    assert (chat.temperature, chat.top_p, chat.n, chat.stream, chat.budget()) == (1.0, 1.0, 1, False, None)
    assert not chat.greedy and completion.budget() == 16
    assert ChatBody.model_validate({**CHAT, "max_tokens": 5, "max_completion_tokens": 7}).budget() == 7


@pytest.mark.parametrize("field, value", [("logprobs", True), ("presence_penalty", 0.5), ("logit_bias", {"1": 2}),
                                          ("tools", [{"type": "function"}]), ("response_format", {"type": "json_object"})])
def test_fields_that_would_change_the_output_are_refused_by_name(field, value):
    body = ChatBody.model_validate({**CHAT, field: value})
    with pytest.raises(RequestError) as refused:
        body.check_supported()
    assert refused.value.param == field and refused.value.status == 400


def test_neutral_values_and_unknown_fields_pass():
    ChatBody.model_validate({**CHAT, "logprobs": False, "presence_penalty": 0, "user": "me", "metadata": {}}).check_supported()


def test_stops_and_messages():
    assert ChatBody.model_validate({**CHAT, "stop": ["a", "b"]}).stops() == ("a", "b")
    with pytest.raises(RequestError, match="at most 4"):
        ChatBody.model_validate({**CHAT, "stop": list("abcde")}).stops()
    with pytest.raises(RequestError, match="empty"):
        ChatBody.model_validate({**CHAT, "stop": [""]}).stops()
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert ChatBody.model_validate(parts).user_messages() == [{"role": "user", "content": "ab"}]
    image = {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    with pytest.raises(RequestError) as refused:
        ChatBody.model_validate(image).user_messages()
    assert refused.value.param == "messages[0].content"


def test_out_of_range_values_fail_validation():
    for bad in ({"temperature": 3}, {"top_p": 0}, {"n": 0}, {"max_tokens": 0}, {"messages": []}):
        with pytest.raises(ValidationError):
            ChatBody.model_validate({**CHAT, **bad})


def test_completion_prompts():
    assert CompletionBody.model_validate({"model": "m", "prompt": [1, 2]}).prompt_list() == [[1, 2]]
    assert CompletionBody.model_validate({"model": "m", "prompt": ["a", "b"]}).prompt_list() == ["a", "b"]
    with pytest.raises(RequestError):
        CompletionBody.model_validate({"model": "m", "prompt": []}).prompt_list()
