#!/usr/bin/env python3
"""Drives a running gateway with the official `openai` Python package, as a user would.

Usage: openai_sdk_check.py BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8080/v1)
Exits non-zero with a message on the first thing that does not work.
"""
import json
import math
import sys

import openai
import pydantic


class Person(pydantic.BaseModel):
    """What the structured-output check asks for: the SDK turns it into a strict json_schema."""

    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)


def main() -> int:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    models = [m.id for m in client.models.list()]
    assert model in models, f"{model} not in models.list(): {models}"

    plain = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
        extra_body={"verification_mode": "merkle"},
    )
    text = plain.choices[0].message.content
    assert text and plain.choices[0].finish_reason in ("stop", "length"), plain
    assert plain.usage.completion_tokens > 0, plain.usage
    assert plain.proofmesh["verdict"] == "passed", plain.proofmesh

    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        extra_body={"verification_mode": "merkle"},
    )
    assert raw.headers["x-proofmesh-verdict"] == "passed", dict(raw.headers)

    streamed, proofmesh, finish = "", None, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
        stream=True,
        extra_body={"verification_mode": "merkle"},
    )
    for chunk in stream:
        if chunk.choices:
            streamed += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        extra = getattr(chunk, "proofmesh", None)
        if extra:
            proofmesh = extra
    assert streamed == text, (streamed, text)
    assert finish in ("stop", "length"), finish
    assert proofmesh and proofmesh["verdict"] == "passed", proofmesh

    # Structured output: the SDK's parse() sends a strict json_schema made from the Pydantic
    # model and parses the answer back into it; the gateway constrained and checked every token.
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    parsed = parse(
        model=model,
        messages=[{"role": "user", "content": "Invent a person: give a name and an age."}],
        response_format=Person,
        max_tokens=64,
        temperature=0,
        extra_body={"verification_mode": "merkle"},
    )
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person), parsed
    assert parsed.proofmesh["verdict"] == "passed", parsed.proofmesh
    json_object = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
        response_format={"type": "json_object"},
        max_tokens=64,
        temperature=0,
    )
    if json_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(json_object.choices[0].message.content), dict), json_object

    # Log-probabilities, read off the committed leaves.
    with_logprobs = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    content = with_logprobs.choices[0].logprobs.content
    assert content, with_logprobs
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5, entry
        assert entry.top_logprobs[0].logprob == entry.logprob, entry  # greedy
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token, entry
    assert "".join(e.token for e in content) == with_logprobs.choices[0].message.content
    probability = math.exp(sum(e.logprob for e in content))

    # A tool loop: the model calls the function, its result goes back as a `tool` message, the
    # model answers. `tool_choice="required"` constrains decoding to a well-formed call.
    tools = [{"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                       "required": ["city"], "additionalProperties": False},
    }}]
    messages = [{"role": "user", "content": "What is the weather like in Paris?"}]
    calling = client.chat.completions.create(
        model=model, messages=messages, tools=tools, tool_choice="required", max_tokens=64,
        temperature=0, extra_body={"verification_mode": "merkle"},
    )
    choice = calling.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, calling
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_"), call
    city = json.loads(call.function.arguments)["city"]
    assert calling.proofmesh["verdict"] == "passed", calling.proofmesh
    # The loop an agent runs: answer each call and ask again under `auto`, at most three
    # rounds, then insist on a reply (`tool_choice="none"`): a 135M model tends to call again.
    rounds, reply = 0, None
    while reply is None:
        for call_made in choice.message.tool_calls:
            messages.append({"role": "assistant", "content": None,
                             "tool_calls": [call_made.model_dump(exclude_none=True)]})
            messages.append({"role": "tool", "tool_call_id": call_made.id, "content": "18 C and sunny"})
        rounds += 1
        turn = client.chat.completions.create(
            model=model, messages=messages, tools=tools, tool_choice="auto" if rounds < 3 else "none",
            max_tokens=64, temperature=0, extra_body={"verification_mode": "merkle"},
        )
        assert turn.proofmesh["verdict"] == "passed", turn.proofmesh
        choice = turn.choices[0]
        reply = choice.message.content
        assert reply is not None or choice.finish_reason == "tool_calls", turn
    # Streamed: the SDK's stream helper reassembles the call from its `delta.tool_calls`.
    with client.beta.chat.completions.stream(
        model=model, messages=messages[:1], tools=tools, tool_choice="required", max_tokens=64,
        temperature=0,
    ) as stream:
        for _ in stream:
            pass
        streamed_call = stream.get_final_completion().choices[0].message.tool_calls[0]
    assert streamed_call.function.name == "get_weather", streamed_call
    assert json.loads(streamed_call.function.arguments) == json.loads(call.function.arguments)

    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], tools=tools,
            tool_choice={"type": "function", "function": {"name": "rm_rf"}},
        )
        raise AssertionError("unknown tool in tool_choice accepted")
    except openai.BadRequestError as e:
        assert e.param == "tool_choice", e

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e

    # The legacy text completion API.
    legacy = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2
    )
    assert legacy.choices[0].text and legacy.proofmesh["verdict"] == "passed", legacy
    assert "".join(legacy.choices[0].logprobs.tokens) == legacy.choices[0].text, legacy

    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21
        )
        raise AssertionError("top_logprobs 21 accepted")
    except openai.BadRequestError as e:
        assert e.param == "top_logprobs", e

    print(
        f"openai {openai.__version__}: models.list, plain, raw headers, stream, parse() into "
        f"{person!r}, json_object, a tool loop (get_weather({city!r}), "
        f"{rounds} result(s) sent back, then {reply!r}), a "
        f"streamed tool call reassembled, logprobs (answer probability {probability:.3g}), "
        f"completions.create ({legacy.choices[0].text!r}) and errors OK; "
        f"answer: {text!r}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
