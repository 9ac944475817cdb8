//! Tool calling in one format every model can be held to: llama.cpp's generic one.
//!
//! - **Telling the model.** The request's tools travel as OpenAI's JSON array
//!   ([`tools_json`], bound in the request hash). The provider renders its model's own chat
//!   template with them; a template that does not show them gets them in its system message
//!   instead ([`system_note`]), as llama.cpp's server does for templates without tool support.
//!   The gateway adds the line saying how to answer ([`instruction`]).
//! - **The answer** is JSON: `{"tool_call": {"name", "arguments"}}`, `{"tool_calls": [...]}`
//!   when calls may go in parallel, or `{"response": ...}` when the model may answer instead
//!   (`tool_choice: auto`). Decoding is constrained to exactly these shapes ([`schema`]): a
//!   constraint like any other, in the request hash, walked by the gateway token by token and
//!   applied by the referee, so even a small model's call is well-formed and a provider cannot
//!   answer outside it.
//! - **The history.** An assistant's earlier calls and the tools' results are written as text
//!   in the same format ([`calls_text`], [`result_text`]), so any template can show them.
//! - **Back to the client.** [`Reply::parse`] turns the answer into calls or text.

use serde_json::{Value, json};

/// Most tools one request may declare.
pub const MAX_TOOLS: usize = 64;
/// Longest tool list accepted, in bytes of its compact JSON.
pub const MAX_TOOLS_BYTES: usize = 64 * 1024;
/// Most calls in one answer when calls may go in parallel: a small model left unbounded
/// repeats its list until `max_tokens`.
pub const MAX_PARALLEL_CALLS: usize = 8;

/// Which answers the model may give (`tool_choice`; `none` leaves the tools out altogether).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// A call, or a reply in text.
    Auto,
    /// A call to any of the tools.
    Required,
    /// A call to this tool.
    Function(String),
}

/// One function the model may call, as the client declared it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Its name (letters, digits, `_` and `-`).
    pub name: String,
    /// What it does.
    pub description: Option<String>,
    /// A JSON schema of its arguments object.
    pub parameters: Value,
}

impl Tool {
    /// In OpenAI's shape: `{"type": "function", "function": {...}}`.
    fn openai(&self) -> Value {
        let mut function = json!({"name": self.name});
        if let Some(description) = &self.description {
            function["description"] = json!(description);
        }
        function["parameters"] = self.parameters.clone();
        json!({"type": "function", "function": function})
    }

    /// The schema of one call to it.
    fn call_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": self.name},
                "arguments": self.parameters,
            },
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    }
}

/// The tools as the provider receives them: OpenAI's array, compact JSON.
pub fn tools_json(tools: &[Tool]) -> String {
    Value::Array(tools.iter().map(Tool::openai).collect()).to_string()
}

/// The JSON schema the answer is constrained to. `response` is the schema of a reply in text
/// (`{"type": "string"}` unless `response_format` gave one); it applies only to `Auto`.
pub fn schema(
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
    response: Option<Value>,
) -> Value {
    let callable: Vec<&Tool> = match choice {
        ToolChoice::Function(name) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    };
    let mut calls: Vec<Value> = callable.iter().map(|t| t.call_schema()).collect();
    let call = match calls.len() {
        1 => calls.remove(0),
        _ => json!({"anyOf": calls}),
    };
    let (key, value) = if parallel {
        let list =
            json!({"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS});
        ("tool_calls", list)
    } else {
        ("tool_call", call)
    };
    let calling = object_of(key, value);
    match choice {
        ToolChoice::Auto => {
            let text = response.unwrap_or_else(|| json!({"type": "string"}));
            json!({"anyOf": [calling, object_of("response", text)]})
        }
        _ => calling,
    }
}

/// `{"type": "object"}` with one required property.
fn object_of(key: &str, schema: Value) -> Value {
    json!({
        "type": "object",
        "properties": {key: schema},
        "required": [key],
        "additionalProperties": false,
    })
}

/// The line the gateway adds to the system message: how to answer.
pub fn instruction(choice: &ToolChoice, parallel: bool) -> String {
    let key = if parallel { "tool_calls" } else { "tool_call" };
    match choice {
        ToolChoice::Auto => format!(
            "Respond in JSON format, either with `{key}` (a request to call tools) or with \
             `response` reply to the user's request"
        ),
        _ => format!("Respond in JSON format with `{key}` (a request to call tools)"),
    }
}

/// The system text listing the tools, for a template that does not show them itself.
pub fn system_note(tools_json: &str) -> Result<String, serde_json::Error> {
    let tools: Value = serde_json::from_str(tools_json)?;
    let listed = serde_json::to_string_pretty(&tools)?;
    Ok(format!(
        "You can call any of the following tools to satisfy the user's requests: {listed}"
    ))
}

/// One call, as the model wrote it and the client receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments, compact JSON.
    pub arguments: String,
}

/// An assistant's earlier calls as the text the model would have written for them.
pub fn calls_text(calls: &[ToolCall]) -> String {
    let call = |c: &ToolCall| {
        let arguments = serde_json::from_str::<Value>(&c.arguments)
            .unwrap_or_else(|_| Value::String(c.arguments.clone()));
        json!({"name": c.name, "arguments": arguments})
    };
    match calls {
        [one] => json!({"tool_call": call(one)}),
        many => json!({"tool_calls": many.iter().map(call).collect::<Vec<_>>()}),
    }
    .to_string()
}

/// A tool's result as the text of a user message (every template takes that role).
pub fn result_text(tool: &str, content: &str) -> String {
    json!({"tool_response": {"tool": tool, "content": content}}).to_string()
}

/// What a constrained answer said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Calls to make.
    Calls(Vec<ToolCall>),
    /// A reply in text (a string response as it is, any other as compact JSON).
    Text(String),
}

