"""A `max_tokens` the context cannot hold is a 400 naming it, decided in the worker, which
knows max_model_len (issue 15, item 10)."""

from __future__ import annotations

import pytest

from dormant.errors import InvalidRequest
from dormant.protocol import ChatCompletionRequest, CompletionRequest
from dormant.worker.serving import _sampling_params

DEFAULTS = {"temperature": 1.0, "top_p": 1.0}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _params(req, prompt_tokens: int = 10, max_model_len: int = 100):
    return _sampling_params(req, prompt_tokens, max_model_len, DEFAULTS)


@pytest.mark.parametrize("req,param", [
    (CompletionRequest(model="m", prompt="x", max_tokens=91), "max_tokens"),
    (ChatCompletionRequest(**CHAT, max_tokens=91), "max_tokens"),
    (ChatCompletionRequest(**CHAT, max_tokens=5, max_completion_tokens=91), "max_completion_tokens"),
])
def test_max_tokens_past_the_context_is_refused(req, param):
    with pytest.raises(InvalidRequest) as err:
        _params(req)
    assert err.value.param == param and err.value.status_code == 400
    assert "91 > 100 - 10" in err.value.message


def test_max_tokens_that_fits_or_is_left_out_is_taken():
    assert _params(CompletionRequest(model="m", prompt="x", max_tokens=90)).max_tokens == 90
    assert _params(ChatCompletionRequest(**CHAT)).max_tokens is None  # runs to the context
    # the spec's default of 16 is no client's choice: cut at the context, not refused
    assert _params(CompletionRequest(model="m", prompt="x"), prompt_tokens=95).max_tokens == 16


def test_a_prompt_past_the_context_names_the_prompt():
    with pytest.raises(InvalidRequest) as err:
        _params(CompletionRequest(model="m", prompt="x", max_tokens=1), prompt_tokens=100)
    assert err.value.param == "prompt" and err.value.code == "context_length_exceeded"
