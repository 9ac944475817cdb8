//! Requests with tools render the model's own Jinja chat template with minijinja, the others
//! go through llama.cpp's built-in template handling. On the real default model the two must
//! agree token for token on the same conversation (the tools listed in a system note, since
//! SmolLM2's template does not show tools): otherwise minijinja would be rendering the template
//! differently from llama.cpp, and prompts with tools would not be the model's own format.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proofmesh_provider::engine::{Engine, EngineConfig};
use proofmesh_shared::protocol::{ChatMessage, Prompt};

const TOOLS: &str = r#"[{"type":"function","function":{"name":"get_weather","description":"The weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]"#;

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minijinja_renders_the_models_template_as_llama_cpp_does() {
    let path = proofmesh_provider::fetch::default_model_path();
    assert!(
        path.is_file(),
        "run `cargo run -p proofmesh-provider -- fetch-model` first (scripts/test.sh does)"
    );
    let config = EngineConfig {
        threads: 2,
        context_size: 512,
        parallel: 1,
        referee_slots: 0,
        ..EngineConfig::new(path)
    };
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
        // The same conversation with the note written in by hand, through llama.cpp.
        let mut noted = messages.clone();
        match noted.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{note}\n\n{}", first.content);
            }
            _ => noted.insert(0, message("system", &note)),
        }
        let by_llama = engine.tokenize(Prompt::Chat(&noted, None)).unwrap();
        assert_eq!(with_tools, by_llama, "{messages:?}");
        // And the tools are in it: without them the prompt is another.
        assert_ne!(
            with_tools,
            engine.tokenize(Prompt::Chat(&messages, None)).unwrap()
        );
    }
}
