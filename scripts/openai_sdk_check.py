#!/usr/bin/env python3
"""Drives a running gateway with the official `openai` Python package, as a user would.

Usage: openai_sdk_check.py BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8080/v1)
Exits non-zero with a message on the first thing that does not work.
"""
import sys

import openai


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

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e

    print(f"openai {openai.__version__}: models.list, plain, raw headers, stream and errors OK; answer: {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
