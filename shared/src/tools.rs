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

    /// The schema of one call to it, its arguments' schema placed by `place`.
    fn call_schema(&self, arguments: Value) -> Value {
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": self.name},
                "arguments": arguments,
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
    let mut defs = serde_json::Map::new();
    let mut calls: Vec<Value> = callable
        .iter()
        .enumerate()
        .map(|(i, t)| t.call_schema(placed(t.parameters.clone(), &format!("t{i}"), &mut defs)))
        .collect();
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
    let mut schema = match choice {
        ToolChoice::Auto => {
            let text = response.unwrap_or_else(|| json!({"type": "string"}));
            let text = placed(text, "response", &mut defs);
            json!({"anyOf": [calling, object_of("response", text)]})
        }
        _ => calling,
    };
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    schema
}

/// Where a schema goes inside the combined one: as it is, unless it refers to anything; then
/// it moves into the combined `$defs` as `name`, with its own definitions as `name.<def>`
/// and every reference rewritten to match (nested, its `#` and `#/$defs/X` would point at
/// the combined schema's root instead).
fn placed(mut schema: Value, name: &str, defs: &mut serde_json::Map<String, Value>) -> Value {
    if !refers(&schema) {
        return schema;
    }
    if let Value::Object(fields) = &mut schema {
        for key in ["$defs", "definitions"] {
            if let Some(Value::Object(own)) = fields.remove(key) {
                for (def, mut body) in own {
                    rewrite_refs(&mut body, name);
                    defs.insert(format!("{name}.{def}"), body);
                }
            }
        }
    }
    rewrite_refs(&mut schema, name);
    defs.insert(name.to_owned(), schema);
    json!({"$ref": format!("#/$defs/{name}")})
}

/// Keywords whose values are data, not schemas: a `$ref` in them is not a reference.
const DATA: [&str; 4] = ["const", "enum", "default", "examples"];

/// Whether a schema holds a `$ref` anywhere.
fn refers(schema: &Value) -> bool {
    match schema {
        Value::Object(fields) => fields
            .iter()
            .any(|(k, v)| k == "$ref" || (!DATA.contains(&k.as_str()) && refers(v))),
        Value::Array(items) => items.iter().any(refers),
        _ => false,
    }
}

/// Points a moved schema's local references at its new place.
fn rewrite_refs(schema: &mut Value, name: &str) {
    match schema {
        Value::Object(fields) => {
            for (key, value) in fields.iter_mut() {
                match (key.as_str(), value) {
                    ("$ref", Value::String(target)) => {
                        if let Some(moved) = moved_ref(target, name) {
                            *target = moved;
                        }
                    }
                    (key, _) if DATA.contains(&key) => {}
                    (_, value) => rewrite_refs(value, name),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_refs(v, name)),
        _ => {}
    }
}

/// Where a local reference of the schema moved to `$defs/name` points now: `#` to it, its
/// own definitions to `name.<def>`, any other path below it. Remote references stay.
fn moved_ref(target: &str, name: &str) -> Option<String> {
    let rest = target.strip_prefix('#')?;
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Some(format!("#/$defs/{name}"));
    }
    for root in ["$defs/", "definitions/"] {
        if let Some(def) = rest.strip_prefix(root) {
            return Some(format!("#/$defs/{name}.{def}"));
        }
    }
    Some(format!("#/$defs/{name}/{rest}"))
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

/// Where text joins the system message's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// Before it (the provider's list of tools).
    Before,
    /// After it (the gateway's [`instruction`]).
    After,
}

/// Adds `text` to the conversation's system message, before or after its own text and a
/// blank line; a conversation without one gets a system message of `text` first.
pub fn add_to_system(messages: &mut Vec<crate::protocol::ChatMessage>, text: &str, join: Join) {
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = match join {
                Join::Before => format!("{text}\n\n{}", first.content),
                Join::After => format!("{}\n\n{text}", first.content),
            };
        }
        _ => messages.insert(
            0,
            crate::protocol::ChatMessage {
                role: "system".into(),
                content: text.to_owned(),
            },
        ),
    }
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

