//! Baseline (a) of `tidepool bench engine`: a plain llama-cpp-2 batched loop with no server, no
//! channels and no threads, using the same context parameters as [`crate::llama::LlamaEngine`].
//! It is the engine's ceiling on this machine; Tidepool over HTTP is reported as a ratio of it.
//!
//! Prompts are prefilled in chunks of `batch_tokens_max` tokens (stream order), then every
//! stream decodes one greedy token per step, all in one `llama_decode`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tidepool_core::TokenCount;

use crate::llama::{
    BATCH_TOKENS_MAX_DEFAULT, CONTEXT_TOKENS_DEFAULT, backend, context_params, load_model,
    tokenize_text,
};
use crate::{EngineError, TokenId};

/// The prompt every stream gets.
#[derive(Debug, Clone)]
pub enum RawPrompt {
    Tokens(Vec<TokenId>),
    /// Tokenized like `TextEngine::tokenize` (special tokens parsed, BOS if the model wants it).
    Text(String),
}

/// One run of the raw loop.
#[derive(Debug, Clone)]
pub struct RawBatchedConfig {
    /// The GGUF file.
    pub path: PathBuf,
    /// Context size per stream, in tokens (as `LlamaEngineConfig::context_tokens`).
    pub context_tokens: TokenCount,
    /// Threads; 0 means every available core.
    pub threads: u32,
    /// Tokens per `llama_decode` (as `LlamaEngineConfig::batch_tokens_max`).
    pub batch_tokens_max: u32,
    /// Parallel streams; also the context's `n_seq_max`.
    pub streams: u32,
    /// Greedy tokens generated per stream.
    pub generated_tokens: TokenCount,
    /// Keep generating past an end-of-generation token (fixed-length throughput runs). When
    /// false a stream ends at its EOG token, which is not counted, as in the engine.
    pub ignore_end_of_generation: bool,
}

impl RawBatchedConfig {
    pub fn new(path: impl Into<PathBuf>, streams: u32, generated_tokens: TokenCount) -> Self {
        Self {
            path: path.into(),
            context_tokens: CONTEXT_TOKENS_DEFAULT,
            threads: 0,
            batch_tokens_max: BATCH_TOKENS_MAX_DEFAULT,
            streams,
            generated_tokens,
            ignore_end_of_generation: false,
        }
    }
}

/// What one stream produced and when. Times are measured from the start of the run (after the
/// model and context are loaded).
#[derive(Debug, Clone, Default)]
pub struct RawStream {
    pub tokens: Vec<TokenId>,
    /// When each generated token was sampled; the first entry is the time to first token.
    pub token_times: Vec<Duration>,
}

impl RawStream {
    pub fn first_token_time(&self) -> Option<Duration> {
        self.token_times.first().copied()
    }

