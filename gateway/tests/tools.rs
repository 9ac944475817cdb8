//! Tool calling through the real path: a real gateway and providers on loopback, the real
//! engine and default model (SmolLM2, whose template does not show tools: they go in a system
//! note, as llama.cpp's server does).
//!
//! Decoding is constrained to calls of the declared tools (or a reply, under `auto`), the
//! referee scores under the same constraint, and the gateway walks every token through it
//! itself: a call is always well-formed, names a declared tool and has valid arguments, and a
//! provider that answers outside the constraint fails every request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use proofmesh_provider::Tamper;
use serde_json::{Value, json};
use support::{HONEST, Mesh, ProviderSpec, chat_body, fails_both_ways, header};

fn weather() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 24}},
          "required": ["city"], "additionalProperties": false}}})
}

fn time() -> Value {
    json!({"type": "function", "function": {
        "name": "get_time",
        "description": "The current time in a timezone",
        "parameters": {"type": "object", "properties": {
            "timezone": {"type": "string", "maxLength": 24}},
          "required": ["timezone"], "additionalProperties": false}}})
}

/// The calls of a non-streamed answer, each checked: an id, a declared name, JSON arguments.
fn calls(answer: &Value, names: &[&str]) -> Vec<(String, Value)> {
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    assert!(choice["message"]["content"].is_null(), "{answer}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty(), "{answer}");
    calls
        .iter()
        .map(|call| {
            assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
            assert_eq!(call["type"], "function");
            let name = call["function"]["name"].as_str().unwrap().to_string();
            assert!(names.contains(&name.as_str()), "{call}");
            let arguments: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(arguments.is_object(), "{call}");
            (name, arguments)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_loop_calls_well_formed_and_passes_its_audits() {
    let mesh = Mesh::start(&[HONEST]).await;
    let ask = "What is the weather like in Paris?";

    // `required`: a call, whatever the model would rather say.
    let body = chat_body(
        ask,
        json!({"tools": [weather(), time()], "tool_choice": "required", "max_tokens": 64,
               "verification_mode": "merkle"}),
    );
    let (status, headers, answer) = mesh.chat(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        header(&headers, "x-proofmesh-verdict"),
        "passed",
        "{answer}"
    );
    let made = calls(&answer, &["get_weather", "get_time"]);
    assert_eq!(made.len(), 1, "one call unless parallel calls are allowed");
    let call = answer["choices"][0]["message"]["tool_calls"][0].clone();

    // The result goes back as a `tool` message; under `none` the model answers in text.
    let history = json!([
        {"role": "user", "content": ask},
        {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"},
    ]);
    for choice in ["none", "auto"] {
        let body = chat_body(
            "",
            json!({"messages": history, "tools": [weather(), time()], "tool_choice": choice,
                   "max_tokens": 64, "verification_mode": "merkle"}),
        );
        let (status, headers, answer) = mesh.chat(body).await;
        assert_eq!(status, 200, "{choice}: {answer}");
        assert_eq!(
            header(&headers, "x-proofmesh-verdict"),
            "passed",
            "{answer}"
        );
        let message = &answer["choices"][0]["message"];
        if choice == "none" {
            assert!(message["content"].is_string(), "{answer}");
            assert!(message.get("tool_calls").is_none(), "{answer}");
        } else if message["content"].is_null() {
            calls(&answer, &["get_weather", "get_time"]);
        } else {
            assert!(message["content"].is_string(), "{answer}");
            assert!(message.get("tool_calls").is_none(), "{answer}");
        }
    }

    // A named function is the one called, however the question leans.
    let body = chat_body(
        ask,
        json!({"tools": [weather(), time()], "max_tokens": 64,
               "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
    );
    let (status, _, answer) = mesh.chat(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(calls(&answer, &["get_time"]).len(), 1);

    // Parallel calls allowed: a list of them, at most MAX_PARALLEL_CALLS (this model would
    // repeat its list until `max_tokens` otherwise).
    let body = chat_body(
        "What are the weather and the time in Tokyo?",
        json!({"tools": [weather(), time()], "tool_choice": "required",
               "parallel_tool_calls": true, "max_tokens": 256}),
    );
    let (status, _, answer) = mesh.chat(body).await;
    assert_eq!(status, 200, "{answer}");
    let made = calls(&answer, &["get_weather", "get_time"]);
    assert!(
        made.len() <= proofmesh_shared::tools::MAX_PARALLEL_CALLS,
        "{answer}"
    );

    // Streamed: the call arrives whole in one `delta.tool_calls`, then `tool_calls` finishes.
    let body = chat_body(
        ask,
        json!({"tools": [weather()], "tool_choice": "required", "max_tokens": 64, "stream": true}),
    );
    let (status, _, data) = mesh.chat_stream(body).await;
    assert_eq!(status, 200);
    let mut streamed = Vec::new();
    let mut finish = None;
    for event in data.iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        let choice = &chunk["choices"][0];
        if let Some(calls) = choice["delta"]["tool_calls"].as_array() {
            streamed.extend(calls.iter().cloned());
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"), "{data:?}");
    assert_eq!(streamed.len(), 1, "{data:?}");
    assert_eq!(streamed[0]["index"], 0);
    assert_eq!(streamed[0]["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(streamed[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");

    // Bad input names its param.
    let bad = [
        (
            json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "rm"}}}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"},
                                {"role": "tool", "tool_call_id": "call_x", "content": "1"}]}),
            "messages[1].tool_call_id",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f",
                   "parameters": {"type": "object", "not": {"required": ["x"]}}}}]}),
            "tools",
        ),
    ];
    for (extra, param) in bad {
        let (status, _, error) = mesh.chat(chat_body("x", extra)).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], param, "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_that_answer_outside_the_tools_fail_every_request() {
    let mesh = Mesh::start(&[
        ProviderSpec::tampering("ignores", Tamper::IgnoresConstraint),
        ProviderSpec::tampering("other-schema", Tamper::OtherSchema),
    ])
    .await;
    let mut failed = 0;
    for cheat in ["ignores", "other-schema"] {
        for (i, mode) in ["merkle", "fraud", "none"].iter().enumerate() {
            let body = chat_body(
                "What is the weather like in Paris?",
                json!({"model": cheat, "tools": [weather(), time()], "tool_choice": "required",
                       "max_tokens": 64, "verification_mode": mode, "seed": i,
                       "temperature": 0.5}),
            );
            let what = format!("{cheat} {mode}");
            fails_both_ways(&mesh, body, "failed:constraint_violated", &what).await;
            failed += 2;
        }
    }
    eprintln!("{failed} of {failed} requests to providers answering outside the tools failed");
}
