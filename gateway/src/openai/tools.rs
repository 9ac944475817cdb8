//! OpenAI's tool calling: `tools`, `tool_choice`, `parallel_tool_calls`, the history's
//! `tool_calls` and `role: "tool"` messages, and the calls handed back.
//!
//! The model is asked for calls in one JSON format ([`proofmesh_shared::tools`]) and decoding
//! is constrained to it: the constraint is the gateway's own, built here from the declared
//! tools, so every call is well-formed JSON naming a declared tool with arguments valid
//! against its schema, and the audit holds the provider to it like any other constraint.

use std::collections::HashMap;

use proofmesh_shared::constraint::Constraint;
use proofmesh_shared::tools::{self, MAX_TOOLS, MAX_TOOLS_BYTES, Tool, ToolCall, ToolChoice};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// One entry of `tools`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RequestTool {
    /// Always `function`.
    #[serde(rename = "type")]
    #[schema(pattern = "^function$", example = "function")]
    pub kind: String,
    /// The function.
    pub function: FunctionSpec,
}

/// A function the model may call.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionSpec {
    /// Its name: 1 to 64 letters, digits, `_` or `-`.
    pub name: String,
    /// What it does; the model reads this.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON schema of its arguments (an object); none means no arguments.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<serde_json::Value>,
    /// OpenAI's strict mode; the arguments are always held to the schema here.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tool_choice`: `none`, `auto`, `required`, or `{"type": "function", "function": {"name"}}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoiceParam {
    /// `none`, `auto` or `required`.
    Mode(String),
    /// One function by name.
    Named(NamedToolChoice),
}

/// `tool_choice` naming one function.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NamedToolChoice {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Which one.
    pub function: FunctionName,
}

/// A function's name.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionName {
    /// The name.
    pub name: String,
}

/// A call in an assistant message: in the history (request) or the answer (response).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MessageToolCall {
    /// The call's id (`call_…`); a `tool` message answers it by this id.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// What is called.
    pub function: CalledFunction,
}

fn function_kind() -> String {
    "function".into()
}

/// A called function.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CalledFunction {
    /// The tool's name.
    pub name: String,
    /// Its arguments as JSON text.
    pub arguments: String,
}

/// A streamed call: all of it in one delta (`index` orders the calls).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeltaToolCall {
    /// Its place among the answer's calls.
    pub index: u32,
    /// The call's id.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// What is called.
    pub function: CalledFunction,
}

/// The tools a request lets the model call, as it goes to the provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    /// OpenAI's tools array, compact JSON (bound in the request hash).
    pub json: String,
}

/// What `tools`, `tool_choice` and `parallel_tool_calls` make of a request: the tools to
/// render, the constraint the answer is held to, and the line telling the model how to answer.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    /// The tools, as they go to the provider.
    pub tools: ToolUse,
    /// The answer's constraint (in place of `response_format`'s, which shapes a text reply).
    pub constraint: Constraint,
    /// Added to the system message.
    pub instruction: String,
}

/// Checks the tool fields. `None` when the model is not to call tools (none declared, or
/// `tool_choice: none`). `response` is `response_format`'s constraint, which shapes a reply
/// in text under `tool_choice: auto`.
pub fn plan(
    declared: Option<Vec<RequestTool>>,
    choice: Option<ToolChoiceParam>,
    parallel: Option<bool>,
    response: Option<&Constraint>,
) -> Result<Option<ToolPlan>, ApiError> {
    let declared = declared.unwrap_or_default();
    if declared.is_empty() {
        return match choice {
            None => Ok(None),
            Some(ToolChoiceParam::Mode(mode)) if mode == "none" => Ok(None),
            Some(_) => Err(ApiError::invalid(
                "tool_choice",
                "'tool_choice' is only allowed when 'tools' are specified",
            )),
        };
    }
    let declared = checked_tools(declared)?;
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(ToolChoiceParam::Mode(mode)) => match mode.as_str() {
            "none" => return Ok(None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "Invalid 'tool_choice' '{other}'; expected none, auto, required or a function"
                    ),
                ));
            }
        },
        Some(ToolChoiceParam::Named(named)) => {
            let name = named.function.name;
            if named.kind != "function" || !declared.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("'tool_choice' names the function '{name}', which is not in 'tools'"),
                ));
            }
            ToolChoice::Function(name)
        }
    };
    // llama.cpp's default: one call per answer unless the client allows several.
    let parallel = parallel.unwrap_or(false);
    let response = response.map(|c| match c {
        Constraint::JsonObject => serde_json::json!({"type": "object"}),
        Constraint::JsonSchema(text) => {
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::json!({}))
        }
    });
    let schema = tools::schema(&declared, &choice, parallel, response);
    Ok(Some(ToolPlan {
        tools: ToolUse {
            json: tools::tools_json(&declared),
        },
        constraint: Constraint::JsonSchema(schema.to_string()),
        instruction: tools::instruction(&choice, parallel),
    }))
}