/// An assistant's earlier calls as the text the model would have written for them, with the
/// text it wrote beside them, if any (as llama.cpp keeps it).
pub fn calls_text(calls: &[ToolCall], content: &str) -> String {
    let call = |c: &ToolCall| {
        let arguments = serde_json::from_str::<Value>(&c.arguments)
            .unwrap_or_else(|_| Value::String(c.arguments.clone()));
        json!({"name": c.name, "arguments": arguments})
    };
    let mut written = match calls {
        [one] => json!({"tool_call": call(one)}),
        many => json!({"tool_calls": many.iter().map(call).collect::<Vec<_>>()}),
    };
    if !content.is_empty() {
        written["content"] = json!(content);
    }
    written.to_string()
}

/// A tool's result, answering the call `id`, as the text of a user message (every template
/// takes that role).
pub fn result_text(tool: &str, id: &str, content: &str) -> String {
    json!({"tool_response": {"tool": tool, "tool_call_id": id, "content": content}}).to_string()
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
    /// Reads an answer in the format; `None` when it is not (cut short by `max_tokens`), or
    /// when a call's arguments name a key twice in one object (`"city"` and `"ci\u0074y"`:
    /// the grammar compares keys as written, a JSON reader as meant, so the second would
    /// silently replace a value the grammar checked). A call's arguments are the exact text
    /// that was checked.
    pub fn parse(answer: &str) -> Option<Self> {
        let reply: Written<'_> = serde_json::from_str(answer).ok()?;
        let call = |c: WrittenCall<'_>| {
            let arguments = c.arguments.get();
            unique_keys(arguments).then(|| ToolCall {
                name: c.name,
                arguments: arguments.to_owned(),
            })
        };
        if let Some(one) = reply.tool_call {
            return Some(Self::Calls(vec![call(one)?]));
        }
        if let Some(many) = reply.tool_calls {
            return Some(Self::Calls(
                many.into_iter().map(call).collect::<Option<_>>()?,
            ));
        }
        let text = reply.response?;
        Some(Self::Text(
            serde_json::from_str::<String>(text.get()).unwrap_or_else(|_| text.get().to_owned()),
        ))
    }
}

/// An answer as written: one of its keys.
#[derive(serde::Deserialize)]
struct Written<'a> {
    #[serde(borrow, default)]
    tool_call: Option<WrittenCall<'a>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<WrittenCall<'a>>>,
    /// Present even when it is `null` (a schema may allow that reply).
    #[serde(default, deserialize_with = "present")]
    response: Option<Box<serde_json::value::RawValue>>,
}

/// A field that is there, whatever its value (`Option` alone reads `null` as absent).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Box<serde_json::value::RawValue>>, D::Error> {
    serde::Deserialize::deserialize(deserializer).map(Some)
}

/// One call as written.
#[derive(serde::Deserialize)]
struct WrittenCall<'a> {
    name: String,
    #[serde(borrow)]
    arguments: &'a serde_json::value::RawValue,
}

/// Whether no object in this JSON names a key twice (keys compared unescaped). Scalars are
/// not read, so a number no float can hold is no failure.
fn unique_keys(json: &str) -> bool {
    serde_json::from_str::<Unique>(json).is_ok()
}

/// A JSON value that passed [`unique_keys`].
struct Unique;

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

