//! llama.cpp text generation with continuous batching.
//!
//! One named OS thread per model owns the `LlamaContext` (not `Send` in spirit: all its calls
//! must come from one thread at a time, and sharing it behind a lock would serialise the gateway
//! on it). Requests arrive over a bounded `std::sync::mpsc::sync_channel`; each step the thread
//! admits queued requests into free slots, builds one batch with one token per generating
//! sequence plus prompt chunks up to `batch_tokens_max`, runs one `llama_decode` and samples
//! each sequence with its own sampler chain.
//!
//! Slots map 1:1 to llama.cpp sequence ids. The KV cache is not unified (`kv_unified = false`,
//! as `llama-server -np N` does), so every slot owns exactly `context_tokens` cells and cannot
//! starve the others. A finished sequence's KV stays in its slot; a new prompt that shares a
//! long enough prefix with an idle slot takes that slot and prefills only the rest.
//!
//! The thread watches itself: a panic is caught, running sequences end with
//! `EngineError::Restarted`, the context is freed and created again after the restart backoff
//! (the weights are kept), and sequences that had not started run on the new context; the queue
//! is untouched. Each restart is counted, logged and broadcast.

use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::vocab::LlamaVocab;
use llama_cpp_2::{DecodeError, LogOptions};
use tidepool_core::ModelId;
use tokio::sync::{broadcast, mpsc};

use crate::admission::{LiveStats, admit};
use crate::output::{Delivery, SeqOutput, fail_owed_until};
use crate::params::{seed_u32, validate_request};
use crate::watchdog::{
    Backoff, EngineHealth, EngineRestart, RESTART_NOTICES_BUFFERED_MAX, ThreadWatch,
    WatchdogConfig, count_restart, panic_message,
};
use crate::{
    ChatMessage, EngineError, EngineStats, GenerateRequest, Generation, SamplingParams, TextEngine,
    TokenCount, TokenId,
};

/// Most sequences one context may hold; llama.cpp's `LLAMA_MAX_SEQ`.
pub const SEQS_MAX_LIMIT: u32 = 256;
/// Default per-sequence context, in tokens.
pub const CONTEXT_TOKENS_DEFAULT: TokenCount = 2048;
/// Default tokens per decode step: enough for 16 streams plus a 128-token prompt chunk while
/// keeping one step's prefill short enough not to stall the others for long.
pub const BATCH_TOKENS_MAX_DEFAULT: u32 = 512;
/// How long the engine thread waits before retrying when every sequence is held by a full
/// client channel (nothing to decode, but work exists): a poll, not a spin.
const HELD_POLL_INTERVAL: Duration = Duration::from_millis(2);
/// Longest wait of an idle engine thread between heartbeats.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// Retry period of a failure owed to a client whose channel was full, during the backoff.
const OWED_RETRY_INTERVAL: Duration = Duration::from_millis(2);

/// How to load one llama.cpp model. Build it with [`LlamaEngineConfig::new`] and override
/// fields, so new fields with defaults do not break callers.
#[derive(Debug, Clone)]
pub struct LlamaEngineConfig {
    pub model_id: ModelId,
    /// The GGUF file.
    pub path: PathBuf,
    /// Longest prompt + completion of one sequence, in tokens.
    pub context_tokens: TokenCount,
    /// Sequences decoded together (slots).
    pub seqs_max: u32,
    /// Threads for decode and prompt processing; 0 means every available core.
    pub threads: u32,
    /// Tokens in one `llama_decode` (one per generating sequence + prompt chunks). Also
    /// `n_batch` and `n_ubatch`; must be at least `seqs_max`.
    pub batch_tokens_max: u32,
    /// Requests waiting for a slot; beyond it `submit` fails with `Overloaded`.
    pub queue_len_max: u32,
    /// Events buffered per request before the engine holds that sequence.
    pub chunks_buffered_max: u32,
    /// Shortest shared prefix, in tokens, worth reusing from an idle slot's KV.
    pub prefix_reuse_tokens_min: u32,
    /// `Retry-After` hint returned with `Overloaded`.
    pub overload_retry_after_ms: u32,
    /// Restart backoff and heartbeat bound of the engine thread.
    pub watchdog: WatchdogConfig,
}