impl Reply {
    /// Reads an answer in the format; `None` when it is not (cut short by `max_tokens`).
    pub fn parse(answer: &str) -> Option<Self> {
        let value: Value = serde_json::from_str(answer).ok()?;
        let object = value.as_object()?;
        let call = |v: &Value| {
            Some(ToolCall {
                name: v.get("name")?.as_str()?.to_owned(),
                arguments: v.get("arguments")?.to_string(),
            })
        };
        if let Some(one) = object.get("tool_call") {
            return Some(Self::Calls(vec![call(one)?]));
        }
        if let Some(many) = object.get("tool_calls") {
            let calls = many.as_array()?.iter().map(call).collect::<Option<_>>()?;
            return Some(Self::Calls(calls));
        }
        match object.get("response")? {
            Value::String(text) => Some(Self::Text(text.clone())),
            other => Some(Self::Text(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::constraint::{Constraint, TokenSpace};

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("The weather in a city".into()),
            parameters: json!({
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": false,
            }),
        }
    }

    fn time() -> Tool {
        Tool {
            name: "get_time".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {}}),
        }
    }

    /// Bytes as tokens 0..=255, and an end token: enough to walk any text.
    fn accepts(schema: &Value, text: &str) -> bool {
        let mut pieces: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        pieces.push(Vec::new());
        let space = TokenSpace::new(pieces, &[256]).unwrap();
        let mut guide = space
            .guide(&Constraint::JsonSchema(schema.to_string()))
            .unwrap();
        text.bytes().all(|b| guide.advance(u32::from(b))) && guide.advance(256)
    }

    #[test]
    fn the_schema_admits_exactly_the_calls_the_choice_allows() {
        let tools = [weather(), time()];
        let call = r#"{"tool_call":{"name":"get_weather","arguments":{"city":"Paris"}}}"#;
        let other = r#"{"tool_call":{"name":"get_time","arguments":{}}}"#;
        let reply = r#"{"response":"Hello"}"#;
        let auto = schema(&tools, &ToolChoice::Auto, false, None);
        assert!(accepts(&auto, call) && accepts(&auto, other) && accepts(&auto, reply));
        let required = schema(&tools, &ToolChoice::Required, false, None);
        assert!(accepts(&required, call) && !accepts(&required, reply));
        let named = schema(
            &tools,
            &ToolChoice::Function("get_time".into()),
            false,
            None,
        );
        assert!(accepts(&named, other) && !accepts(&named, call));
        let unknown = r#"{"tool_call":{"name":"rm_rf","arguments":{}}}"#;
        assert!(!accepts(&required, unknown));
        let bad_arguments = r#"{"tool_call":{"name":"get_weather","arguments":{"town":1}}}"#;
        assert!(!accepts(&required, bad_arguments));
        let parallel = schema(&tools, &ToolChoice::Required, true, None);
        let two = format!(
            r#"{{"tool_calls":[{},{}]}}"#,
            &call[13..call.len() - 1],
            &other[13..other.len() - 1]
        );
        assert!(accepts(&parallel, &two), "{two}");
        assert!(!accepts(&parallel, call));
    }

    #[test]
    fn answers_read_back_as_calls_or_text() {
        let calls =
            Reply::parse(r#"{"tool_call":{"name":"get_weather","arguments":{"city":"Paris"}}}"#);
        assert_eq!(
            calls,
            Some(Reply::Calls(vec![ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            }]))
        );
        assert_eq!(
            Reply::parse(r#"{"response":"Hi"}"#),
            Some(Reply::Text("Hi".into()))
        );
        assert_eq!(
            Reply::parse(r#"{"response":{"a":1}}"#),
            Some(Reply::Text(r#"{"a":1}"#.into()))
        );
        assert_eq!(Reply::parse(r#"{"tool_call":{"name":"#), None);
        // The history writes calls as the model would: they read back the same.
        let written = vec![
            ToolCall {
                name: "a".into(),
                arguments: "{}".into(),
            },
            ToolCall {
                name: "b".into(),
                arguments: r#"{"x":[1,2]}"#.into(),
            },
        ];
        assert_eq!(
            Reply::parse(&calls_text(&written)),
            Some(Reply::Calls(written.clone()))
        );
        assert_eq!(
            Reply::parse(&calls_text(&written[..1])),
            Some(Reply::Calls(written[..1].to_vec()))
        );
    }

    #[test]
    fn the_note_lists_every_tool() {
        let note = system_note(&tools_json(&[weather(), time()])).unwrap();
        assert!(note.contains("\"get_weather\"") && note.contains("\"get_time\""));
        assert!(note.contains("The weather in a city"));
    }
}
