"""OpenAI request-field conformance: the fields clients send by default are accepted, those that map to the model
work, and those that would change a reply's meaning are refused in OpenAI's error shape."""

from __future__ import annotations

import json
import math

import pytest

openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"
GEN = "/v1/images/generations"
MSGS = [{"role": "user", "content": "Which shape is red?"}]

# what a client that fills in every field with its default sends (LangChain-, LiteLLM- or UI-style payloads)
FULL_DEFAULT_CHAT = {
    "model": "tiny", "messages": MSGS, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
    "logprobs": False, "top_logprobs": None, "max_tokens": 4, "max_completion_tokens": None, "n": 1,
    "response_format": {"type": "text"}, "seed": None, "stop": None, "stream": False, "stream_options": None,
    "temperature": 1, "top_p": 1, "tools": None, "tool_choice": None, "parallel_tool_calls": None, "user": "",
    "store": False, "metadata": None, "service_tier": "auto", "modalities": ["text"], "audio": None,
    "prediction": None, "reasoning_effort": None, "web_search_options": None, "function_call": None,
    "functions": None, "safety_identifier": None, "prompt_cache_key": None, "verbosity": None,
}


@pytest.fixture(scope="module")
def oai(main_server):
    return openai.OpenAI(base_url=f"{main_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_full_default_payload_is_accepted(main_server):
    with main_server.client() as c:
        r = c.post(CHAT, json=FULL_DEFAULT_CHAT)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and len(body["choices"]) == 1
        assert body["choices"][0]["logprobs"] is None and 1 <= body["usage"]["completion_tokens"] <= 4
        streamed = c.post(CHAT, json={**FULL_DEFAULT_CHAT, "stream": True,
                                      "stream_options": {"include_usage": True, "include_obfuscation": False}})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        r = c.post(GEN, json={"model": "tiny", "prompt": "a red circle", "n": 1, "size": "64x64", "quality": "hd",
                              "style": "vivid", "response_format": "b64_json", "user": "", "background": "auto",
                              "moderation": "auto", "output_compression": 100, "output_format": "png",
                              "partial_images": 0, "stream": False, "steps": 1})
        assert r.status_code == 200, r.text


def test_openai_client_with_sampling_fields(oai):
    r = oai.chat.completions.create(model="tiny", messages=MSGS, n=3, user="someone", presence_penalty=0.5,
                                    frequency_penalty=0.5, logprobs=True, top_logprobs=2, seed=5, stop=["zzz"],
                                    temperature=0.8, max_completion_tokens=5, response_format={"type": "text"},
                                    store=False, metadata={"team": "a"}, service_tier="auto")
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        entries = c.logprobs.content
        assert len(entries) >= 1 and all(len(e.top_logprobs) == 2 for e in entries)
        assert all(e.logprob <= 0 and math.isfinite(e.logprob) for e in entries)
        assert "".join(e.token for e in entries) == c.message.content
        assert c.finish_reason == ("length" if len(entries) == 5 else "stop")
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    again = oai.chat.completions.create(model="tiny", messages=MSGS, n=3, seed=5, temperature=0.8,
                                        presence_penalty=0.5, frequency_penalty=0.5, max_completion_tokens=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded


def test_openai_client_stream_with_logprobs_and_usage(oai):
    chunks = list(oai.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, stream=True, logprobs=True,
                                              top_logprobs=1, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    tokens = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert "".join(e.token for e in tokens) == text and chunks[-1].usage.completion_tokens == len(tokens)


@pytest.mark.parametrize("extra,param,words", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", ["does not call"]),
    ({"tools": []}, "tools", ["not supported"]),
    ({"functions": [{"name": "f"}]}, "functions", ["not supported"]),
    ({"tool_choice": "required"}, "tool_choice", ["not supported"]),
    ({"function_call": {"name": "f"}}, "function_call", ["not supported"]),
    ({"response_format": {"type": "json_object"}}, "response_format", ["json_object", "not supported"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format",
     ["json_schema"]),
    ({"modalities": ["text", "audio"]}, "modalities", ["text"]),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", ["not supported"]),
    ({"web_search_options": {}}, "web_search_options", ["not supported"]),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls",
     ["no tools"]),
])
def test_meaning_changes_are_refused_in_openai_shape(oai, extra, param, words):
    kw = {"model": "tiny", "messages": MSGS, "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**kw)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and err["code"] == "unsupported_parameter", err
    assert err["type"] == "invalid_request_error" and all(w in err["message"] for w in words), err


@pytest.mark.parametrize("extra,param,words", [
    ({"logit_bias": {"abc": 5}}, "logit_bias", ["token ids"]),
    ({"logit_bias": {"999999": 5}}, "logit_bias", ["token ids below"]),
    ({"logit_bias": {"3": 500}}, "logit_bias.3", ["<= 100"]),
    ({"top_logprobs": 2}, "top_logprobs", ["needs 'logprobs'"]),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ["<= 20"]),
    ({"presence_penalty": 2.5}, "presence_penalty", ["<= 2"]),
    ({"frequency_penalty": "x"}, "frequency_penalty", ["number"]),
    ({"response_format": {"type": "yaml"}}, "response_format.type", ["one of"]),
    ({"metadata": [1]}, "metadata", ["JSON object"]),
    ({"store": "yes"}, "store", ["true or false"]),
])
def test_bad_values_of_standard_fields(main_server, extra, param, words):
    with main_server.client() as c:
        r = c.post(CHAT, json={"messages": MSGS, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and all(w in err["message"] for w in words), err


def test_image_fields_that_change_the_result_are_refused(main_server):
    with main_server.client() as c:
        for extra, param in (({"background": "transparent"}, "background"), ({"stream": True}, "stream"),
                             ({"partial_images": 2}, "partial_images"), ({"quality": "ultra"}, "quality")):
            r = c.post(GEN, json={"prompt": "x", **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_logit_bias_steers_the_reply(main_server, tiny_model_dir):
    from cheers.tokenizer import CheersTokenizer

    tok = CheersTokenizer.from_dir(tiny_model_dir)
    with main_server.client() as c:
        plain = c.post(CHAT, json={"messages": MSGS, "max_tokens": 1, "logprobs": True, "top_logprobs": 2}).json()
        top = plain["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        first, runner_up = top[0]["token"], top[1]["token"]
        assert first != runner_up

        def ids(text):  # the token ids that read as `text` (logprobs report tokens as text, as OpenAI does)
            return [i for i in range(tok.vocab_size) if tok.decode([i]) == text]

        ban = {str(i): -100 for i in ids(first)}
        banned = c.post(CHAT, json={"messages": MSGS, "max_tokens": 1, "logit_bias": ban}).json()
        assert ban and banned["choices"][0]["message"]["content"] == runner_up
        boost = {str(i): 100 for i in ids(top[1]["token"])}
        forced = c.post(CHAT, json={"messages": MSGS, "max_tokens": 1, "logit_bias": boost}).json()
        assert forced["choices"][0]["message"]["content"] == runner_up
    assert json.dumps(plain)