impl LlamaEngineConfig {
    pub fn new(model_id: ModelId, path: impl Into<PathBuf>) -> Self {
        Self {
            model_id,
            path: path.into(),
            context_tokens: CONTEXT_TOKENS_DEFAULT,
            seqs_max: 16,
            threads: 0,
            batch_tokens_max: BATCH_TOKENS_MAX_DEFAULT,
            queue_len_max: 64,
            chunks_buffered_max: 64,
            prefix_reuse_tokens_min: 16,
            overload_retry_after_ms: 1000,
            watchdog: WatchdogConfig::default(),
        }
    }

    fn check(&self) -> Result<(), EngineError> {
        let fail = |reason: &str| {
            Err(EngineError::Load {
                path: self.path.clone(),
                reason: reason.to_owned(),
            })
        };
        check_context_shape(
            &self.path,
            self.context_tokens,
            1,
            self.seqs_max,
            self.batch_tokens_max,
        )?;
        if self.queue_len_max == 0 || self.chunks_buffered_max == 0 {
            return fail("queue_len_max and chunks_buffered_max must be at least 1");
        }
        Ok(())
    }

    /// Context parameters shared by the engine and the raw benchmark loop.
    pub(crate) fn context_params(&self) -> LlamaContextParams {
        context_params(
            self.context_tokens,
            self.seqs_max,
            self.threads,
            self.batch_tokens_max,
        )
    }
}

/// Checks the context shape shared by the per-model engine and the pooled one: slots within
/// llama.cpp's limit, a batch that holds one token per slot, a cell count that fits `u32`.
pub(crate) fn check_context_shape(
    path: &Path,
    context_tokens: TokenCount,
    context_tokens_min: TokenCount,
    seqs_max: u32,
    batch_tokens_max: u32,
) -> Result<(), EngineError> {
    let fail = |reason: String| {
        Err(EngineError::Load {
            path: path.to_owned(),
            reason,
        })
    };
    if context_tokens < context_tokens_min {
        return fail(format!(
            "context_tokens must be at least {context_tokens_min}"
        ));
    }
    if seqs_max == 0 || seqs_max > SEQS_MAX_LIMIT {
        return fail("seqs_max must be between 1 and 256".to_owned());
    }
    if batch_tokens_max < seqs_max {
        return fail("batch_tokens_max must be at least seqs_max".to_owned());
    }
    if context_tokens.checked_mul(seqs_max).is_none() {
        return fail("context_tokens * seqs_max overflows".to_owned());
    }
    Ok(())
}

/// Threads llama.cpp should use: `threads`, or every available core for 0.
fn threads_resolved(threads: u32) -> i32 {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    } else {
        usize::try_from(threads).unwrap_or(1)
    };
    i32::try_from(threads).unwrap_or(1)
}

/// llama.cpp context parameters for `seqs_max` slots of `context_tokens` each. Shared with the
/// raw benchmark loop so both measure the same configuration.
pub(crate) fn context_params(
    context_tokens: TokenCount,
    seqs_max: u32,
    threads: u32,
    batch_tokens_max: u32,
) -> LlamaContextParams {
    let threads = threads_resolved(threads);
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(context_tokens.saturating_mul(seqs_max)))
        .with_n_seq_max(seqs_max)
        .with_n_batch(batch_tokens_max)
        .with_n_ubatch(batch_tokens_max)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_kv_unified(false)
}

/// The process-wide llama.cpp backend. `llama_backend_init` may run only once per process.
pub(crate) fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Option<LlamaBackend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(LogOptions::default());
            LlamaBackend::init().ok()
        })
        .as_ref()
        .ok_or_else(|| EngineError::Load {
            path: PathBuf::new(),
            reason: "the llama.cpp backend was initialised outside tidepool-engine".to_owned(),
        })
}

pub(crate) fn load_model(path: &Path) -> Result<LlamaModel, EngineError> {
    let backend = backend()?;
    if !path.is_file() {
        return Err(EngineError::Load {
            path: path.to_owned(),
            reason: "no such file".to_owned(),
        });
    }
    LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()).map_err(|e| {
        EngineError::Load {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    })
}