    /// Gaps between consecutive tokens (inter-token latency samples).
    pub fn inter_token_gaps(&self) -> impl Iterator<Item = Duration> + '_ {
        self.token_times.windows(2).filter_map(|w| match w {
            [a, b] => Some(b.saturating_sub(*a)),
            _ => None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RawBatchedReport {
    pub prompt_tokens: TokenCount,
    pub streams: Vec<RawStream>,
    /// From the first prefill chunk to the last sampled token.
    pub total: Duration,
}

impl RawBatchedReport {
    pub fn generated_tokens(&self) -> u64 {
        self.streams.iter().map(|s| s.tokens.len() as u64).sum()
    }

    /// Aggregate generated tokens per second over the whole run.
    pub fn tokens_per_second(&self) -> f64 {
        let seconds = self.total.as_secs_f64();
        if seconds > 0.0 {
            #[expect(
                clippy::cast_precision_loss,
                reason = "token counts are far below 2^52"
            )]
            let generated = self.generated_tokens() as f64;
            generated / seconds
        } else {
            0.0
        }
    }
}

struct StreamState {
    sampler: LlamaSampler,
    next: Option<LlamaToken>,
    position: i32,
    done: bool,
    result: RawStream,
}

/// Runs the raw loop: loads the model, prefills `streams` copies of the prompt, then decodes
/// `generated_tokens` greedy tokens per stream, one batch per step.
#[expect(
    clippy::too_many_lines,
    reason = "the baseline is meant to read as one plain loop, top to bottom"
)]
pub fn raw_batched_generate(
    config: &RawBatchedConfig,
    prompt: &RawPrompt,
) -> Result<RawBatchedReport, EngineError> {
    let model = load_model(&config.path)?;
    let prompt: Vec<LlamaToken> = match prompt {
        RawPrompt::Tokens(tokens) => tokens.iter().copied().map(LlamaToken).collect(),
        RawPrompt::Text(text) => tokenize_text(&model, text)
            .into_iter()
            .map(LlamaToken)
            .collect(),
    };
    let prompt_tokens = TokenCount::try_from(prompt.len()).unwrap_or(TokenCount::MAX);
    let invalid = |reason: &str| EngineError::InvalidRequest {
        param: "prompt",
        reason: reason.into(),
    };
    if prompt.is_empty() {
        return Err(invalid("empty prompt"));
    }
    if prompt_tokens.saturating_add(config.generated_tokens) > config.context_tokens {
        return Err(EngineError::ContextLengthExceeded {
            prompt_tokens,
            max_tokens: config.generated_tokens,
            context_tokens: config.context_tokens,
        });
    }
    let seqs_max = config.streams.max(1);
    let batch_tokens = config.batch_tokens_max.max(seqs_max);
    let params = context_params(
        config.context_tokens,
        seqs_max,
        config.threads,
        batch_tokens,
    );
    let mut ctx = model
        .new_context(backend()?, params)
        .map_err(|e| EngineError::Load {
            path: config.path.clone(),
            reason: e.to_string(),
        })?;
    let batch_tokens_max = usize::try_from(batch_tokens).unwrap_or(1);
    let mut batch = LlamaBatch::new(batch_tokens_max, 1);
    let vocab = model.vocab();
    let mut streams: Vec<StreamState> = (0..config.streams)
        .map(|_| StreamState {
            sampler: LlamaSampler::chain([LlamaSampler::greedy()], true),
            next: None,
            position: 0,
            done: config.generated_tokens == 0,
            result: RawStream::default(),
        })
        .collect();
    let decode_error = |e: llama_cpp_2::DecodeError| EngineError::Decode {
        code: match e {
            llama_cpp_2::DecodeError::NoKvCacheSlot => 1,
            llama_cpp_2::DecodeError::NTokensZero => -1,
            llama_cpp_2::DecodeError::Unknown(code) => code,
        },
    };
    let batch_error = |_| EngineError::Decode { code: -1 };
    let generated_max = usize::try_from(config.generated_tokens).unwrap_or(usize::MAX);
    let start = Instant::now();

    // Prefill: chunks of up to `batch_tokens_max` tokens, streams in order.
    let mut pending: Vec<(usize, usize)> = (0..streams.len()).map(|s| (s, 0)).collect();
    pending.reverse();
    while !pending.is_empty() {
        batch.clear();
        let mut rows: Vec<(usize, i32)> = Vec::new();
        while let Some((stream, from)) = pending.pop() {
            let room = batch_tokens_max - usize::try_from(batch.n_tokens()).unwrap_or(0);
            if room == 0 {
                pending.push((stream, from));
                break;
            }
            let to = (from + room).min(prompt.len());
            let seq = i32::try_from(stream).unwrap_or(0);
            for (index, token) in prompt.iter().enumerate().take(to).skip(from) {
                let last = index + 1 == prompt.len();
                if last {
                    rows.push((stream, batch.n_tokens()));
                }
                let pos = i32::try_from(index).unwrap_or(i32::MAX);
                batch.add(*token, pos, &[seq], last).map_err(batch_error)?;
            }
            if to < prompt.len() {
                pending.push((stream, to));
                break;
            }
        }
        ctx.decode(&mut batch).map_err(decode_error)?;
        for (stream, row) in rows {
            let Some(state) = streams.get_mut(stream) else {
                continue;
            };
            state.position = i32::try_from(prompt.len()).unwrap_or(i32::MAX);
            let token = state.sampler.sample(&ctx, row);
            accept(
                state,
                token,
                &vocab,
                config.ignore_end_of_generation,
                generated_max,
                start,
            );
        }
    }

    // Decode: one token per live stream per step.
    let mut rows: Vec<(usize, i32)> = Vec::with_capacity(streams.len());
    loop {
        batch.clear();
        rows.clear();
        for (stream, state) in streams.iter_mut().enumerate() {
            let Some(token) = state.next.take() else {
                continue;
            };
            rows.push((stream, batch.n_tokens()));
            let seq = i32::try_from(stream).unwrap_or(0);
            batch
                .add(token, state.position, &[seq], true)
                .map_err(batch_error)?;
            state.position += 1;
        }
        if rows.is_empty() {
            break;
        }
        ctx.decode(&mut batch).map_err(decode_error)?;
        for &(stream, row) in &rows {
            let Some(state) = streams.get_mut(stream) else {
                continue;
            };
            let token = state.sampler.sample(&ctx, row);
            accept(
                state,
                token,
                &vocab,
                config.ignore_end_of_generation,
                generated_max,
                start,
            );
        }
    }
    let total = start.elapsed();
    Ok(RawBatchedReport {
        prompt_tokens,
        streams: streams.into_iter().map(|s| s.result).collect(),
        total,
    })
}

fn accept(
    state: &mut StreamState,
    token: LlamaToken,
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    ignore_end_of_generation: bool,
    generated_max: usize,
    start: Instant,
) {
    if state.done {
        return;
    }
    if !ignore_end_of_generation && vocab.is_eog(token) {
        state.done = true;
        return;
    }
    state.result.tokens.push(token.0);
    state.result.token_times.push(start.elapsed());
    if state.result.tokens.len() >= generated_max {
        state.done = true;
    } else {
        state.next = Some(token);
    }
}

/// The greedy text one stream of the raw loop produces for `prompt` (tokenized as the engine
/// does): the reference that black-box tests compare the server's temperature-0 output with.
pub fn raw_greedy_text(
    path: &std::path::Path,
    prompt: &str,
    generated_tokens: TokenCount,
) -> Result<String, EngineError> {
    let report = raw_batched_generate(
        &RawBatchedConfig::new(path, 1, generated_tokens),
        &RawPrompt::Text(prompt.to_owned()),
    )?;
    let model = load_model(path)?;
    let vocab = model.vocab();
    let mut bytes = Vec::new();
    for stream in &report.streams {
        for &token in &stream.tokens {
            vocab.token_to_piece_into(LlamaToken(token), &mut bytes, false, None);
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
