//! `response_format` through the real path: a real gateway and providers on loopback, the real
//! engine and default model.
//!
//! Decoding is constrained token by token (llguidance, over the model's vocabulary), the referee
//! scores the answer under the same constraint, and the gateway walks every token through it
//! itself: so an answer always parses and validates, and a provider that ignores the
//! constraint, or applies another schema, fails every request.
//!
//! `PROOFMESH_STRUCTURED_REQUESTS` sets how many requests each of the five schemas gets (4 by
//! default; the acceptance run used 20, 100 in all).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use proofmesh_provider::Tamper;
use serde_json::{Value, json};
use support::{HONEST, Mesh, ProviderSpec, chat_body, fails_both_ways, header};

/// Five schemas of the kinds agent code asks for, with a prompt each. Strings and numbers are
/// bounded, as OpenAI's strict schemas usually are, so a small model finishes its JSON.
fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Invent a person: give a name and an age.",
            json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "What is the weather like in Paris today?",
            json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 24},
                "celsius": {"type": "integer", "minimum": -50, "maximum": 60},
                "sunny": {"type": "boolean"}},
              "required": ["city", "celsius", "sunny"], "additionalProperties": false}),
        ),
        (
            "Which colour is the sky?",
            json!({"type": "object", "properties": {
                "colour": {"type": "string", "enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": false}),
        ),
        (
            "List some fruits.",
            json!({"type": "object", "properties": {
                "fruits": {"type": "array", "minItems": 1, "maxItems": 3,
                           "items": {"type": "string", "maxLength": 12}}},
              "required": ["fruits"], "additionalProperties": false}),
        ),
        (
            "Recommend a book and rate it.",
            json!({"type": "object", "properties": {
                "book": {"type": "object", "properties": {
                    "title": {"type": "string", "maxLength": 30},
                    "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
                  "required": ["title", "year"], "additionalProperties": false},
                "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["book", "rating"], "additionalProperties": false}),
        ),
    ]
}

/// Whether `value` satisfies `schema`, for the keywords the schemas above use.
fn valid(value: &Value, schema: &Value) -> bool {
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        return false;
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(fields) = value.as_object() else {
                return false;
            };
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let required = schema["required"].as_array().cloned().unwrap_or_default();
            required
                .iter()
                .all(|r| fields.contains_key(r.as_str().unwrap()))
                && fields.iter().all(|(k, v)| match properties.get(k) {
                    Some(s) => valid(v, s),
                    None => schema["additionalProperties"] != json!(false),
                })
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                return false;
            };
            let len = items.len() as u64;
            schema["minItems"].as_u64().is_none_or(|m| len >= m)
                && schema["maxItems"].as_u64().is_none_or(|m| len <= m)
                && items.iter().all(|i| valid(i, &schema["items"]))
        }
        Some("string") => value.as_str().is_some_and(|s| {
            schema["maxLength"]
                .as_u64()
                .is_none_or(|m| s.chars().count() as u64 <= m)
        }),
        // JSON has one number type: `-0` and `2.0` are integers too.
        Some("integer") => value
            .as_i64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|f| f.fract() == 0.0)
                    .map(|f| f as i64)
            })
            .is_some_and(|n| {
                schema["minimum"].as_i64().is_none_or(|m| n >= m)
                    && schema["maximum"].as_i64().is_none_or(|m| n <= m)
            }),
        Some("boolean") => value.is_boolean(),
        _ => true,
    }
}

fn json_schema(schema: &Value) -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": true}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_schema_answer_parses_validates_and_passes_its_audit() {
    let per_schema: u64 = std::env::var("PROOFMESH_STRUCTURED_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);
    let mesh = Mesh::start(&[HONEST]).await;
    let mut answered = 0;
    for (prompt, schema) in schemas() {
        for i in 0..per_schema {
            // Greedy first, then sampled with a different seed each time.
            let temperature = if i == 0 { 0.0 } else { 0.8 };
            let body = chat_body(
                prompt,
                json!({"response_format": json_schema(&schema), "max_tokens": 128,
                       "temperature": temperature, "seed": i, "verification_mode": "merkle"}),
            );
            let (status, headers, answer) = mesh.chat(body).await;
            assert_eq!(status, 200, "{prompt}: {answer}");
            assert_eq!(
                header(&headers, "x-proofmesh-verdict"),
                "passed",
                "{answer}"
            );
            let choice = &answer["choices"][0];
            assert_eq!(choice["finish_reason"], "stop", "{prompt}: {answer}");
            let text = choice["message"]["content"].as_str().unwrap();
            let value: Value = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("{prompt}: not JSON ({e}): {text}"));
            assert!(
                valid(&value, &schema),
                "{prompt}: {text} does not match {schema}"
            );
            answered += 1;
        }
    }
    eprintln!("{answered} json_schema answers, all parsed and valid");

    // Any JSON object, streamed.
    let body = chat_body(
        "Describe a cat as JSON.",
        json!({"response_format": {"type": "json_object"}, "max_tokens": 96, "stream": true}),
    );
    let (status, _, data) = mesh.chat_stream(body).await;
    assert_eq!(status, 200);
    let mut text = String::new();
    let mut finish = None;
    for event in data.iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    if finish.as_deref() == Some("stop") {
        let value: Value = serde_json::from_str(&text).expect("a JSON object");
        assert!(value.is_object(), "{text}");
    }

    // What cannot be constrained is a 400 that names it.
    let unsupported = json!({"type": "object", "not": {"required": ["x"]}});
    let (status, _, error) = mesh
        .chat(chat_body(
            "x",
            json!({"response_format": json_schema(&unsupported)}),
        ))
        .await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "response_format", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("not"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_that_ignore_the_constraint_or_apply_another_fail_every_request() {
    let mesh = Mesh::start(&[
        ProviderSpec::tampering("ignores", Tamper::IgnoresConstraint),
        ProviderSpec::tampering("other-schema", Tamper::OtherSchema),
    ])
    .await;
    let (prompt, schema) = schemas().remove(0);
    for cheat in ["ignores", "other-schema"] {
        for (i, mode) in ["merkle", "fraud", "none", "merkle", "none"]
            .iter()
            .enumerate()
        {
            let body = chat_body(
                prompt,
                json!({"model": cheat, "response_format": json_schema(&schema), "max_tokens": 64,
                       "verification_mode": mode, "seed": i, "temperature": 0.5}),
            );
            let what = format!("{cheat} {mode}");
            fails_both_ways(&mesh, body, "failed:constraint_violated", &what).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_stops_a_json_answer_halfway_fails_even_unaudited() {
    // It stops after four tokens and claims the model ended there: every token it sent was
    // allowed, but the JSON is not complete, and no stop sequence cut it: not even when the
    // request has stop sequences, which a provider could otherwise claim (the gateway's own
    // transcript shows none matched). The same for a tool call.
    let mesh = Mesh::start(&[ProviderSpec::tampering("truncate", Tamper::Truncate)]).await;
    let (prompt, schema) = schemas().remove(0);
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": schema}}]);
    let asks = [
        json!({"tools": tools, "tool_choice": "required", "stop": ["###"]}),
        json!({"response_format": json_schema(&schema), "stop": ["\n\n\n"]}),
        json!({"response_format": json_schema(&schema)}),
    ];
    for ask in asks {
        let mut body = chat_body(
            prompt,
            json!({"model": "truncate", "max_tokens": 64, "verification_mode": "none"}),
        );
        for (key, value) in ask.as_object().unwrap() {
            body[key] = value.clone();
        }
        fails_both_ways(&mesh, body, "failed:constraint_violated", &ask.to_string()).await;
    }
}