/// Tokenizes like [`TextEngine::tokenize`]: special tokens parsed, BOS added if the model wants
/// it, and a doubled BOS (a chat template that writes its own) collapsed to one.
pub(crate) fn tokenize_text(model: &LlamaModel, text: &str) -> Vec<TokenId> {
    let vocab = model.vocab();
    let mut tokens: Vec<TokenId> = vocab
        .tokenize(text.as_bytes(), true, true)
        .into_iter()
        .map(|t| t.0)
        .collect();
    let bos = vocab.bos().0;
    if tokens.len() >= 2 && tokens.first() == Some(&bos) && tokens.get(1) == Some(&bos) {
        tokens.remove(0);
    }
    tokens
}

/// Renders chat messages with the model's template (from its GGUF metadata), ending with the
/// assistant prefix.
pub(crate) fn render_chat(
    model: &LlamaModel,
    template: Option<&LlamaChatTemplate>,
    model_id: &ModelId,
    messages: &[ChatMessage],
) -> Result<String, EngineError> {
    let template = template.ok_or_else(|| EngineError::Template {
        reason: format!("model `{model_id}` has no chat template in its GGUF metadata"),
    })?;
    let chat = messages
        .iter()
        .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Template {
            reason: e.to_string(),
        })?;
    model
        .apply_chat_template(template, &chat, true)
        .map_err(|e| EngineError::Template {
            reason: e.to_string(),
        })
}

/// [`tokenize_text`] after rejecting text llama.cpp cannot take (a NUL byte).
pub(crate) fn tokenize_checked(
    model: &LlamaModel,
    text: &str,
) -> Result<Vec<TokenId>, EngineError> {
    if text.contains('\0') {
        return Err(EngineError::Tokenize {
            reason: "text contains a NUL byte".to_owned(),
        });
    }
    Ok(tokenize_text(model, text))
}

/// The numeric code of a failed `llama_decode`, as [`EngineError::Decode`] reports it.
pub(crate) fn decode_error_code(error: &DecodeError) -> i32 {
    match error {
        DecodeError::NoKvCacheSlot => 1,
        DecodeError::NTokensZero => -1,
        DecodeError::Unknown(code) => *code,
    }
}

/// Sliding-window size of the model, if it uses sliding-window attention. Partial KV removal is
/// unreliable past the window (llama.cpp #25295, #29045), so prefix reuse stays inside it.
pub(crate) fn sliding_window_tokens(model: &LlamaModel) -> Option<usize> {
    let arch = model.meta_val_str("general.architecture").ok()?;
    let window = model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()?;
    window.trim().parse::<usize>().ok().filter(|w| *w > 0)
}

/// The per-request sampler: penalties, top-k, top-p, temperature, then a seeded draw; greedy at
/// temperature 0. Chains reuse llama.cpp's candidate buffer, so sampling does not allocate.
pub(crate) fn build_sampler(
    model: &LlamaModel,
    params: &SamplingParams,
    request_id: tidepool_core::RequestId,
) -> LlamaSampler {
    let mut chain = Vec::with_capacity(5);
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        // Penalise over the whole completion (-1 would mean the context; `max_tokens` bounds it).
        let last_n = i32::try_from(params.max_tokens).unwrap_or(i32::MAX);
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            last_n,
            1.0,
            params.frequency_penalty,
            params.presence_penalty,
        ));
    }
    if params.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
        return LlamaSampler::chain(chain, true);
    }
    if params.top_k > 0 {
        chain.push(LlamaSampler::top_k(
            i32::try_from(params.top_k).unwrap_or(i32::MAX),
        ));
    }
    if params.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(params.top_p, 1));
    }
    chain.push(LlamaSampler::temp(params.temperature));
    chain.push(LlamaSampler::dist(seed_u32(params.seed, request_id)));
    LlamaSampler::chain(chain, true)
}

/// A queued request, built on the caller's thread so the engine thread only decodes.
struct Job {
    prompt: Vec<LlamaToken>,
    sampler: LlamaSampler,
    output: SeqOutput,
}

/// A loaded llama.cpp model with its decode thread. Dropping the last `Arc` closes the queue;
/// the thread finishes the sequences it holds and then exits.
pub struct LlamaEngine {
    model_id: ModelId,
    model: Arc<LlamaModel>,
    context_tokens: TokenCount,
    vocab_tokens: TokenId,
    chat_template: Option<LlamaChatTemplate>,
    commands: SyncSender<Job>,
    stats: Arc<LiveStats>,
    chunks_buffered_max: usize,
    overload_retry_after_ms: u32,
    watch: Arc<ThreadWatch>,
    notices: broadcast::Sender<EngineRestart>,
}

