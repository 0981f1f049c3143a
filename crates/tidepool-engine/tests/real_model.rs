//! Real-model tests of `tidepool-engine`: SmolLM2-135M-Instruct (chat), Gemma-3-270M (base)
//! and all-MiniLM-L6-v2 from `~/.cache/tidepool/models` (`make models` fetches them).
//!
//! Method: greedy decoding is deterministic, so the engine's output is compared with itself
//! alone, in a batch, with prefix reuse, and with the raw llama-cpp-2 loop in `bench`. Tests
//! wait on engine events, never on time. Every test name contains `real_model`, which gives it
//! two nextest threads (llama.cpp runs two).

use std::path::PathBuf;
use std::sync::Arc;

use tidepool_core::{ModelId, RequestId, TokenCount};
use tidepool_engine::bench::{RawBatchedConfig, RawPrompt, raw_batched_generate};
use tidepool_engine::{
    CandleEmbeddingConfig, CandleEmbeddingEngine, ChatMessage, EmbeddingEngine, EngineError,
    FinishReason, GenerateRequest, Generation, GenerationEvent, LlamaEngine, LlamaEngineConfig,
    SamplingParams, TextEngine, TokenId,
};

fn models_dir() -> PathBuf {
    tidepool_core::config::default_models_dir()
}

fn smollm2_path() -> PathBuf {
    models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn config(seqs_max: u32) -> LlamaEngineConfig {
    let mut config = LlamaEngineConfig::new(
        ModelId::new("smollm2-135m-instruct").unwrap(),
        smollm2_path(),
    );
    config.context_tokens = 512;
    config.seqs_max = seqs_max;
    config.threads = 2;
    config.batch_tokens_max = 256;
    config
}

fn no_reuse(mut config: LlamaEngineConfig) -> LlamaEngineConfig {
    config.prefix_reuse_tokens_min = u32::MAX;
    config
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn chat(engine: &LlamaEngine, user: &str) -> Vec<TokenId> {
    let messages = [ChatMessage {
        role: "user".to_owned(),
        content: user.to_owned(),
    }];
    let text = engine.apply_chat_template(&messages).unwrap();
    engine.tokenize(&text).unwrap()
}

fn greedy(max_tokens: TokenCount) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..SamplingParams::default()
    }
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn submit(engine: &LlamaEngine, prompt: &[TokenId], params: SamplingParams) -> Generation {
    engine
        .submit(GenerateRequest {
            remote: None,
            request_id: RequestId::new(),
            prompt: prompt.to_vec(),
            params,
            class: tidepool_engine::RequestClass::Online,
        })
        .unwrap()
}

#[derive(Debug)]
struct Outcome {
    text: String,
    chunks: Vec<(String, TokenCount)>,
    finish_reason: FinishReason,
    prompt_tokens: TokenCount,
    cached_prompt_tokens: TokenCount,
    completion_tokens: TokenCount,
}

#[expect(clippy::panic, reason = "a test helper fails its test by panicking")]
fn finish(generation: Generation) -> Outcome {
    let mut events = generation.events;
    let mut chunks = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            GenerationEvent::Chunk { text, tokens } => chunks.push((text, tokens)),
            GenerationEvent::Done {
                finish_reason,
                prompt_tokens,
                cached_prompt_tokens,
                completion_tokens,
            } => {
                assert!(events.blocking_recv().is_none(), "nothing may follow Done");
                return Outcome {
                    text: chunks.iter().map(|(t, _)| t.as_str()).collect(),
                    chunks,
                    finish_reason,
                    prompt_tokens,
                    cached_prompt_tokens: cached_prompt_tokens.unwrap_or(u32::MAX),
                    completion_tokens,
                };
            }
            GenerationEvent::Failed(error) => panic!("generation failed: {error}"),
        }
    }
    panic!("channel closed without Done");
}

fn run(engine: &LlamaEngine, prompt: &[TokenId], params: SamplingParams) -> Outcome {
    finish(submit(engine, prompt, params))
}

