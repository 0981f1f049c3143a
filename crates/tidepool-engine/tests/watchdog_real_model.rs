//! The unpooled llama.cpp engine's watchdog on SmolLM2-135M-Instruct: its thread is made to
//! panic mid-generation (`fault-injection`), the running request ends with
//! `EngineError::Restarted` after the tokens it already had, a request queued behind it (one
//! slot) runs on the new context with the same greedy output as before the crash, and the
//! restart is broadcast. Waits are on engine events, never on time.

#![cfg(feature = "fault-injection")]
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code fails its test by panicking"
)]

use tidepool_core::{ModelId, RequestId};
use tidepool_engine::{
    ChatMessage, EngineError, GenerateRequest, Generation, GenerationEvent, LlamaEngine,
    LlamaEngineConfig, SamplingParams, TextEngine,
};

fn engine() -> std::sync::Arc<LlamaEngine> {
    let path = tidepool_core::config::default_models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut config = LlamaEngineConfig::new(ModelId::new("smollm2-135m-instruct").unwrap(), path);
    config.context_tokens = 512;
    config.seqs_max = 1;
    config.threads = 2;
    config.batch_tokens_max = 256;
    LlamaEngine::load(config).unwrap()
}

fn request(engine: &LlamaEngine, user: &str, max_tokens: u32) -> GenerateRequest {
    let text = engine
        .apply_chat_template(&[ChatMessage {
            role: "user".to_owned(),
            content: user.to_owned(),
        }])
        .unwrap();
    GenerateRequest {
        remote: None,
        request_id: RequestId::new(),
        prompt: engine.tokenize(&text).unwrap(),
        params: SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..SamplingParams::default()
        },
        class: tidepool_engine::RequestClass::Online,
    }
}

/// The whole text of a generation that must succeed.
fn text_of(mut generation: Generation) -> String {
    let mut text = String::new();
    loop {
        match generation.events.blocking_recv() {
            Some(GenerationEvent::Chunk { text: piece, .. }) => text.push_str(&piece),
            Some(GenerationEvent::Done { .. }) => return text,
            Some(GenerationEvent::Failed(error)) => panic!("generation failed: {error}"),
            None => panic!("the engine dropped a generation"),
        }
    }
}

#[test]
fn real_model_engine_thread_panic_fails_the_running_request_and_runs_the_queued_one() {
    let engine = engine();
    let mut notices = engine.subscribe_restarts();
    let queued_prompt = "Name three colours.";
    let reference = text_of(engine.submit(request(&engine, queued_prompt, 12)).unwrap());

    let mut running = engine
        .submit(request(
            &engine,
            "Write a very long story about the sea.",
            400,
        ))
        .unwrap();
    let mut tokens_before = 0;
    while tokens_before < 3 {
        match running.events.blocking_recv() {
            Some(GenerationEvent::Chunk { tokens, .. }) => tokens_before += tokens,
            other => panic!("expected chunks, got {other:?}"),
        }
    }
    // One slot: this one waits in the queue while the first runs.
    let queued = engine.submit(request(&engine, queued_prompt, 12)).unwrap();
    engine.inject_panic();
    let ending = loop {
        match running.events.blocking_recv() {
            Some(GenerationEvent::Chunk { .. }) => {}
            other => break other,
        }
    };
    assert_eq!(
        ending,
        Some(GenerationEvent::Failed(EngineError::Restarted))
    );
    assert_eq!(
        text_of(queued),
        reference,
        "the queued request ran from scratch"
    );
    let later = text_of(engine.submit(request(&engine, queued_prompt, 12)).unwrap());
    assert_eq!(later, reference);

    let notice = notices.blocking_recv().unwrap();
    assert_eq!(notice.engine, "smollm2-135m-instruct");
    assert_eq!(notice.restarts, 1);
    assert_eq!(notice.failed_requests, 1);
    let health = engine.health().unwrap();
    assert!(health.alive);
    assert_eq!(health.restarts, 1);
}