impl std::fmt::Debug for LlamaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaEngine")
            .field("model_id", &self.model_id)
            .field("context_tokens", &self.context_tokens)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl LlamaEngine {
    /// Loads the GGUF, creates the context on a new thread named `tidepool-llama`, and returns
    /// once the context exists (or failed to).
    pub fn load(config: LlamaEngineConfig) -> Result<Arc<Self>, EngineError> {
        config.check()?;
        let model = Arc::new(load_model(&config.path)?);
        let chat_template = model.chat_template(None).ok();
        let (commands, receiver) =
            std::sync::mpsc::sync_channel(usize::try_from(config.queue_len_max).unwrap_or(1));
        let stats = Arc::new(LiveStats::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread_model = Arc::clone(&model);
        let thread_stats = Arc::clone(&stats);
        let thread_config = config.clone();
        let watch = Arc::new(ThreadWatch::new(config.watchdog.heartbeat_stale));
        let (notices, _) = broadcast::channel(RESTART_NOTICES_BUFFERED_MAX);
        let thread_watch = Arc::clone(&watch);
        let thread_notices = notices.clone();
        std::thread::Builder::new()
            .name(format!("tidepool-llama-{}", config.model_id))
            .spawn(move || {
                let watched = Watched {
                    watch: &thread_watch,
                    notices: &thread_notices,
                };
                run_worker(
                    &thread_model,
                    &thread_config,
                    &receiver,
                    &thread_stats,
                    &ready_tx,
                    &watched,
                );
            })
            .map_err(|e| EngineError::Load {
                path: config.path.clone(),
                reason: e.to_string(),
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(EngineError::Load {
                    path: config.path.clone(),
                    reason: "engine thread exited during start-up".to_owned(),
                });
            }
        }
        tracing::info!(model = %config.model_id, seqs_max = config.seqs_max,
            context_tokens = config.context_tokens, "llama.cpp model loaded");
        Ok(Arc::new(Self {
            model_id: config.model_id,
            vocab_tokens: model.n_vocab(),
            model,
            context_tokens: config.context_tokens,
            chat_template,
            commands,
            stats,
            chunks_buffered_max: usize::try_from(config.chunks_buffered_max).unwrap_or(1),
            overload_retry_after_ms: config.overload_retry_after_ms,
            watch,
            notices,
        }))
    }

    /// A receiver of every later restart of the engine thread.
    pub fn subscribe_restarts(&self) -> broadcast::Receiver<EngineRestart> {
        self.notices.subscribe()
    }

    /// Makes the engine thread panic at its next step, as a crash would (the watchdog's test
    /// hook).
    #[cfg(feature = "fault-injection")]
    pub fn inject_panic(&self) {
        self.watch.arm_fault();
    }

    /// The underlying model, e.g. to detokenize in tests.
    pub fn model(&self) -> &Arc<LlamaModel> {
        &self.model
    }
}

impl TextEngine for LlamaEngine {
    fn model_id(&self) -> &ModelId {
        &self.model_id
    }

    fn context_tokens(&self) -> TokenCount {
        self.context_tokens
    }

    fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        render_chat(
            &self.model,
            self.chat_template.as_ref(),
            &self.model_id,
            messages,
        )
    }

    fn tokenize(&self, text: &str) -> Result<Vec<TokenId>, EngineError> {
        tokenize_checked(&self.model, text)
    }

    fn submit(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let prompt_tokens = validate_request(&request, self.vocab_tokens, self.context_tokens)?;
        let sampler = build_sampler(&self.model, &request.params, request.request_id);
        let (tx, events) = mpsc::channel(self.chunks_buffered_max);
        let output = SeqOutput::new(
            tx,
            request.params.stop,
            request.params.max_tokens,
            prompt_tokens,
        );
        let prompt = request.prompt.into_iter().map(LlamaToken).collect();
        let prefill_started = output.prefill_clock();
        admit(
            &self.commands,
            &self.stats,
            Job {
                prompt,
                sampler,
                output,
            },
            self.overload_retry_after_ms,
        )?;
        Ok(Generation {
            events,
            prefill_started,
        })
    }

    fn stats(&self) -> EngineStats {
        self.stats.snapshot()
    }

    fn health(&self) -> Option<EngineHealth> {
        Some(self.watch.health())
    }

    fn restarts(&self) -> Option<broadcast::Receiver<EngineRestart>> {
        Some(self.subscribe_restarts())
    }
}