/// Waits (without asserting on time) until the engine reports no active sequence.
fn wait_idle(engine: &LlamaEngine) {
    while engine.stats().active != 0 || engine.stats().queued != 0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn real_model_greedy_is_reproducible() {
    let engine = LlamaEngine::load(no_reuse(config(2))).unwrap();
    let prompt = chat(&engine, "Name three colours of the rainbow.");
    let first = run(&engine, &prompt, greedy(32));
    let second = run(&engine, &prompt, greedy(32));
    assert!(!first.text.is_empty());
    assert_eq!(first.text, second.text);
    assert_eq!(first.completion_tokens, second.completion_tokens);
    assert_eq!(
        first.prompt_tokens,
        TokenCount::try_from(prompt.len()).unwrap()
    );
    assert_eq!(first.cached_prompt_tokens, 0);
}

#[test]
fn real_model_batch_of_8_matches_each_prompt_alone() {
    let engine = LlamaEngine::load(no_reuse(config(8))).unwrap();
    let questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "How many legs does a spider have?",
        "Explain photosynthesis in one sentence.",
        "What is 12 times 12?",
        "Give me a synonym for happy.",
        "Who wrote Romeo and Juliet?",
        "Describe a cat in five words.",
    ];
    let prompts: Vec<Vec<TokenId>> = questions.iter().map(|q| chat(&engine, q)).collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| run(&engine, p, greedy(24)).text)
        .collect();
    let generations: Vec<Generation> = prompts
        .iter()
        .map(|p| submit(&engine, p, greedy(24)))
        .collect();
    let together: Vec<String> = generations.into_iter().map(|g| finish(g).text).collect();
    assert_eq!(alone, together);
}

#[test]
fn real_model_engine_matches_raw_batched_generate() {
    let engine = LlamaEngine::load(no_reuse(config(4))).unwrap();
    let prompt = chat(&engine, "Tell me a short story about a robot.");
    let outcome = run(&engine, &prompt, greedy(40));
    let mut raw_config = RawBatchedConfig::new(smollm2_path(), 4, 40);
    raw_config.context_tokens = 512;
    raw_config.threads = 2;
    raw_config.batch_tokens_max = 256;
    let report = raw_batched_generate(&raw_config, &RawPrompt::Tokens(prompt.clone())).unwrap();
    assert_eq!(report.streams.len(), 4);
    let vocab = engine.model().vocab();
    for stream in &report.streams {
        let mut bytes = Vec::new();
        for &token in &stream.tokens {
            vocab.token_to_piece_into(
                llama_cpp_2::token::LlamaToken(token),
                &mut bytes,
                false,
                None,
            );
        }
        assert_eq!(String::from_utf8_lossy(&bytes), outcome.text);
        assert_eq!(
            TokenCount::try_from(stream.tokens.len()).unwrap(),
            outcome.completion_tokens
        );
        assert_eq!(stream.token_times.len(), stream.tokens.len());
    }
    assert!(report.tokens_per_second() > 0.0);
}

#[test]
fn real_model_stop_strings_cut_output_even_across_tokens() {
    let engine = LlamaEngine::load(no_reuse(config(2))).unwrap();
    let prompt = chat(&engine, "Write two sentences about mountains.");
    let free = run(&engine, &prompt, greedy(40));
    // Build a stop string from the end of one token's text and the start of the next.
    let pieces: Vec<&str> = free.chunks.iter().map(|(t, _)| t.as_str()).collect();
    let (index, stop) = (3..pieces.len() - 1)
        .find_map(|k| {
            let (a, b) = (pieces[k], pieces[k + 1]);
            let tail: String = a
                .chars()
                .rev()
                .take(2)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let head: String = b.chars().take(2).collect();
            let stop = format!("{tail}{head}");
            let before: String = pieces[..=k].concat();
            let boundary = before.len() - tail.len();
            let unique = free.text.find(&stop) == Some(boundary);
            (tail.chars().count() == 2 && head.chars().count() == 2 && unique).then_some((k, stop))
        })
        .expect("some token boundary gives a unique stop string");
    let mut params = greedy(40);
    params.stop = vec!["never appears ###".to_owned(), stop.clone()];
    let stopped = run(&engine, &prompt, params);
    let expected = free.text.get(..free.text.find(&stop).unwrap()).unwrap();
    assert_eq!(stopped.text, expected);
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    let tokens_through_stop: TokenCount = free.chunks[..=index + 1].iter().map(|(_, n)| n).sum();
    assert_eq!(stopped.completion_tokens, tokens_through_stop);
    assert!(!stopped.text.contains(&stop));
}

