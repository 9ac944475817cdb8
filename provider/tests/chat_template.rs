//! Requests with tools render the model's own Jinja chat template with minijinja, the others
//! go through llama.cpp's built-in template handling. On the real default model the two must
//! agree token for token on the same conversation (the tools listed in a system note, since
//! SmolLM2's template does not show tools): otherwise minijinja would be rendering the template
//! differently from llama.cpp, and prompts with tools would not be the model's own format.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use proofmesh_provider::engine::Engine;
use proofmesh_shared::protocol::{ChatMessage, Prompt};
use proofmesh_shared::tools::{Join, add_to_system};

const TOOLS: &str = r#"[{"type":"function","function":{"name":"get_weather","description":"The weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]"#;

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minijinja_renders_the_models_template_as_llama_cpp_does() {
    // Only the template and the tokenizer run: the small engine's context is room enough.
    let config = support::small_engine().await;
    let engine = tokio::task::spawn_blocking(move || Engine::start(&config))
        .await
        .unwrap()
        .expect("engine");
    let note = proofmesh_shared::tools::system_note(TOOLS).unwrap();
    let conversations = [
        vec![message("user", "What is the weather in Paris?")],
        vec![
            message("system", "Be brief."),
            message("user", "Weather in Oslo?"),
            message(
                "assistant",
                r#"{"tool_call":{"name":"get_weather","arguments":{"city":"Oslo"}}}"#,
            ),
            message(
                "user",
                r#"{"tool_response":{"tool":"get_weather","content":"-3 C"}}"#,
            ),
        ],
    ];
    for messages in conversations {
        let with_tools = engine
            .tokenize(Prompt::Chat(&messages, Some(TOOLS)))
            .unwrap();
        // The same conversation with the note added as the provider adds it, through llama.cpp.
        let mut noted = messages.clone();
        add_to_system(&mut noted, &note, Join::Before);
        let by_llama = engine.tokenize(Prompt::Chat(&noted, None)).unwrap();
        assert_eq!(with_tools, by_llama, "{messages:?}");
        // And the tools are in it: without them the prompt is another.
        assert_ne!(
            with_tools,
            engine.tokenize(Prompt::Chat(&messages, None)).unwrap()
        );
    }
}