/// What the engine thread shares with its readers about itself.
struct Watched<'a> {
    watch: &'a ThreadWatch,
    notices: &'a broadcast::Sender<EngineRestart>,
}

/// Thread entry: creates the context, reports start-up, runs the worker, and after a panic frees
/// the context and creates a new one after the backoff (the weights and the queue are kept;
/// sequences that had not started run again).
#[expect(
    clippy::too_many_lines,
    reason = "the thread's life in order: start, run, salvage, back off, announce"
)]
fn run_worker(
    model: &LlamaModel,
    config: &LlamaEngineConfig,
    commands: &Receiver<Job>,
    stats: &LiveStats,
    ready: &SyncSender<Result<(), EngineError>>,
    watched: &Watched<'_>,
) {
    let engine = config.model_id.to_string();
    let mut backoff = Backoff::new(&config.watchdog);
    let mut first = true;
    let mut carried: Vec<Job> = Vec::new();
    loop {
        let worker = backend().and_then(|backend| {
            let ctx = model
                .new_context(backend, config.context_params())
                .map_err(|e| EngineError::Load {
                    path: config.path.clone(),
                    reason: e.to_string(),
                })?;
            Ok(Worker::new(
                model,
                ctx,
                config,
                commands,
                stats,
                watched.watch,
            ))
        });
        let mut worker = match worker {
            Ok(worker) => worker,
            Err(error) if first => {
                if ready.send(Err(error)).is_err() {
                    tracing::error!("engine start-up failed and nobody is waiting for it");
                }
                return;
            }
            Err(error) => {
                // Left dead (readiness shows it): a context that cannot be created again will
                // not be created by trying in a loop.
                tracing::error!(engine = %engine, %error, "the restarted engine could not create its context");
                for job in carried {
                    job.output.fail(error.clone());
                }
                return;
            }
        };
        if first {
            first = false;
            if ready.send(Ok(())).is_err() {
                return;
            }
        }
        for job in carried.drain(..) {
            // Counted queued again: `admit` takes it off.
            stats.queued.fetch_add(1, Ordering::Relaxed);
            worker.admit(job);
        }
        watched.watch.set_alive(true);
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| worker.run()));
        let Err(payload) = outcome else {
            return;
        };
        let detected = Instant::now();
        watched.watch.set_alive(false);
        let reason = panic_message(payload.as_ref());
        let (owed, jobs) = worker.salvage();
        if std::panic::catch_unwind(AssertUnwindSafe(move || drop(worker))).is_err() {
            tracing::error!(engine = %engine, "freeing the stopped context panicked too");
        }
        carried = jobs;
        let restarts = watched.watch.restarted();
        count_restart(&engine);
        let delay = backoff.next_delay(started.elapsed());
        let failed_requests = u32::try_from(owed.len()).unwrap_or(u32::MAX);
        let readmitted_requests = u32::try_from(carried.len()).unwrap_or(u32::MAX);
        tracing::error!(engine = %engine, %reason, restarts, failed_requests, readmitted_requests,
            backoff_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "the engine thread panicked; restarting it");
        fail_owed_until(owed, detected + delay, OWED_RETRY_INTERVAL);
        let notice = EngineRestart {
            engine: engine.clone(),
            reason,
            restarts,
            backoff: delay,
            // The new context is created right after (a few milliseconds for small models).
            down: detected.elapsed(),
            failed_requests,
            readmitted_requests,
        };
        if watched.notices.send(notice).is_err() {
            tracing::debug!("no subscriber for restart notices");
        }
    }
}

/// A running request in a slot.
struct Active {
    prompt: Vec<LlamaToken>,
    /// Prompt tokens already in the KV (reused or decoded).
    prefilled: usize,
    sampler: LlamaSampler,
    output: SeqOutput,
    /// Sampled but not yet decoded; `None` while prefilling or after finishing.
    next_token: Option<LlamaToken>,
    /// Admission order, for first-come-first-served prompt chunks.
    admitted: u64,
    /// Tokens this sequence puts into the current step's batch.
    step_tokens: usize,
    /// Row of this sequence's logits in the current batch.
    logits_row: Option<i32>,
}