#[test]
fn real_model_max_tokens_ends_with_length() {
    let engine = LlamaEngine::load(config(1)).unwrap();
    let prompt = chat(&engine, "Count from one to one hundred, in words.");
    let outcome = run(&engine, &prompt, greedy(5));
    assert_eq!(outcome.finish_reason, FinishReason::Length);
    assert_eq!(outcome.completion_tokens, 5);
    let chunk_tokens: TokenCount = outcome.chunks.iter().map(|(_, n)| n).sum();
    assert_eq!(chunk_tokens, 5);
}

#[test]
fn real_model_cancel_frees_the_slot() {
    let mut config = config(1);
    config.chunks_buffered_max = 2;
    let engine = LlamaEngine::load(config).unwrap();
    let prompt = chat(
        &engine,
        "Write a very long essay about the history of Rome.",
    );
    let mut generation = submit(&engine, &prompt, greedy(400));
    for _ in 0..3 {
        assert!(matches!(
            generation.events.blocking_recv(),
            Some(GenerationEvent::Chunk { .. })
        ));
    }
    assert_eq!(engine.stats().active, 1);
    drop(generation);
    // The single slot must come free for this one to run at all.
    let next = run(&engine, &prompt, greedy(3));
    assert_eq!(next.completion_tokens, 3);
    wait_idle(&engine);
    assert_eq!(engine.stats().active, 0);
}

#[test]
fn real_model_prefix_reuse_gives_identical_greedy_text() {
    let system = "You are a helpful assistant who answers briefly and precisely. \
                  Always answer in English, use plain words and avoid lists.";
    let ask = |engine: &LlamaEngine, question: &str| {
        let messages = [
            ChatMessage {
                role: "system".to_owned(),
                content: system.to_owned(),
            },
            ChatMessage {
                role: "user".to_owned(),
                content: question.to_owned(),
            },
        ];
        engine
            .tokenize(&engine.apply_chat_template(&messages).unwrap())
            .unwrap()
    };
    let reusing = LlamaEngine::load(config(2)).unwrap();
    let fresh = LlamaEngine::load(no_reuse(config(2))).unwrap();
    let warm_up = ask(&reusing, "What is the boiling point of water?");
    run(&reusing, &warm_up, greedy(16));
    let prompt = ask(&reusing, "Why is the sky blue?");
    let reused = run(&reusing, &prompt, greedy(32));
    let baseline = run(&fresh, &prompt, greedy(32));
    assert!(reused.cached_prompt_tokens > 16, "{reused:?}");
    assert!(reused.cached_prompt_tokens < reused.prompt_tokens);
    assert_eq!(baseline.cached_prompt_tokens, 0);
    assert_eq!(reused.text, baseline.text);
    // The very same prompt again reuses all but its last token.
    let again = run(&reusing, &prompt, greedy(32));
    assert_eq!(again.cached_prompt_tokens, again.prompt_tokens - 1);
    assert_eq!(again.text, baseline.text);
}

#[test]
fn real_model_full_queue_is_overloaded() {
    let mut config = config(1);
    config.queue_len_max = 1;
    config.chunks_buffered_max = 1;
    let engine = LlamaEngine::load(config).unwrap();
    let prompt = chat(&engine, "Tell me about the ocean.");
    let mut running = submit(&engine, &prompt, greedy(200));
    // Its first chunk proves it holds the only slot (and, unread, it stays held there).
    assert!(matches!(
        running.events.blocking_recv(),
        Some(GenerationEvent::Chunk { .. })
    ));
    let _queued = submit(&engine, &prompt, greedy(4));
    let refused = engine.submit(GenerateRequest {
        remote: None,
        request_id: RequestId::new(),
        prompt: prompt.clone(),
        params: greedy(4),
        class: tidepool_engine::RequestClass::Online,
    });
    assert!(
        matches!(refused, Err(EngineError::Overloaded { .. })),
        "{refused:?}"
    );
}

