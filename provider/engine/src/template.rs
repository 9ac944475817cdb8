//! The model's own Jinja chat template, rendered with tools (minijinja), as llama.cpp's server
//! renders it with `--jinja`.
//!
//! Only requests that carry tools take this path; the others keep llama.cpp's built-in
//! template handling, so their prompts stay what they were. Rendering is deterministic: no
//! clock (`strftime_now` is not offered), so a referee renders the prompt the provider did.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind, context};
use proofmesh_shared::protocol::ChatMessage;
use proofmesh_shared::tools::{Join, add_to_system};
use serde::Serialize;

/// The name the template is compiled under.
const NAME: &str = "chat";
/// A tool no template names by chance: a template that shows it renders tools itself.
const PROBE: &str = "proofmesh_probe_tool";
/// Most instructions one rendering may run (a chat template runs thousands): a template that
/// loops without end fails instead of holding the thread that renders it.
const FUEL: u64 = 10_000_000;

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// Whether the template shows the tools it is given (else they go in a system note).
    shows_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("shows_tools", &self.shows_tools)
            .finish_non_exhaustive()
    }
}

/// One message as templates read it.
#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// Compiles `source` the way Hugging Face's chat templates expect (blocks trimmed, Python
    /// string methods, `raise_exception`); `bos` and `eos` are the start and end tokens' text.
    pub(crate) fn new(source: &str, bos: String, eos: String) -> Result<Self, String> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        // As Hugging Face's `tojson` (Python's `json.dumps`, non-ASCII kept), not minijinja's,
        // which escapes `<`, `>`, `&` and `'` for HTML.
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        let mut template = Self {
            env,
            bos,
            eos,
            shows_tools: false,
        };
        let probe = serde_json::json!([{"type": "function", "function": {
            "name": PROBE, "parameters": {"type": "object", "properties": {}}}}]);
        let asked = [ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        template.shows_tools = template
            .render_raw(&asked, &probe)
            .is_ok_and(|prompt| prompt.contains(PROBE));
        Ok(template)
    }

    /// The start token's text, as templates write it.
    pub(crate) fn bos(&self) -> &str {
        &self.bos
    }

    /// The prompt for `messages` with `tools` (OpenAI's JSON array), ready for the assistant's
    /// turn. A template that does not show tools gets them listed at the start of the system
    /// message ([`proofmesh_shared::tools::system_note`]).
    pub(crate) fn render(&self, messages: &[ChatMessage], tools: &str) -> Result<String, String> {
        let parsed: serde_json::Value =
            serde_json::from_str(tools).map_err(|e| format!("the tools are not JSON: {e}"))?;
        if self.shows_tools {
            return self.render_raw(messages, &parsed);
        }
        let note = proofmesh_shared::tools::system_note(tools).map_err(|e| e.to_string())?;
        let mut noted = messages.to_vec();
        add_to_system(&mut noted, &note, Join::Before);
        self.render_raw(&noted, &parsed)
    }

    fn render_raw(
        &self,
        messages: &[ChatMessage],
        tools: &serde_json::Value,
    ) -> Result<String, String> {
        let messages: Vec<TemplateMessage<'_>> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: &m.role,
                content: &m.content,
            })
            .collect();
        let template = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => Serde(messages),
                tools => Serde(tools),
                add_generation_prompt => true,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|e| format!("the chat template failed: {e}"))
    }
}

/// `tojson` as Hugging Face's templates know it: `json.dumps(value, ensure_ascii=False,
/// indent=indent)`, so `", "` and `": "` between items, or `indent` spaces and `": "`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = vec![b' '; n.min(16)];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonSeparators,
        )),
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

/// Python's default JSON separators: `", "` and `": "`.
struct PythonSeparators;

/// `", "` before every item but the first.
fn between<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        between(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        between(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// SmolLM2's template, which knows nothing of tools.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A Hermes-style template that lists the tools itself.
    const HERMES: &str = "{%- if tools %}<|im_start|>system\n# Tools\n{%- for tool in tools %}\n{{ tool.function | tojson }}{%- endfor %}<|im_end|>\n{%- endif %}{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content.strip() }}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}";

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
        }]
    }

    const TOOLS: &str =
        r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]"#;

    #[test]
    fn a_template_without_tools_gets_them_in_a_system_note() {
        let template = ChatTemplate::new(CHATML, String::new(), "<|im_end|>".into()).unwrap();
        assert!(!template.shows_tools);
        let prompt = template.render(&user("Weather in Paris?"), TOOLS).unwrap();
        assert!(
            prompt.starts_with("<|im_start|>system\nYou can call any of the following tools"),
            "{prompt}"
        );
        assert!(prompt.contains("\"get_weather\""));
        assert!(
            prompt.ends_with(
                "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
            )
        );
        // A system message of the client's own keeps its text after the note.
        let mut messages = user("Hi");
        messages.insert(
            0,
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
        );
        let prompt = template.render(&messages, TOOLS).unwrap();
        assert_eq!(prompt.matches("<|im_start|>system").count(), 1);
        assert!(prompt.contains("]\n\nBe brief.<|im_end|>"), "{prompt}");
    }

    #[test]
    fn a_template_with_tools_renders_them_itself() {
        let template = ChatTemplate::new(HERMES, String::new(), String::new()).unwrap();
        assert!(template.shows_tools);
        let prompt = template.render(&user("  Weather?  "), TOOLS).unwrap();
        // As Python's `json.dumps` writes it, whitespace control applied.
        assert_eq!(
            prompt,
            "<|im_start|>system\n# Tools{\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\"}}<|im_end|><|im_start|>user\nWeather?<|im_end|><|im_start|>assistant"
        );
    }

    #[test]
    fn tojson_writes_as_python_does_and_endless_templates_run_out_of_fuel() {
        let template = ChatTemplate::new(
            "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let tools = r#"[{"a":"the user's <b>","b":[1,{}],"c":"é"}]"#;
        let prompt = template
            .render_raw(&user("x"), &serde_json::from_str(tools).unwrap())
            .unwrap();
        assert_eq!(
            prompt,
            "[{\"a\": \"the user's <b>\", \"b\": [1, {}], \"c\": \"é\"}]|{\n  \"a\": \"the user's <b>\",\n  \"b\": [\n    1,\n    {}\n  ],\n  \"c\": \"é\"\n}"
        );
        let endless = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let error = endless.render(&user("x"), TOOLS).unwrap_err();
        assert!(error.contains("fuel"), "{error}");
    }

    #[test]
    fn a_template_that_raises_is_an_error_not_a_panic() {
        let template = ChatTemplate::new(
            "{{ raise_exception('Conversation roles must alternate') }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let error = template.render(&user("x"), TOOLS).unwrap_err();
        assert!(
            error.contains("Conversation roles must alternate"),
            "{error}"
        );
        assert!(ChatTemplate::new("{% for %}", String::new(), String::new()).is_err());
    }
}