struct Slot {
    seq_id: i32,
    /// Tokens whose KV is in this sequence, at positions `0..len`.
    kv_tokens: Vec<LlamaToken>,
    /// Step at which the slot last became idle; the least recent is overwritten first.
    idle_since: u64,
    active: Option<Active>,
}

struct Worker<'m> {
    vocab: LlamaVocab<'m>,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    slots: Vec<Slot>,
    commands: &'m Receiver<Job>,
    watch: &'m ThreadWatch,
    commands_open: bool,
    stats: &'m LiveStats,
    batch_tokens_max: usize,
    prefix_reuse_tokens_min: usize,
    sliding_window_tokens: Option<usize>,
    /// Reused buffer for one token's text.
    piece: Vec<u8>,
    steps: u64,
}

impl<'m> Worker<'m> {
    fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        config: &LlamaEngineConfig,
        commands: &'m Receiver<Job>,
        stats: &'m LiveStats,
        watch: &'m ThreadWatch,
    ) -> Self {
        let batch_tokens_max = usize::try_from(config.batch_tokens_max).unwrap_or(1);
        let slots = (0..config.seqs_max)
            .map(|seq| Slot {
                seq_id: i32::try_from(seq).unwrap_or(0),
                kv_tokens: Vec::new(),
                idle_since: 0,
                active: None,
            })
            .collect();
        Self {
            vocab: model.vocab(),
            ctx,
            batch: LlamaBatch::new(batch_tokens_max, 1),
            slots,
            commands,
            watch,
            commands_open: true,
            stats,
            batch_tokens_max,
            prefix_reuse_tokens_min: usize::try_from(config.prefix_reuse_tokens_min)
                .unwrap_or(usize::MAX)
                .max(1),
            sliding_window_tokens: sliding_window_tokens(model),
            piece: Vec::with_capacity(64),
            steps: 0,
        }
    }

    fn run(&mut self) {
        loop {
            self.watch.heartbeat.beat();
            self.watch.fault_point();
            let busy = self.slots.iter().any(|s| s.active.is_some());
            if !busy {
                if !self.commands_open {
                    return;
                }
                // Idle: wait for a request instead of spinning, beating once in a while.
                match self.commands.recv_timeout(IDLE_WAIT) {
                    Ok(job) => self.admit(job),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            self.admit_queued();
            let decoded = self.step();
            if !decoded && self.slots.iter().any(|s| s.active.is_some()) {
                // Every sequence is held by a full client channel: wait a little for either a
                // reader to drain or (if a slot is free) a new request.
                if !self.commands_open || self.slots.iter().all(|s| s.active.is_some()) {
                    std::thread::sleep(HELD_POLL_INTERVAL);
                    continue;
                }
                match self.commands.recv_timeout(HELD_POLL_INTERVAL) {
                    Ok(job) => self.admit(job),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => self.commands_open = false,
                }
            }
        }
    }

    /// After a panic: running sequences leave with their outputs (owed a `Restarted` failure),
    /// sequences that had not computed anything of their own come back as jobs to run again.
    fn salvage(&mut self) -> (Vec<SeqOutput>, Vec<Job>) {
        let mut owed = Vec::new();
        let mut jobs = Vec::new();
        for slot in &mut self.slots {
            let Some(active) = slot.active.take() else {
                continue;
            };
            self.stats.active.fetch_sub(1, Ordering::Relaxed);
            let cached = usize::try_from(active.output.cached_prompt_tokens()).unwrap_or(0);
            let started = active.next_token.is_some()
                || active.output.completion_tokens() > 0
                || active.prefilled > cached;
            if active.output.is_closed() {
                continue;
            }
            if active.output.is_finished() {
                // Its `Done` is owed, not a failure: one last try.
                let mut output = active.output;
                if output.deliver() == Delivery::Held {
                    tracing::warn!("a finished sequence's last events were lost in a restart");
                }
            } else if started {
                owed.push(active.output);
            } else {
                jobs.push(Job {
                    prompt: active.prompt,
                    sampler: active.sampler,
                    output: active.output,
                });
            }
        }
        (owed, jobs)
    }

    fn admit_queued(&mut self) {
        while self.commands_open && self.slots.iter().any(|s| s.active.is_none()) {
            match self.commands.try_recv() {
                Ok(job) => self.admit(job),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => self.commands_open = false,
            }
        }
    }

    /// Reusable prefix of `slot` for `prompt`: at least one prompt token must still be decoded
    /// so the new sequence gets fresh logits.
    fn reusable_prefix(&self, slot: &Slot, prompt: &[LlamaToken]) -> usize {
        if self
            .sliding_window_tokens
            .is_some_and(|window| slot.kv_tokens.len() > window)
        {
            return 0;
        }
        let common = slot
            .kv_tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let common = common.min(prompt.len().saturating_sub(1));
        if common >= self.prefix_reuse_tokens_min {
            common
        } else {
            0
        }
    }

    fn choose_slot(&self, prompt: &[LlamaToken]) -> Option<(usize, usize)> {
        let free = || {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.active.is_none())
        };
        let best_reuse = free()
            .map(|(index, slot)| (index, self.reusable_prefix(slot, prompt)))
            .max_by_key(|(index, reuse)| (*reuse, std::cmp::Reverse(*index)));
        if let Some((index, reuse)) = best_reuse
            && reuse > 0
        {
            return Some((index, reuse));
        }
        // No reuse: an empty slot (lowest id keeps batches in few ubatches), else the slot idle
        // for longest, whose cached prefix is the least likely to be asked for again.
        free()
            .min_by_key(|(index, slot)| (!slot.kv_tokens.is_empty(), slot.idle_since, *index))
            .map(|(index, _)| (index, 0))
    }

    fn admit(&mut self, job: Job) {
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        if job.output.is_closed() {
            return;
        }
        let Some((index, reuse)) = self.choose_slot(&job.prompt) else {
            // `admit` is only called with a free slot.
            job.output.fail(EngineError::ShutDown);
            return;
        };
        let steps = self.steps;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let seq = u32::try_from(slot.seq_id).ok();
        let mut reused = reuse;
        if reused > 0 {
            let pos = u32::try_from(reused).ok();
            let removed = self.ctx.clear_kv_cache_seq(seq, pos, None).unwrap_or(false);
            let pos_max = self.ctx.kv_cache_seq_pos_max(slot.seq_id);
            if !removed || usize::try_from(pos_max + 1).ok() != Some(reused) {
                reused = 0;
            }
        }
        if reused == 0 && self.ctx.clear_kv_cache_seq(seq, None, None).is_err() {
            tracing::error!(seq = slot.seq_id, "could not clear a sequence's KV");
        }
        slot.kv_tokens.truncate(reused);
        let mut output = job.output;
        output.set_cached_prompt_tokens(TokenCount::try_from(reused).unwrap_or(0));
        output.mark_prefill_started();
        slot.active = Some(Active {
            prompt: job.prompt,
            prefilled: reused,
            sampler: job.sampler,
            output,
            next_token: None,
            admitted: steps,
            step_tokens: 0,
            logits_row: None,
        });
        self.stats.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Decides how many tokens each sequence feeds this step: one per generating sequence first
    /// (inter-token latency), then prompt chunks first-come-first-served with what is left.
    fn plan_step(&mut self) {
        let mut budget = self.batch_tokens_max;
        let mut prefilling: Vec<(u64, usize)> = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            active.step_tokens = 0;
            active.logits_row = None;
            if active.output.is_finished() {
                continue;
            }
            if active.output.deliver() != Delivery::Drained {
                continue;
            }
            if active.next_token.is_some() {
                active.step_tokens = 1;
                budget = budget.saturating_sub(1);
            } else if active.prefilled < active.prompt.len() {
                prefilling.push((active.admitted, index));
            }
        }
        prefilling.sort_unstable();
        for (_, index) in prefilling {
            if budget == 0 {
                break;
            }
            let Some(active) = self.slots.get_mut(index).and_then(|s| s.active.as_mut()) else {
                continue;
            };
            let chunk = (active.prompt.len() - active.prefilled).min(budget);
            active.step_tokens = chunk;
            budget -= chunk;
        }
    }

    /// Fills the batch in slot order, so consecutive sequence ids land in one ubatch.
    fn fill_batch(&mut self) -> Result<(), llama_cpp_2::llama_batch::BatchAddError> {
        self.batch.clear();
        for slot in &mut self.slots {
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            if active.step_tokens == 0 {
                continue;
            }
            let seq = [slot.seq_id];
            if let Some(token) = active.next_token.take() {
                let pos = i32::try_from(slot.kv_tokens.len()).unwrap_or(i32::MAX);
                active.logits_row = Some(self.batch.n_tokens());
                self.batch.add(token, pos, &seq, true)?;
                slot.kv_tokens.push(token);
                continue;
            }
            let end = active.prefilled + active.step_tokens;
            let completes = end == active.prompt.len();
            for index in active.prefilled..end {
                let Some(&token) = active.prompt.get(index) else {
                    break;
                };
                let pos = i32::try_from(slot.kv_tokens.len()).unwrap_or(i32::MAX);
                let last = completes && index + 1 == end;
                if last {
                    active.logits_row = Some(self.batch.n_tokens());
                }
                self.batch.add(token, pos, &seq, last)?;
                slot.kv_tokens.push(token);
            }
            active.prefilled = end;
        }
        Ok(())
    }

    /// One engine step. Returns false when there was nothing to decode.
    fn step(&mut self) -> bool {
        self.watch.heartbeat.beat();
        self.watch.fault_point();
        self.steps += 1;
        self.plan_step();
        if let Err(error) = self.fill_batch() {
            tracing::error!(%error, "batch overflow: planning exceeded batch_tokens_max");
            self.fail_stepped(&EngineError::Decode { code: -1 });
            return true;
        }
        let decoded = self.batch.n_tokens() > 0;
        if decoded {
            if let Err(error) = self.ctx.decode(&mut self.batch) {
                let code = decode_error_code(&error);
                tracing::error!(code, "llama_decode failed");
                self.fail_stepped(&EngineError::Decode { code });
                return true;
            }
            self.sample_all();
        }
        self.release_finished();
        decoded
    }

    fn sample_all(&mut self) {
        for slot in &mut self.slots {
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            let Some(row) = active.logits_row.take() else {
                continue;
            };
            let token = active.sampler.sample(&self.ctx, row);
            if self.vocab.is_eog(token) {
                active.output.on_end_of_generation();
            } else {
                self.piece.clear();
                self.vocab
                    .token_to_piece_into(token, &mut self.piece, false, None);
                if active.output.on_token(&self.piece) {
                    active.next_token = Some(token);
                }
            }
            if active.output.deliver() == Delivery::Closed {
                active.next_token = None;
            }
        }
    }

    /// Frees slots whose request finished and was told so, or whose client went away.
    fn release_finished(&mut self) {
        let steps = self.steps;
        for slot in &mut self.slots {
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            let closed = active.output.is_closed();
            if active.output.is_finished() && !active.output.is_done_sent() && !closed {
                // Flush Done for sequences held on their last events.
                if active.output.deliver() == Delivery::Held {
                    continue;
                }
            }
            let done = active.output.is_done_sent();
            if !done && !closed {
                continue;
            }
            if closed && !done {
                // Cancelled mid-generation: its KV is of no use to anyone.
                let seq = u32::try_from(slot.seq_id).ok();
                if self.ctx.clear_kv_cache_seq(seq, None, None).is_err() {
                    tracing::error!(seq = slot.seq_id, "could not clear a cancelled sequence");
                }
                slot.kv_tokens.clear();
            }
            slot.active = None;
            slot.idle_since = steps;
            self.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A decode failed: every sequence in the batch lost its KV state, so fail and free them.
    fn fail_stepped(&mut self, error: &EngineError) {
        for slot in &mut self.slots {
            let stepped = slot.active.as_ref().is_some_and(|a| a.step_tokens > 0);
            if !stepped {
                continue;
            }
            if let Some(active) = slot.active.take() {
                active.output.fail(error.clone());
                self.stats.active.fetch_sub(1, Ordering::Relaxed);
            }
            let seq = u32::try_from(slot.seq_id).ok();
            if self.ctx.clear_kv_cache_seq(seq, None, None).is_err() {
                tracing::error!(seq = slot.seq_id, "could not clear a failed sequence");
            }
            slot.kv_tokens.clear();
        }
    }
}
