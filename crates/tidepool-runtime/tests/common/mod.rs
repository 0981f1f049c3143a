//! What the real-model pool tests share: the two model files, the prompts, a pooled model of a
//! file, a greedy request, and waiting for a generation's text. Models from
//! `~/.cache/tidepool/models`.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers fail their test by panicking"
)]

use tidepool_core::{ModelId, RequestId};
use tidepool_engine::multi::MultiModelConfig;
use tidepool_engine::{
    ChatMessage, GenerateRequest, Generation, GenerationEvent, SamplingParams, TextEngine,
};
use tidepool_runtime::PooledModelConfig;

pub(crate) const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub(crate) const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";
pub(crate) const PROMPTS: [&str; 3] = [
    "Write two sentences about the sea.",
    "List three fruits and their colours.",
    "Explain what a compiler does.",
];

/// Model `id` served from `file`: a 512-token context, 4 slots, 2 threads, prompt batches of
/// `batch_tokens_max` tokens.
pub(crate) fn model(id: &str, file: &str, batch_tokens_max: u32) -> PooledModelConfig {
    let path = tidepool_core::config::default_models_dir().join(file);
    let mut engine = MultiModelConfig::new(ModelId::new(id).unwrap(), path);
    engine.context_tokens = 512;
    engine.seqs_max = 4;
    engine.threads = 2;
    engine.batch_tokens_max = batch_tokens_max;
    PooledModelConfig {
        engine,
        pin: false,
        keep_alive_ms: None,
    }
}

/// A greedy request of `max_tokens` tokens: `user` in the model's chat template when `chat`,
/// else as plain text.
pub(crate) fn request(
    engine: &dyn TextEngine,
    chat: bool,
    user: &str,
    max_tokens: u32,
) -> GenerateRequest {
    let text = if chat {
        engine
            .apply_chat_template(&[ChatMessage {
                role: "user".to_owned(),
                content: user.to_owned(),
            }])
            .unwrap()
    } else {
        user.to_owned()
    };
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

/// Waits on this thread for the whole generation; its text.
pub(crate) fn collect(mut generation: Generation) -> String {
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