/// The declared tools, each checked: a function, a good and unique name, an object schema.
fn checked_tools(declared: Vec<RequestTool>) -> Result<Vec<Tool>, ApiError> {
    if declared.len() > MAX_TOOLS {
        return Err(ApiError::invalid(
            "tools",
            format!("'tools' may hold at most {MAX_TOOLS} functions"),
        ));
    }
    let mut checked: Vec<Tool> = Vec::with_capacity(declared.len());
    for (i, tool) in declared.into_iter().enumerate() {
        let param = |field: &str| format!("tools[{i}]{field}");
        if tool.kind != "function" {
            return Err(ApiError::invalid(
                param(".type"),
                "Only 'function' tools are supported",
            ));
        }
        let function = tool.function;
        if !good_name(&function.name) {
            return Err(ApiError::invalid(
                param(".function.name"),
                "A function's name must be 1 to 64 letters, digits, '_' or '-'",
            ));
        }
        if checked.iter().any(|t| t.name == function.name) {
            return Err(ApiError::invalid(
                param(".function.name"),
                format!("The function '{}' is declared twice", function.name),
            ));
        }
        let parameters = function
            .parameters
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
        if !parameters.is_object() {
            return Err(ApiError::invalid(
                param(".function.parameters"),
                "'parameters' must be a JSON Schema object",
            ));
        }
        checked.push(Tool {
            name: function.name,
            description: function.description,
            parameters,
        });
    }
    if tools::tools_json(&checked).len() > MAX_TOOLS_BYTES {
        return Err(ApiError::invalid(
            "tools",
            format!("'tools' may be at most {MAX_TOOLS_BYTES} bytes of JSON"),
        ));
    }
    Ok(checked)
}

/// Whether `name` is 1 to 64 letters, digits, `_` or `-`: OpenAI's rule for the names of
/// functions and of `json_schema` response formats.
pub(crate) fn good_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The history's calls by id, so a `tool` message can name the tool it answers.
#[derive(Debug, Default)]
pub struct CallBook {
    names: HashMap<String, String>,
}

impl CallBook {
    /// An assistant message's calls, written as the model would have written them; each is
    /// remembered by its id.
    pub fn calls(
        &mut self,
        index: usize,
        calls: &[MessageToolCall],
        content: &str,
    ) -> Result<String, ApiError> {
        let mut written = Vec::with_capacity(calls.len());
        for (j, call) in calls.iter().enumerate() {
            if call.kind != "function" || !good_name(&call.function.name) {
                return Err(ApiError::invalid(
                    format!("messages[{index}].tool_calls[{j}]"),
                    "A tool call must be a 'function' with a name of 1 to 64 letters, digits, '_' or '-'",
                ));
            }
            self.names
                .insert(call.id.clone(), call.function.name.clone());
            written.push(ToolCall {
                name: call.function.name.clone(),
                arguments: call.function.arguments.clone(),
            });
        }
        Ok(tools::calls_text(&written, content))
    }

    /// A `tool` message's content as the user message that reports the result.
    pub fn result(
        &self,
        index: usize,
        id: Option<&str>,
        content: &str,
    ) -> Result<String, ApiError> {
        let (id, name) = id
            .and_then(|id| self.names.get_key_value(id))
            .ok_or_else(|| {
            ApiError::invalid(
                format!("messages[{index}].tool_call_id"),
                "A message with role 'tool' must answer a preceding assistant message's tool call by its 'tool_call_id'",
            )
        })?;
        Ok(tools::result_text(name, id, content))
    }
}

/// An answer to a request with tools, as the client receives it.
#[derive(Debug, Clone)]
pub struct Answered {
    /// The reply in text, when the model gave one.
    pub content: Option<String>,
    /// The calls, when it made any.
    pub calls: Option<Vec<MessageToolCall>>,
    /// `tool_calls` when it made calls, else the signed finish reason.
    pub finish_reason: &'static str,
}