/// Checks a nested object or array; a scalar needs nothing.
fn nested<E: serde::de::Error>(value: &serde_json::value::RawValue) -> Result<(), E> {
    let text = value.get();
    if text.starts_with(['{', '[']) && !unique_keys(text) {
        return Err(E::custom("a key named twice"));
    }
    Ok(())
}

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Unique;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON without duplicate keys")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key) {
                return Err(serde::de::Error::custom("a key named twice"));
            }
            nested(map.next_value::<&serde_json::value::RawValue>()?)?;
        }
        Ok(Unique)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        while let Some(item) = seq.next_element::<&serde_json::value::RawValue>()? {
            nested(item)?;
        }
        Ok(Unique)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
            Reply::parse(&calls_text(&written, "")),
            Some(Reply::Calls(written.clone()))
        );
        assert_eq!(
            Reply::parse(&calls_text(&written[..1], "Let me look.")),
            Some(Reply::Calls(written[..1].to_vec()))
        );
    }

    #[test]
    fn a_key_named_twice_is_no_call_and_arguments_are_the_text_checked() {
        // The grammar compares keys as written: `ci\u0074y` is another key to it, the same one
        // to a JSON reader, which would keep the second value.
        let twice =
            r#"{"tool_call":{"name":"f","arguments":{"city":"Paris","ci\u0074y":{"x":1}}}}"#;
        assert_eq!(Reply::parse(twice), None);
        let nested = r#"{"tool_call":{"name":"f","arguments":{"a":[{"b":1,"b":2}]}}}"#;
        assert_eq!(Reply::parse(nested), None);
        // Numbers are handed back as written, not as a float reading of them.
        let big = r#"{"tool_call":{"name":"f","arguments":{"n":123456789012345678901234567890}}}"#;
        let Some(Reply::Calls(calls)) = Reply::parse(big) else {
            panic!("a call")
        };
        assert_eq!(
            calls[0].arguments,
            r#"{"n":123456789012345678901234567890}"#
        );
        // Even one no float can hold, which the grammar allows.
        let huge = r#"{"tool_call":{"name":"f","arguments":{"n":[1e400]}}}"#;
        assert!(matches!(Reply::parse(huge), Some(Reply::Calls(_))));
        // A reply is text whatever its keys, and `null` is a reply too.
        assert_eq!(
            Reply::parse(r#"{"response":{"a":1,"a":2}}"#),
            Some(Reply::Text(r#"{"a":1,"a":2}"#.into()))
        );
        assert_eq!(
            Reply::parse(r#"{"response":null}"#),
            Some(Reply::Text("null".into()))
        );
    }

    #[test]
    fn schemas_that_refer_to_their_definitions_keep_working_when_combined() {
        // As Pydantic writes a model with a nested one.
        let tool = Tool {
            name: "book".into(),
            description: None,
            parameters: json!({
                "$defs": {"Author": {"type": "object", "properties": {"name": {"type": "string"}},
                                     "required": ["name"], "additionalProperties": false}},
                "type": "object",
                "properties": {"author": {"$ref": "#/$defs/Author"}},
                "required": ["author"], "additionalProperties": false,
            }),
        };
        let response = json!({"definitions": {"N": {"type": "integer"}}, "type": "object",
            "properties": {"n": {"$ref": "#/definitions/N"}}, "required": ["n"],
            "additionalProperties": false});
        let combined = schema(&[tool], &ToolChoice::Auto, false, Some(response.clone()));
        assert!(accepts(
            &combined,
            r#"{"tool_call":{"name":"book","arguments":{"author":{"name":"Ann"}}}}"#
        ));
        assert!(!accepts(
            &combined,
            r#"{"tool_call":{"name":"book","arguments":{"author":{"x":1}}}}"#
        ));
        assert!(accepts(&combined, r#"{"response":{"n":3}}"#));
        assert!(!accepts(&combined, r#"{"response":{"n":"3"}}"#));
        // Other local paths, and a recursive schema's `#`, follow it; data is left alone.
        let tree = Tool {
            name: "tree".into(),
            description: None,
            parameters: json!({
                "type": "object",
                "properties": {
                    "label": {"type": "string", "const": "x", "default": {"$ref": "#"}},
                    "same": {"$ref": "#/properties/label"},
                    "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#"}},
                },
                "required": ["label", "same"], "additionalProperties": false,
            }),
        };
        let combined = schema(&[tree], &ToolChoice::Required, false, None);
        let text = combined.to_string();
        assert!(text.contains(r##""default":{"$ref":"#"}"##), "{text}");
        assert!(
            text.contains(r##""$ref":"#/$defs/t0/properties/label""##),
            "{text}"
        );
        assert!(accepts(
            &combined,
            r#"{"tool_call":{"name":"tree","arguments":{"label":"x","same":"x","children":[{"label":"x","same":"x"}]}}}"#
        ));
        assert!(!accepts(
            &combined,
            r#"{"tool_call":{"name":"tree","arguments":{"label":"x","same":"y"}}}"#
        ));
    }

    #[test]
    fn the_note_lists_every_tool() {
        let note = system_note(&tools_json(&[weather(), time()])).unwrap();
        assert!(note.contains("\"get_weather\"") && note.contains("\"get_time\""));
        assert!(note.contains("The weather in a city"));
    }
}