#[test]
fn real_model_context_too_long_is_rejected_at_submit() {
    let engine = LlamaEngine::load(config(1)).unwrap();
    let prompt = engine.tokenize(&"word ".repeat(500)).unwrap();
    let refused = engine.submit(GenerateRequest {
        remote: None,
        request_id: RequestId::new(),
        prompt,
        params: greedy(100),
        class: tidepool_engine::RequestClass::Online,
    });
    assert!(
        matches!(
            refused,
            Err(EngineError::ContextLengthExceeded {
                context_tokens: 512,
                ..
            })
        ),
        "{refused:?}"
    );
    let bad_token = engine.submit(GenerateRequest {
        remote: None,
        request_id: RequestId::new(),
        prompt: vec![-1],
        params: greedy(1),
        class: tidepool_engine::RequestClass::Online,
    });
    assert!(matches!(
        bad_token,
        Err(EngineError::InvalidRequest {
            param: "prompt",
            ..
        })
    ));
}

#[test]
fn real_model_sampling_with_seed_is_reproducible() {
    let engine = LlamaEngine::load(config(2)).unwrap();
    let prompt = chat(&engine, "Invent a name for a dragon.");
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        seed: Some(1234),
        max_tokens: 24,
        presence_penalty: 0.5,
        frequency_penalty: 0.5,
        ..SamplingParams::default()
    };
    let a = run(&engine, &prompt, params.clone());
    let b = run(&engine, &prompt, params);
    assert_eq!(a.text, b.text);
}

#[test]
fn real_model_gemma3_completion_generates() {
    let mut config = LlamaEngineConfig::new(
        ModelId::new("gemma-3-270m").unwrap(),
        models_dir().join("gemma-3-270m-q4_k_m.gguf"),
    );
    config.context_tokens = 256;
    config.seqs_max = 2;
    config.threads = 2;
    config.batch_tokens_max = 64;
    let engine = LlamaEngine::load(config).unwrap();
    let prompt = engine.tokenize("The capital of France is").unwrap();
    let outcome = run(&engine, &prompt, greedy(8));
    assert!(outcome.completion_tokens > 0);
    assert!(!outcome.text.trim().is_empty(), "{outcome:?}");
    let again = run(&engine, &prompt, greedy(8));
    assert_eq!(outcome.text, again.text);
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper fails its test by panicking"
)]
fn embedder() -> Arc<CandleEmbeddingEngine> {
    CandleEmbeddingEngine::load(CandleEmbeddingConfig::new(
        ModelId::new("all-minilm-l6-v2").unwrap(),
        models_dir().join("all-minilm-l6-v2"),
    ))
    .unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn real_model_embeddings_rank_paraphrase_above_unrelated() {
    let engine = embedder();
    assert_eq!(engine.dimensions(), 384);
    let inputs = vec![
        "A man is playing a guitar.".to_owned(),
        "Someone strums a guitar.".to_owned(),
        "The stock market fell sharply today.".to_owned(),
    ];
    let answer = engine
        .embed(inputs)
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert_eq!(answer.vectors.len(), 3);
    for vector in &answer.vectors {
        assert_eq!(vector.len(), 384);
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let paraphrase = cosine(&answer.vectors[0], &answer.vectors[1]);
    let unrelated = cosine(&answer.vectors[0], &answer.vectors[2]);
    assert!(paraphrase > unrelated + 0.2, "{paraphrase} vs {unrelated}");
    assert!(answer.prompt_tokens > 10);
}

#[test]
fn real_model_embeddings_batch_equals_single_and_rejects_long_input() {
    let engine = embedder();
    let short = "cats".to_owned();
    let long = "a much longer sentence about dogs running in the park at noon".to_owned();
    let both = engine
        .embed(vec![long.clone(), short.clone()])
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    let alone = engine
        .embed(vec![short])
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    let same = cosine(&both.vectors[1], &alone.vectors[0]);
    assert!(same > 0.9999, "padding changed the embedding: {same}");
    let too_long = engine
        .embed(vec!["word ".repeat(300)])
        .unwrap()
        .blocking_recv()
        .unwrap();
    assert!(
        matches!(
            too_long,
            Err(EngineError::ContextLengthExceeded {
                context_tokens: 256,
                ..
            })
        ),
        "{too_long:?}"
    );
}