/// Reads a constrained answer back. One that is not in the format (cut short by
/// `max_tokens`) is handed back as the text it is.
pub fn read_answer(text: &str, finish_reason: &'static str) -> Answered {
    match tools::Reply::parse(text) {
        Some(tools::Reply::Calls(calls)) => Answered {
            content: None,
            calls: Some(
                calls
                    .into_iter()
                    .map(|call| MessageToolCall {
                        id: call_id(),
                        kind: function_kind(),
                        function: CalledFunction {
                            name: call.name,
                            arguments: call.arguments,
                        },
                    })
                    .collect(),
            ),
            finish_reason: "tool_calls",
        },
        Some(tools::Reply::Text(reply)) => Answered {
            content: Some(reply),
            calls: None,
            finish_reason,
        },
        None => Answered {
            content: Some(text.to_owned()),
            calls: None,
            finish_reason,
        },
    }
}

/// A new call id, `call_` and 24 hex digits.
pub fn call_id() -> String {
    format!("call_{}", hex::encode(rand::random::<[u8; 12]>()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn tools(json: serde_json::Value) -> Option<Vec<RequestTool>> {
        Some(serde_json::from_value(json).unwrap())
    }

    fn choice(json: serde_json::Value) -> Option<ToolChoiceParam> {
        Some(serde_json::from_value(json).unwrap())
    }

    fn weather() -> Option<Vec<RequestTool>> {
        tools(
            serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]),
        )
    }

    fn param(result: Result<Option<ToolPlan>, ApiError>) -> String {
        let body = serde_json::to_value(result.unwrap_err().body()).unwrap();
        body["error"]["param"].as_str().unwrap().to_owned()
    }

    #[test]
    fn bad_tool_fields_name_their_param() {
        let named =
            |n: &str| choice(serde_json::json!({"type": "function", "function": {"name": n}}));
        assert_eq!(
            param(plan(weather(), named("rm"), None, None)),
            "tool_choice"
        );
        assert_eq!(
            param(plan(None, choice(serde_json::json!("auto")), None, None)),
            "tool_choice"
        );
        assert_eq!(
            param(plan(
                weather(),
                choice(serde_json::json!("sometimes")),
                None,
                None
            )),
            "tool_choice"
        );
        let bad_name =
            tools(serde_json::json!([{"type": "function", "function": {"name": "a b"}}]));
        assert_eq!(
            param(plan(bad_name, None, None, None)),
            "tools[0].function.name"
        );
        let twice = tools(serde_json::json!([
            {"type": "function", "function": {"name": "a"}},
            {"type": "function", "function": {"name": "a"}}]));
        assert_eq!(
            param(plan(twice, None, None, None)),
            "tools[1].function.name"
        );
        let not_object = tools(
            serde_json::json!([{"type": "function", "function": {"name": "a", "parameters": []}}]),
        );
        assert_eq!(
            param(plan(not_object, None, None, None)),
            "tools[0].function.parameters"
        );
    }

    #[test]
    fn none_or_no_tools_plans_nothing_and_a_named_choice_narrows_the_schema() {
        assert!(plan(None, None, None, None).unwrap().is_none());
        assert!(
            plan(weather(), choice(serde_json::json!("none")), None, None)
                .unwrap()
                .is_none()
        );
        let named = plan(
            weather(),
            choice(serde_json::json!({"type": "function", "function": {"name": "get_weather"}})),
            None,
            None,
        )
        .unwrap()
        .unwrap();
        let Constraint::JsonSchema(schema) = named.constraint else {
            panic!("a schema")
        };
        assert!(!schema.contains("response"), "{schema}");
        assert!(named.instruction.contains("`tool_call`"));
    }

    #[test]
    fn a_tool_message_must_answer_a_call_in_the_history() {
        let mut book = CallBook::default();
        assert!(book.result(1, Some("call_1"), "18 C").is_err());
        let call: MessageToolCall = serde_json::from_value(serde_json::json!({"id": "call_1",
            "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}))
        .unwrap();
        let text = book.calls(0, &[call], "").unwrap();
        assert_eq!(
            text,
            r#"{"tool_call":{"name":"get_weather","arguments":{"city":"Paris"}}}"#
        );
        assert_eq!(
            book.result(1, Some("call_1"), "18 C").unwrap(),
            r#"{"tool_response":{"tool":"get_weather","tool_call_id":"call_1","content":"18 C"}}"#
        );
    }
}
