//! Many llama.cpp models on one owning thread, driven one action at a time — load, evict, save
//! or restore one sequence's KV, prefill a group of prompts, run N decode steps of a batch — by a
//! scheduler outside this crate (`tidepool-runtime` feeds it the actions of a `tidepool-pool`
//! `Pool`). This is the engine half of the model pool; it decides nothing.
//!
//! A model has two halves:
//! * [`ModelFrontEnd`] (`Send + Sync`): a *vocabulary-only* llama.cpp model (no weights, a few MB)
//!   for tokenizing, chat templates and building samplers, so a request is validated, counted and
//!   prepared while the model's weights are cold.
//! * [`Accelerator`] (not `Send`: create it on the thread that drives it): the weights and one
//!   context per resident model, and every sequence's generation state (prompt, sampler, emitted
//!   text, KV location). A sequence's sampler and output live here, not in the context, so a
//!   saved and restored sequence continues exactly where it stopped.
//!
//! Sequence state leaves the context with `llama_state_seq_get` and comes back with
//! `llama_state_seq_set` into whichever slot is free (cross-slot restore is supported). For a
//! model with sliding-window attention a sequence longer than the window cannot be restored that
//! way (llama.cpp #25295): it is saved as its tokens and *recomputed* on restore.
//!
//! The engine never blocks on a client: text that does not fit a full client channel is merged
//! into the next chunk (bounded by `max_tokens`), and a finished sequence whose `Done` could not
//! be sent waits in a drain list that [`Accelerator::flush`] retries.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{LlamaStateSeqFlags, SeqState};
use tidepool_core::ModelId;
use tokio::sync::mpsc;

use crate::llama::{
    backend, build_sampler, check_context_shape, context_params, decode_error_code, render_chat,
    sliding_window_tokens, tokenize_checked,
};
use crate::output::{Delivery, SeqOutput};
use crate::params::validate_request;
pub use crate::prefix::PrefixHints;
use crate::prefix::{PrefixCache, best_donor, common_prefix, fits_window};
use crate::{
    ChatMessage, EngineError, GenerateRequest, Generation, RequestClass, TokenCount, TokenId,
};

/// Default [`MultiModelConfig::prefix_cache_tokens_max`].
pub const PREFIX_CACHE_TOKENS_MAX_DEFAULT: TokenCount = 16_384;
/// Default [`MultiModelConfig::prefix_reuse_tokens_min`] (as the per-model engine's).
pub const PREFIX_REUSE_TOKENS_MIN_DEFAULT: TokenCount = 16;

/// How to run one model on an [`Accelerator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiModelConfig {
    pub model_id: ModelId,
    /// The GGUF file. Several model ids may share a file: each is its own instance.
    pub path: PathBuf,
    /// Longest prompt + completion of one sequence, in tokens.
    pub context_tokens: TokenCount,
    /// Sequences the model's context holds at once (slots).
    pub seqs_max: u32,
    /// Threads for decode and prompt processing; 0 means every available core.
    pub threads: u32,
    /// Tokens in one `llama_decode`; at least `seqs_max`.
    pub batch_tokens_max: u32,
    /// Events buffered per request channel.
    pub chunks_buffered_max: u32,
    /// Prompt-prefix cache: tokens whose KV the model's idle slots keep for reuse by a later
    /// prompt with the same prefix, summed over the model's slots; past it the least recently
    /// used idle slot is cleared. 0 turns reuse off, copies between slots included. The KV lives
    /// in the model's context, whose
    /// cells are allocated (and counted by the pool) when it loads, so this costs no memory.
    pub prefix_cache_tokens_max: TokenCount,
    /// Shortest shared prefix, in tokens, worth reusing from an idle slot (or, for a copy from
    /// another slot, worth copying beyond what the prompt's own slot holds).
    pub prefix_reuse_tokens_min: TokenCount,
}

impl MultiModelConfig {
    pub fn new(model_id: ModelId, path: impl Into<PathBuf>) -> Self {
        Self {
            model_id,
            path: path.into(),
            context_tokens: 2048,
            seqs_max: 8,
            threads: 0,
            batch_tokens_max: 512,
            chunks_buffered_max: 64,
            prefix_cache_tokens_max: PREFIX_CACHE_TOKENS_MAX_DEFAULT,
            prefix_reuse_tokens_min: PREFIX_REUSE_TOKENS_MIN_DEFAULT,
        }
    }

    fn check(&self) -> Result<(), EngineError> {
        // A pooled sequence needs room for its prompt and at least one generated token.
        check_context_shape(
            &self.path,
            self.context_tokens,
            2,
            self.seqs_max,
            self.batch_tokens_max,
        )?;
        if self.chunks_buffered_max == 0 {
            return Err(EngineError::Load {
                path: self.path.clone(),
                reason: "chunks_buffered_max must be at least 1".to_owned(),
            });
        }
        Ok(())
    }

    fn context_params(&self) -> LlamaContextParams {
        context_params(
            self.context_tokens,
            self.seqs_max,
            self.threads,
            self.batch_tokens_max,
        )
    }

    fn batch_tokens(&self) -> usize {
        usize::try_from(self.batch_tokens_max).unwrap_or(1)
    }

    /// [`Self::prefix_reuse_tokens_min`], at least one.
    fn prefix_reuse_tokens(&self) -> usize {
        usize::try_from(self.prefix_reuse_tokens_min)
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// The thread-safe half of a pooled model: tokenizer, chat template and request preparation from
/// a vocabulary-only load of the GGUF (the weights stay on disk until the pool loads them).
pub struct ModelFrontEnd {
    config: MultiModelConfig,
    vocab: LlamaModel,
    chat_template: Option<LlamaChatTemplate>,
    vocab_tokens: TokenId,
}

impl std::fmt::Debug for ModelFrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFrontEnd")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ModelFrontEnd {
    /// Reads the vocabulary and metadata of the GGUF (no weights).
    pub fn open(config: MultiModelConfig) -> Result<Self, EngineError> {
        config.check()?;
        let backend = backend()?;
        if !config.path.is_file() {
            return Err(EngineError::Load {
                path: config.path.clone(),
                reason: "no such file".to_owned(),
            });
        }
        let params = LlamaModelParams::default().with_vocab_only(true);
        let vocab = LlamaModel::load_from_file(backend, &config.path, &params).map_err(|e| {
            EngineError::Load {
                path: config.path.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            chat_template: vocab.chat_template(None).ok(),
            vocab_tokens: vocab.n_vocab(),
            vocab,
            config,
        })
    }

    pub fn config(&self) -> &MultiModelConfig {
        &self.config
    }

    pub fn model_id(&self) -> &ModelId {
        &self.config.model_id
    }

    pub fn context_tokens(&self) -> TokenCount {
        self.config.context_tokens
    }

    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        render_chat(
            &self.vocab,
            self.chat_template.as_ref(),
            &self.config.model_id,
            messages,
        )
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<TokenId>, EngineError> {
        tokenize_checked(&self.vocab, text)
    }

    /// Empty [`PrefixHints`] for this model: its last `2 × seqs_max` prompts (as many as its
    /// slots hold and a queue as long again), none when prefix reuse is off.
    pub fn prefix_hints(&self) -> PrefixHints {
        let prompts = if self.config.prefix_cache_tokens_max > 0 {
            usize::try_from(self.config.seqs_max)
                .unwrap_or(1)
                .saturating_mul(2)
        } else {
            0
        };
        PrefixHints::new(
            prompts,
            self.config.prefix_reuse_tokens(),
            sliding_window_tokens(&self.vocab),
        )
    }

    /// Validates a request against the model and builds its sampler and output channel. The
    /// returned [`PreparedSeq`] goes to the accelerator thread; dropping it instead (admission
    /// refused) closes the [`Generation`] without an event.
    pub fn prepare(
        &self,
        request: GenerateRequest,
    ) -> Result<(PreparedSeq, Generation), EngineError> {
        let prompt_tokens =
            validate_request(&request, self.vocab_tokens, self.config.context_tokens)?;
        let sampler = build_sampler(&self.vocab, &request.params, request.request_id);
        let buffered = usize::try_from(self.config.chunks_buffered_max).unwrap_or(1);
        let (tx, events) = mpsc::channel(buffered);
        let max_tokens = request.params.max_tokens;
        let class = request.class;
        let output = SeqOutput::new(tx, request.params.stop, max_tokens, prompt_tokens);
        let prompt = request.prompt.into_iter().map(LlamaToken).collect();
        let prefill_started = output.prefill_clock();
        Ok((
            PreparedSeq {
                prompt,
                sampler,
                output,
                prompt_tokens,
                max_tokens,
                class,
            },
            Generation {
                events,
                prefill_started,
            },
        ))
    }
}

/// A validated request on its way to the accelerator thread.
pub struct PreparedSeq {
    prompt: Vec<LlamaToken>,
    sampler: LlamaSampler,
    output: SeqOutput,
    prompt_tokens: TokenCount,
    max_tokens: TokenCount,
    class: RequestClass,
}

impl std::fmt::Debug for PreparedSeq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedSeq")
            .field("prompt_tokens", &self.prompt_tokens)
            .field("max_tokens", &self.max_tokens)
            .field("class", &self.class)
            .finish_non_exhaustive()
    }
}

impl PreparedSeq {
    pub fn prompt_tokens(&self) -> TokenCount {
        self.prompt_tokens
    }

    pub fn max_tokens(&self) -> TokenCount {
        self.max_tokens
    }

    /// The prompt tokens `hints` expects the engine to hold already (records the prompt there).
    pub fn expected_cached_tokens(&self, hints: &mut PrefixHints) -> TokenCount {
        TokenCount::try_from(hints.expect(&self.prompt)).unwrap_or(0)
    }

    /// Online or batch: a batch sequence has no token deadlines and is preempted by dropping
    /// its cells (recomputed on resume), see [`Accelerator::save`].
    pub fn class(&self) -> RequestClass {
        self.class
    }
}

impl PreparedSeq {
    /// Ends the request with `error` instead of running it (best effort: a full or closed
    /// channel cannot take it).
    pub fn fail(self, error: EngineError) {
        self.output.fail(error);
    }
}

/// What an accelerator that stopped abnormally leaves behind ([`Accelerator::salvage`]): the
/// requests that had not started, which can run again from scratch, and the last events still
/// owed to clients (a started request's failure, a finished one's `Done`).
#[derive(Debug, Default)]
pub struct Salvage {
    /// Registered requests with no KV and no token yet, in sequence-id order.
    pub unstarted: Vec<SalvagedSeq>,
    owed: Vec<Owed>,
    /// Started requests that end with the failure.
    pub failed: u32,
}

/// A request that had not started when its accelerator stopped.
#[derive(Debug)]
pub struct SalvagedSeq {
    pub seq: u64,
    pub model: usize,
    pub prepared: PreparedSeq,
    pub deadlines: Option<TokenDeadlines>,
}

#[derive(Debug)]
struct Owed {
    output: SeqOutput,
    /// `None`: the sequence finished; its `Done` (and held text) is owed.
    failure: Option<EngineError>,
}

impl Salvage {
    /// Delivers what fits in the clients' channels; `true` once nothing is owed any more (a
    /// client that left is owed nothing).
    pub fn flush(&mut self) -> bool {
        self.owed.retain_mut(|owed| match &owed.failure {
            Some(error) => !owed.output.try_fail(error),
            None => owed.output.deliver() == Delivery::Held,
        });
        self.owed.is_empty()
    }

    /// Takes over what `other` still owes (its unstarted requests and counts too).
    pub fn merge(&mut self, mut other: Salvage) {
        self.unstarted.append(&mut other.unstarted);
        self.owed.append(&mut other.owed);
        self.failed += other.failed;
    }

    /// Clients still owed a last event.
    pub fn owed_len(&self) -> usize {
        self.owed.len()
    }
}

/// When each token of a sequence is due: token `k` (0-based) is on time if emitted by
/// `arrived + ttft + k · tbt` (the token-deadline SLO of `docs/pool.md`).
#[derive(Debug, Clone, Copy)]
pub struct TokenDeadlines {
    pub arrived: Instant,
    pub ttft: Duration,
    pub tbt: Duration,
}

/// A sequence that left the accelerator during an action (finished, failed or its client left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishedSeq {
    pub seq: u64,
    /// Completion tokens generated in total.
    pub tokens_emitted: u32,
    /// Of those, emitted by their deadline.
    pub tokens_on_time: u32,
    /// The request's class: batch tokens count apart from online attainment.
    pub class: RequestClass,
}

/// What a prefill or decode action did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Decode steps run (1 for a prefill); every listed sequence not in `finished` emitted
    /// exactly this many tokens.
    pub steps: u32,
    pub finished: Vec<FinishedSeq>,
}

/// What [`Accelerator::calibrate`] measured for one model on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    /// Bytes of the loaded weights (`llama_model_size`).
    pub weights_bytes: u64,
    /// KV bytes of one token of one sequence (slope of the saved state size).
    pub kv_bytes_per_token: u64,
    /// Saved-state bytes of a sequence besides its tokens.
    pub kv_state_header_bytes: u64,
    /// Bytes a resident context costs besides the weights: `ctx_kv_bytes + ctx_extra_bytes`.
    pub ctx_bytes: u64,
    /// KV cells of every slot plus the logits buffer (computed from the KV slope).
    pub ctx_kv_bytes: u64,
    /// What a resident model adds to the process's resident memory beyond `weights_bytes +
    /// ctx_kv_bytes`, measured (see [`MemoryProbe`]): the compute buffers' touched pages, the
    /// file pages of weights that were also repacked into the CPU's layout, allocator rounding.
    pub ctx_extra_bytes: u64,
    /// Resident memory the load, the context and the calibration's steps added, peak.
    pub memory: MemoryProbe,
    /// The phases of a switch, measured on this model.
    pub phases: CalibratedPhases,
    /// Weights in plus context creation (`phases.weights_ns + phases.context_ns`).
    pub load_ns: u64,
    /// Context and weights freed.
    pub unload_ns: u64,
    /// Prefill time per prompt token (a 128-token prompt).
    pub prefill_ns_per_token: u64,
    /// One decode step of `decode_batch` sequences.
    pub decode_step_ns: u64,
    pub decode_batch: u32,
    /// Saving plus restoring one byte of sequence state, in picoseconds.
    pub kv_transfer_ps_per_byte: u64,
}

/// Resident memory (the process's `VmRSS`) a model added during calibration, in bytes, each
/// relative to the process before the load. Read from `/proc/self/status`; all zero where that
/// is unavailable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryProbe {
    /// After `llama_model_load_from_file`: mapped and read weights, repacked copies.
    pub after_weights_bytes: u64,
    /// After `llama_init_from_model`: plus the KV cells (cleared, so touched) and buffers.
    pub after_context_bytes: u64,
    /// Peak from the load to the end of the calibration's steps (a full `batch_tokens_max`
    /// prefill among them; the kernel's `VmHWM` where it can be reset, else sampled): plus the
    /// compute buffers' pages those steps touched and whatever the load held only for a while.
    pub after_steps_bytes: u64,
    /// After the model was freed again: what the allocator kept.
    pub after_unload_bytes: u64,
}

/// The phases of one switch as calibration measured them, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CalibratedPhases {
    /// `llama_model_load_from_file` (map and read the GGUF, repack weights).
    pub weights_ns: u64,
    /// Of `weights_ns`: the repack of weights into the CPU's preferred layout (the same load with
    /// every tensor forced to the plain CPU buffer type, subtracted; 0 if that was not slower).
    pub repack_ns: u64,
    /// `llama_init_from_model` (KV allocation and clearing, compute-buffer reservation).
    pub context_ns: u64,
    /// What the first step on a fresh context takes beyond the same step warm (a 64-token prompt).
    pub first_step_ns: u64,
    /// Freeing context and weights.
    pub evict_ns: u64,
    /// `llama_state_seq_get` + clear of a 128-token sequence (`kv_state_bytes`).
    pub kv_save_ns: u64,
    /// `llama_state_seq_set` of the same state.
    pub kv_restore_ns: u64,
    pub kv_state_bytes: u64,
}

/// Phase times of one load on the accelerator, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadPhases {
    /// `llama_model_load_from_file`.
    pub weights_ns: u64,
    /// `llama_init_from_model`.
    pub context_ns: u64,
}

/// The first `llama_decode` on a model's context after its load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FirstStep {
    pub ns: u64,
    /// Tokens in that batch.
    pub tokens: u32,
}

/// Times the first decode after a load, once.
#[derive(Debug, Default)]
struct FirstStepWatch {
    armed: bool,
    measured: Option<FirstStep>,
}

impl FirstStepWatch {
    fn decode(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        batch: &mut LlamaBatch<'_>,
    ) -> Result<(), llama_cpp_2::DecodeError> {
        if !self.armed {
            return ctx.decode(batch);
        }
        let tokens = u32::try_from(batch.n_tokens()).unwrap_or(0);
        let started = Instant::now();
        let decoded = ctx.decode(batch);
        self.armed = false;
        self.measured = Some(FirstStep {
            ns: elapsed_ns(started),
            tokens,
        });
        decoded
    }
}

type Ctx<'a> = LlamaContext<'a>;

self_cell::self_cell!(
    /// Weights and the context that borrows them, freed together (context first).
    struct LoadedModel {
        owner: LlamaModel,
        #[not_covariant]
        dependent: Ctx,
    }
);

struct ModelSlotState {
    config: MultiModelConfig,
    loaded: Option<LoadedModel>,
    /// Why the last load failed; the pool believes the model resident, so its sequences fail.
    broken: Option<EngineError>,
    free_slots: BTreeSet<i32>,
    /// Free slots whose KV still holds a finished sequence's tokens (positions `0..len`), for
    /// prefix reuse; every key is in `free_slots`. See [`PrefixCache`].
    cache: PrefixCache,
    /// Sliding-window size of the loaded model (reuse stays inside it).
    window_tokens: Option<usize>,
    batch: Option<LlamaBatch<'static>>,
    first_step: FirstStepWatch,
}

enum Saved {
    /// `llama_state_seq_get` bytes.
    State(SeqState),
    /// Too long for a sliding-window model's state: recompute from `kv_tokens`.
    Recompute,
}

struct Seq {
    model: usize,
    prompt: Vec<LlamaToken>,
    sampler: LlamaSampler,
    output: SeqOutput,
    /// Tokens whose KV this sequence holds (in a slot or a saved state), positions `0..len`.
    kv_tokens: Vec<LlamaToken>,
    /// Sampled, not yet decoded.
    next_token: Option<LlamaToken>,
    slot: Option<i32>,
    saved: Option<Saved>,
    /// The sequence ended (finished, failed or its client left) but the scheduler has not been
    /// told yet; the next action that lists it reports it.
    ended: bool,
    cancel_reported: bool,
    deadlines: Option<TokenDeadlines>,
    tokens_on_time: u32,
    class: RequestClass,
}

impl ModelSlotState {
    /// Takes a free slot for a sequence whose prompt is `prompt` (empty: a restore), and the
    /// prefix of the prompt whose KV the slot already holds (`0`: none). The slot leaves the
    /// prefix cache; its KV past the prefix is the caller's to clear ([`keep_prefix`]).
    fn take_slot(&mut self, prompt: &[LlamaToken]) -> Option<(i32, usize)> {
        let min = self.config.prefix_reuse_tokens();
        let (slot, reuse) = if let Some(hit) = self.cache.best_match(prompt, min) {
            hit
        } else {
            // An empty slot (the lowest: few micro-batches), else the least recently used.
            let empty = self
                .free_slots
                .iter()
                .copied()
                .find(|s| !self.cache.holds(*s));
            (empty.or_else(|| self.cache.least_recent())?, 0)
        };
        let taken = self.free_slots.remove(&slot);
        assert!(taken, "a cached slot is a free slot");
        self.cache.forget(slot);
        Some((slot, reuse))
    }
}

/// Whether one of `fed` (members whose prompt tokens are in the batch being built) will hold,
/// once it is decoded, at least `min_gain` more tokens of `seq`'s prompt than `seq` holds now,
/// inside the model's sliding `window` if it has one; never when prefix reuse is not `on`.
fn prefix_in_flight(
    seqs: &BTreeMap<u64, Seq>,
    fed: &[Member],
    seq: u64,
    (on, min_gain, window): (bool, usize, Option<usize>),
) -> bool {
    let Some(waiting) = seqs.get(&seq).filter(|_| on) else {
        return false;
    };
    let holders = fed
        .iter()
        .filter_map(|m| seqs.get(&m.seq).map(|s| (m.slot, s.kv_tokens.as_slice())))
        .filter(|(_, tokens)| fits_window(window, tokens.len()));
    best_donor(&waiting.prompt, waiting.kv_tokens.len(), holders, min_gain).is_some()
}

impl Seq {
    /// The prompt but its last token, which is always decoded in a batch of last tokens.
    fn prompt_body(&self) -> &[LlamaToken] {
        self.prompt
            .get(..self.prompt.len().saturating_sub(1))
            .unwrap_or(&[])
    }

    fn report(&self, seq: u64) -> FinishedSeq {
        FinishedSeq {
            seq,
            tokens_emitted: self.output.completion_tokens(),
            tokens_on_time: self.tokens_on_time,
            class: self.class,
        }
    }
}

/// The models and sequences of one accelerator. Create it on the thread that drives it.
pub struct Accelerator {
    models: Vec<ModelSlotState>,
    seqs: BTreeMap<u64, Seq>,
    /// Finished sequences whose last events did not fit their client channel yet.
    draining: Vec<SeqOutput>,
    piece: Vec<u8>,
}

/// What a pool scheduling this engine may assume of it: the engine half of
/// `tidepool_pool::PoolConfig` (the runtime copies it there; never hard-coded elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Loads, evictions and KV saves/restores run beside compute (a GPU copy engine).
    pub overlap_transfers: bool,
    /// KV is paged from one pool shared by the resident models (charged per sequence).
    pub kv_paged: bool,
    /// Saved sequence states live in the same memory as weights and contexts.
    pub saved_kv_in_memory_budget: bool,
}

impl Accelerator {
    /// CPU llama.cpp: transfers do not overlap compute (loading and decoding compete for the
    /// same cores, so one action runs at a time), each context's KV is allocated up front when
    /// the model loads (not paged), and saved states are host RAM, the same memory as the
    /// models.
    pub const CAPABILITIES: Capabilities = Capabilities {
        overlap_transfers: false,
        kv_paged: false,
        saved_kv_in_memory_budget: true,
    };
}

impl std::fmt::Debug for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accelerator")
            .field("models", &self.models.len())
            .field("seqs", &self.seqs.len())
            .finish_non_exhaustive()
    }
}

/// Sequence ids a decode or prefill batch is built from, with their slots.
struct Member {
    seq: u64,
    slot: i32,
}

impl Accelerator {
    /// Models are addressed by their index in `configs`; nothing is loaded yet.
    pub fn new(configs: Vec<MultiModelConfig>) -> Result<Self, EngineError> {
        for config in &configs {
            config.check()?;
        }
        Ok(Self {
            models: configs
                .into_iter()
                .map(|config| ModelSlotState {
                    config,
                    loaded: None,
                    broken: None,
                    free_slots: BTreeSet::new(),
                    cache: PrefixCache::default(),
                    window_tokens: None,
                    batch: None,
                    first_step: FirstStepWatch::default(),
                })
                .collect(),
            seqs: BTreeMap::new(),
            draining: Vec::new(),
            piece: Vec::with_capacity(64),
        })
    }

    pub fn is_loaded(&self, model: usize) -> bool {
        self.models.get(model).is_some_and(|m| m.loaded.is_some())
    }

    /// Sequences known to the accelerator (registered and not yet released or finished).
    pub fn seqs_len(&self) -> usize {
        self.seqs.len()
    }

    /// Empties the accelerator after its thread stopped abnormally (a panic): requests that
    /// had not started come back to run again; started ones end with `error` (what they
    /// delivered stands); finished ones keep their owed `Done`. Loaded models are left for the
    /// caller to drop with the accelerator.
    pub fn salvage(&mut self, error: &EngineError) -> Salvage {
        let mut salvage = Salvage::default();
        for (id, seq) in std::mem::take(&mut self.seqs) {
            let started = seq.slot.is_some()
                || seq.saved.is_some()
                || !seq.kv_tokens.is_empty()
                || seq.next_token.is_some()
                || seq.output.completion_tokens() > 0;
            if seq.output.is_finished() {
                salvage.owed.push(Owed {
                    output: seq.output,
                    failure: None,
                });
            } else if seq.ended || seq.output.is_closed() {
                // Already told (failed) or gone.
            } else if started {
                salvage.failed += 1;
                salvage.owed.push(Owed {
                    output: seq.output,
                    failure: Some(error.clone()),
                });
            } else {
                let prompt_tokens = seq.output.prompt_tokens();
                let max_tokens = seq.output.max_tokens();
                salvage.unstarted.push(SalvagedSeq {
                    seq: id,
                    model: seq.model,
                    prepared: PreparedSeq {
                        prompt: seq.prompt,
                        sampler: seq.sampler,
                        output: seq.output,
                        prompt_tokens,
                        max_tokens,
                        class: seq.class,
                    },
                    deadlines: seq.deadlines,
                });
            }
        }
        for output in std::mem::take(&mut self.draining) {
            salvage.owed.push(Owed {
                output,
                failure: None,
            });
        }
        salvage
    }

    /// Hands a prepared request to the accelerator; it runs when the scheduler says so.
    pub fn register(
        &mut self,
        seq: u64,
        model: usize,
        prepared: PreparedSeq,
        deadlines: Option<TokenDeadlines>,
    ) {
        let PreparedSeq {
            prompt,
            sampler,
            output,
            class,
            ..
        } = prepared;
        let previous = self.seqs.insert(
            seq,
            Seq {
                model,
                prompt,
                sampler,
                output,
                kv_tokens: Vec::new(),
                next_token: None,
                slot: None,
                saved: None,
                ended: false,
                cancel_reported: false,
                deadlines,
                tokens_on_time: 0,
                class,
            },
        );
        assert!(previous.is_none(), "sequence ids are unique");
    }

    /// Loads weights and creates the context; returns how long each took. On failure the model
    /// is marked broken: the scheduler still counts it resident, and its sequences fail at their
    /// next action.
    pub fn load(&mut self, model: usize) -> Result<LoadPhases, EngineError> {
        let Some(state) = self.models.get_mut(model) else {
            return Err(unknown_model(model));
        };
        if state.loaded.is_some() {
            return Ok(LoadPhases::default());
        }
        match load_with_context(&state.config, Repack::Allowed) {
            Ok((loaded, phases)) => {
                state.loaded = Some(loaded);
                state.broken = None;
                state.free_slots = (0..state.config.seqs_max)
                    .filter_map(|s| i32::try_from(s).ok())
                    .collect();
                state.cache = PrefixCache::default();
                state.window_tokens = state
                    .loaded
                    .as_ref()
                    .and_then(|l| sliding_window_tokens(l.borrow_owner()));
                state.batch = Some(LlamaBatch::new(state.config.batch_tokens(), 1));
                state.first_step = FirstStepWatch {
                    armed: true,
                    measured: None,
                };
                Ok(phases)
            }
            Err(error) => {
                tracing::error!(model = %state.config.model_id, %error, "model load failed");
                state.broken = Some(error.clone());
                Err(error)
            }
        }
    }

    /// The first `llama_decode` on `model`'s context since its last load, once it ran (each
    /// measurement is returned once).
    pub fn take_first_step(&mut self, model: usize) -> Option<FirstStep> {
        self.models
            .get_mut(model)
            .and_then(|m| m.first_step.measured.take())
    }

    /// Frees the context and the weights. Sequences of the model still in its context (the
    /// scheduler never evicts such a model) lose their KV and fail.
    pub fn evict(&mut self, model: usize) {
        for (id, seq) in &mut self.seqs {
            if seq.model == model && seq.slot.take().is_some() {
                tracing::error!(seq = id, "evicted a model with a sequence in its context");
                seq.output.fail(EngineError::Decode { code: -2 });
                seq.ended = true;
            }
        }
        if let Some(state) = self.models.get_mut(model) {
            state.loaded = None;
            state.broken = None;
            state.free_slots.clear();
            state.cache = PrefixCache::default();
            state.window_tokens = None;
            state.batch = None;
            state.first_step = FirstStepWatch::default();
        }
    }

    /// Moves a sequence's KV out of its context slot; returns the bytes it now occupies. A
    /// batch sequence is preempted: its cells are dropped and only its tokens kept (4 bytes
    /// each), recomputed by [`Accelerator::restore`].
    pub fn save(&mut self, seq_id: u64) -> u64 {
        let Some(seq) = self.seqs.get_mut(&seq_id) else {
            return 0;
        };
        let Some(slot) = seq.slot.take() else {
            return 0;
        };
        let tokens = u64::try_from(seq.kv_tokens.len()).unwrap_or(u64::MAX);
        let Some(state) = self.models.get_mut(seq.model) else {
            return 0;
        };
        let window = state
            .loaded
            .as_ref()
            .and_then(|l| sliding_window_tokens(l.borrow_owner()));
        let beyond_window =
            !fits_window(window, seq.kv_tokens.len()) || seq.class == RequestClass::Batch;
        let mut saved = Saved::Recompute;
        if let Some(loaded) = state.loaded.as_mut() {
            loaded.with_dependent_mut(|_, ctx| {
                if !beyond_window {
                    match ctx.state_seq_get(slot, LlamaStateSeqFlags::empty()) {
                        Ok(state) => saved = Saved::State(state),
                        Err(error) => {
                            tracing::warn!(%error, "state_seq_get failed; will recompute");
                        }
                    }
                }
                clear_slot(ctx, slot);
            });
        }
        state.free_slots.insert(slot);
        let bytes = match &saved {
            Saved::State(state) => u64::try_from(state.byte_len()).unwrap_or(u64::MAX),
            Saved::Recompute => tokens.saturating_mul(4),
        };
        seq.saved = Some(saved);
        bytes
    }

    /// Brings a saved sequence back into a free slot of its (resident) model: its state bytes,
    /// or a recompute of its tokens when those cannot be restored.
    pub fn restore(&mut self, seq_id: u64) {
        let Some(seq) = self.seqs.get_mut(&seq_id) else {
            return;
        };
        let Some(saved) = seq.saved.take() else {
            return;
        };
        let Some(state) = self.models.get_mut(seq.model) else {
            return;
        };
        let capacity = state.config.batch_tokens();
        if state.loaded.is_none() || state.batch.is_none() {
            seq.output
                .fail(state.broken.clone().unwrap_or(EngineError::ShutDown));
            seq.ended = true;
            return;
        }
        let Some(slot) = state.take_slot(&[]).map(|(slot, _)| slot) else {
            tracing::error!(seq = seq_id, "restore with no free slot");
            seq.output.fail(EngineError::Decode { code: -3 });
            seq.ended = true;
            return;
        };
        let (Some(loaded), Some(batch)) = (state.loaded.as_mut(), state.batch.as_mut()) else {
            return;
        };
        let tokens = &seq.kv_tokens;
        let watch = &mut state.first_step;
        let restored = loaded.with_dependent_mut(|_, ctx| {
            clear_slot(ctx, slot);
            if let Saved::State(bytes) = &saved
                && ctx.state_seq_set(bytes, slot).is_ok()
                && usize::try_from(ctx.kv_cache_seq_pos_max(slot) + 1).ok() == Some(tokens.len())
            {
                return Ok(());
            }
            clear_slot(ctx, slot);
            recompute(ctx, batch, capacity, slot, tokens, watch)
        });
        seq.slot = Some(slot);
        if let Err(error) = restored {
            seq.output.fail(error);
            seq.ended = true;
        }
    }

    /// The class of a registered sequence (`None`: not registered or gone).
    pub fn seq_class(&self, seq_id: u64) -> Option<RequestClass> {
        self.seqs.get(&seq_id).map(|s| s.class)
    }

    /// Forgets a sequence (its client left): frees its slot or saved state.
    pub fn release(&mut self, seq_id: u64) {
        let Some(seq) = self.seqs.remove(&seq_id) else {
            return;
        };
        if let Some(slot) = seq.slot {
            self.free_slot(seq.model, slot);
        }
    }

    /// Prefills the prompts of `seqs` (each into a free slot of `model`) and samples each one's
    /// first token. `riders`, sequences of `model` already decoding, each put their next token
    /// into the first batch and sample one more, so they do not wait out the prefill.
    #[expect(
        clippy::too_many_lines,
        reason = "one pass: slot assignment, batched prompt feeding, first-token sampling"
    )]
    pub fn prefill(&mut self, model: usize, seqs: &[u64], riders: &[u64]) -> StepOutcome {
        let mut outcome = StepOutcome {
            steps: 1,
            finished: Vec::new(),
        };
        let live_riders = self.live_members(riders, &mut outcome);
        let mut riders_pending = !live_riders.is_empty();
        let mut members: Vec<Member> = Vec::with_capacity(seqs.len());
        for &id in seqs {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if seq.ended || seq.output.is_closed() {
                outcome.finished.push(self.finish(id));
                continue;
            }
            let Some(state) = self.models.get_mut(model) else {
                continue;
            };
            if state.loaded.is_none() {
                seq.output
                    .fail(state.broken.clone().unwrap_or(EngineError::ShutDown));
                outcome.finished.push(self.finish(id));
                continue;
            }
            let Some((slot, reuse)) = state.take_slot(&seq.prompt) else {
                tracing::error!(seq = id, "prefill with no free slot");
                seq.output.fail(EngineError::Decode { code: -3 });
                outcome.finished.push(self.finish(id));
                continue;
            };
            seq.slot = Some(slot);
            let mut reused = 0;
            if let Some(loaded) = state.loaded.as_mut() {
                reused = loaded.with_dependent_mut(|_, ctx| keep_prefix(ctx, slot, reuse));
            }
            seq.kv_tokens.clear();
            seq.kv_tokens
                .extend_from_slice(seq.prompt.get(..reused).unwrap_or(&[]));
            seq.output
                .set_cached_prompt_tokens(TokenCount::try_from(reused).unwrap_or(0));
            seq.output.mark_prefill_started();
            members.push(Member { seq: id, slot });
        }
        // Feed the prompts but their last tokens in batches of at most `batch_tokens_max`
        // tokens, first come first, each from the end of what its slot holds (a reused prefix,
        // or an earlier batch); then the last tokens together, with logits. The last token is
        // always computed in a batch of last tokens, with or without a reused prefix: llama.cpp's
        // CPU kernels do not give bit-identical rows for different batch shapes, and this keeps
        // greedy output the same with and without a cache hit.
        let mut cursor = 0;
        let mut tails_pending = !members.is_empty();
        // Members that have fed a token of their own (they no longer copy a prefix).
        let mut started = vec![false; members.len()];
        let (mut computed, mut decodes) = (0_usize, 0_u32);
        while cursor < members.len() || riders_pending || tails_pending {
            self.share_prefixes(model, &members, cursor, &started);
            let Some(state) = self.models.get_mut(model) else {
                break;
            };
            let limit = state.config.batch_tokens();
            let sharing = (
                state.config.prefix_cache_tokens_max > 0,
                state.config.prefix_reuse_tokens(),
                state.window_tokens,
            );
            let (Some(loaded), Some(batch)) = (state.loaded.as_mut(), state.batch.as_mut()) else {
                // Not loaded: the prompts failed above; riders cannot emit their token either.
                let error = state.broken.clone().unwrap_or(EngineError::ShutDown);
                for member in &live_riders {
                    if let Some(seq) = self.seqs.get_mut(&member.seq) {
                        seq.output.fail(error.clone());
                        seq.ended = true;
                    }
                }
                break;
            };
            batch.clear();
            let mut rows: Vec<(u64, i32)> = Vec::new();
            let mut add_failed = false;
            // Riders go first, one token each (`batch_tokens_max ≥ seqs_max` leaves room).
            if std::mem::take(&mut riders_pending) {
                add_failed = !add_next_tokens(&mut self.seqs, batch, &live_riders, &mut rows);
            }
            let mut body_added = false;
            let batch_start = cursor;
            while !add_failed
                && cursor < members.len()
                && usize::try_from(batch.n_tokens()).unwrap_or(0) < limit
            {
                let Some(member) = members.get(cursor) else {
                    break;
                };
                // A member whose prefix an earlier member of this batch is computing copies it
                // once the batch is decoded, instead of computing it too.
                let fed_here = members.get(batch_start..cursor).unwrap_or(&[]);
                if !started.get(cursor).copied().unwrap_or(true)
                    && body_added
                    && prefix_in_flight(&self.seqs, fed_here, member.seq, sharing)
                {
                    break;
                }
                if let Some(flag) = started.get_mut(cursor) {
                    *flag = true;
                }
                let Some(seq) = self.seqs.get_mut(&member.seq) else {
                    cursor += 1;
                    continue;
                };
                let offset = seq.kv_tokens.len();
                let body_len = seq.prompt_body().len();
                let room = limit - usize::try_from(batch.n_tokens()).unwrap_or(0);
                let end = (offset + room).min(body_len);
                for index in offset..end {
                    let Some(&token) = seq.prompt.get(index) else {
                        break;
                    };
                    let pos = i32::try_from(index).unwrap_or(i32::MAX);
                    if batch.add(token, pos, &[member.slot], false).is_err() {
                        add_failed = true;
                        break;
                    }
                    body_added = true;
                    seq.kv_tokens.push(token);
                }
                if end >= body_len {
                    cursor += 1;
                }
                if add_failed {
                    break;
                }
            }
            if !add_failed && tails_pending && cursor >= members.len() && !body_added {
                tails_pending = false;
                add_failed = !add_last_tokens(&mut self.seqs, batch, &members, &mut rows);
            }
            if !add_failed && batch.n_tokens() == 0 {
                continue;
            }
            computed += usize::try_from(batch.n_tokens()).unwrap_or(0);
            decodes += 1;
            let decoded = if add_failed {
                Err(EngineError::Decode { code: -1 })
            } else {
                let watch = &mut state.first_step;
                loaded.with_dependent_mut(|_, ctx| {
                    watch.decode(ctx, batch).map_err(|e| EngineError::Decode {
                        code: decode_error_code(&e),
                    })
                })
            };
            if let Err(error) = decoded {
                tracing::error!(%error, "prefill decode failed");
                for member in members.iter().chain(&live_riders) {
                    if let Some(seq) = self.seqs.get_mut(&member.seq) {
                        seq.output.fail(error.clone());
                        seq.ended = true;
                    }
                }
                break;
            }
            for (id, row) in rows {
                self.sample(model, id, row);
            }
        }
        tracing::debug!(
            members = members.len(),
            riders = live_riders.len(),
            computed_tokens = computed,
            decodes,
            "prefill batches"
        );
        for member in members.iter().chain(&live_riders) {
            let ended = self.seqs.get(&member.seq).is_some_and(|s| s.ended);
            if ended {
                outcome.finished.push(self.finish(member.seq));
            }
        }
        outcome
    }

    /// The sequences of `seqs` that can decode their next token (in a slot, not ended), in slot
    /// order; the others end here and are reported in `outcome`. Slot order matters: with a KV
    /// stream per sequence llama.cpp puts only runs of consecutive, increasing sequence ids in
    /// one micro-batch (`split_equal(…, sequential)`), so a batch in the scheduler's order (by
    /// request id) could run as up to one micro-batch per sequence, each a full pass over the
    /// weights (measured 2026-11-24: +45 % per step at batch 4; docs/bench/history.md).
    fn live_members(&mut self, seqs: &[u64], outcome: &mut StepOutcome) -> Vec<Member> {
        let mut live = Vec::with_capacity(seqs.len());
        for &id in seqs {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            match (seq.slot, seq.next_token) {
                (Some(slot), Some(_)) if !seq.ended && !seq.output.is_closed() => {
                    live.push(Member { seq: id, slot });
                }
                _ => {
                    if !seq.ended && !seq.output.is_closed() {
                        tracing::error!(seq = id, "decode of a sequence not in its context");
                        seq.output.fail(EngineError::Decode { code: -3 });
                    }
                    outcome.finished.push(self.finish(id));
                }
            }
        }
        live.sort_by_key(|m| m.slot);
        live
    }

    /// Runs up to `steps` decode steps of `seqs` (all in `model`'s context), one token each per
    /// step; a sequence that ends leaves the batch and is reported.
    pub fn decode(&mut self, model: usize, seqs: &[u64], steps: u32) -> StepOutcome {
        self.decode_until(model, seqs, steps, &mut || false)
    }

    /// [`Self::decode`], asking `stop` between steps (never before the first): `true` ends the
    /// turn early, and `StepOutcome::steps` says how many ran.
    pub fn decode_until(
        &mut self,
        model: usize,
        seqs: &[u64],
        steps: u32,
        stop: &mut dyn FnMut() -> bool,
    ) -> StepOutcome {
        let mut outcome = StepOutcome::default();
        let mut live = self.live_members(seqs, &mut outcome);
        while outcome.steps < steps && !live.is_empty() {
            if outcome.steps > 0 && stop() {
                break;
            }
            let Some(state) = self.models.get_mut(model) else {
                break;
            };
            let (Some(loaded), Some(batch)) = (state.loaded.as_mut(), state.batch.as_mut()) else {
                let error = state.broken.clone().unwrap_or(EngineError::ShutDown);
                for member in live.drain(..) {
                    if let Some(seq) = self.seqs.get_mut(&member.seq) {
                        seq.output.fail(error.clone());
                    }
                    outcome.finished.push(self.finish(member.seq));
                }
                break;
            };
            batch.clear();
            let mut rows = Vec::with_capacity(live.len());
            let add_failed = !add_next_tokens(&mut self.seqs, batch, &live, &mut rows);
            let decoded = if add_failed {
                Err(EngineError::Decode { code: -1 })
            } else {
                let watch = &mut state.first_step;
                loaded.with_dependent_mut(|_, ctx| {
                    watch.decode(ctx, batch).map_err(|e| EngineError::Decode {
                        code: decode_error_code(&e),
                    })
                })
            };
            outcome.steps += 1;
            if let Err(error) = decoded {
                tracing::error!(%error, "decode failed");
                for member in live.drain(..) {
                    if let Some(seq) = self.seqs.get_mut(&member.seq) {
                        seq.output.fail(error.clone());
                    }
                    outcome.finished.push(self.finish(member.seq));
                }
                break;
            }
            for (id, row) in rows {
                self.sample(model, id, row);
            }
            let mut still = Vec::with_capacity(live.len());
            for member in live {
                let ended = self.seqs.get(&member.seq).is_none_or(|s| s.ended);
                if ended {
                    outcome.finished.push(self.finish(member.seq));
                } else {
                    still.push(member);
                }
            }
            live = still;
        }
        outcome
    }

    /// Sequences whose client went away since the last call (each reported once): the driver
    /// tells the scheduler, which releases them.
    pub fn cancelled(&mut self) -> Vec<u64> {
        let mut gone = Vec::new();
        for (id, seq) in &mut self.seqs {
            if !seq.cancel_reported && seq.output.is_closed() {
                seq.cancel_reported = true;
                gone.push(*id);
            }
        }
        gone
    }

    /// Retries delivery of held text and of finished sequences' last events. Returns true while
    /// something is still waiting for a client to read.
    pub fn flush(&mut self) -> bool {
        let mut waiting = false;
        for seq in self.seqs.values_mut() {
            if seq.output.deliver() == Delivery::Held {
                waiting = true;
            }
        }
        self.draining
            .retain_mut(|output| output.deliver() == Delivery::Held);
        waiting || !self.draining.is_empty()
    }

    /// Loads the model, measures what the scheduler's estimates need (sizes, step costs, the
    /// phases of a switch, the resident memory it adds), and unloads it again. The model must
    /// not be loaded and no sequence of it may exist. The GGUF is read once beforehand so the
    /// figures are those of a switch with the file in the page cache (the steady state).
    #[expect(
        clippy::too_many_lines,
        reason = "one measurement after the other, read top to bottom"
    )]
    pub fn calibrate(&mut self, model: usize) -> Result<Calibration, EngineError> {
        let Some(config) = self.models.get(model).map(|m| m.config.clone()) else {
            return Err(unknown_model(model));
        };
        let load_error = |e: &dyn std::fmt::Display| EngineError::Load {
            path: config.path.clone(),
            reason: e.to_string(),
        };
        // Page the file in (a load without repacking only maps it), then measure from here.
        drop(load_weights(&config, Repack::Forbidden)?);
        let rss = || resident_bytes().unwrap_or(0);
        let rss_before = rss();
        // The peak catches what a load holds only for a while (file pages of weights that are
        // repacked, read buffers); sampled points would miss it.
        let peak_tracked = reset_resident_peak();
        let started = Instant::now();
        let weights = load_weights(&config, Repack::Allowed)?;
        let weights_ns = elapsed_ns(started);
        let rss_weights = rss();
        let started = Instant::now();
        let mut loaded = with_context(weights, &config)?;
        let context_ns = elapsed_ns(started);
        let rss_context = rss();
        let load_ns = weights_ns + context_ns;
        let (weights_bytes, vocab_tokens) = {
            let m = loaded.borrow_owner();
            (m.size(), u64::try_from(m.n_vocab()).unwrap_or(0))
        };
        let capacity = config.batch_tokens();
        let mut batch = LlamaBatch::new(capacity, 1);
        // A deterministic synthetic prompt: token ids spread over the vocabulary, as long as
        // one full batch (the compute buffers' largest use) or the context, whichever is less.
        let context = usize::try_from(config.context_tokens).unwrap_or(128);
        let full_len = capacity.min(context).max(2);
        let prompt_all: Vec<LlamaToken> = (0..full_len)
            .map(|i| {
                let id = (i * 7919 + 11) % usize::try_from(vocab_tokens.max(1)).unwrap_or(1);
                LlamaToken(i32::try_from(id).unwrap_or(0))
            })
            .collect();
        let prompt_len: usize = 128.min(context / 2);
        let prompt = prompt_all.get(..prompt_len).unwrap_or(&[]);
        let half = prompt_len / 2;
        let mut rss_peak = rss_context;
        let mut watch = FirstStepWatch {
            armed: true,
            measured: None,
        };
        let measured = loaded.with_dependent_mut(|_, ctx| -> Result<_, EngineError> {
            let short = prompt.get(..half).unwrap_or(&[]);
            // The first step on the fresh context, then the same step warm.
            let started = Instant::now();
            recompute(ctx, &mut batch, capacity, 0, short, &mut watch)?;
            let first_ns = elapsed_ns(started);
            clear_slot(ctx, 0);
            let started = Instant::now();
            recompute(ctx, &mut batch, capacity, 0, short, &mut watch)?;
            let first_step_ns = first_ns.saturating_sub(elapsed_ns(started));
            let short_bytes = ctx.state_seq_get_size_ext(0, LlamaStateSeqFlags::empty());
            clear_slot(ctx, 0);
            let started = Instant::now();
            recompute(ctx, &mut batch, capacity, 0, prompt, &mut watch)?;
            let prefill_ns = elapsed_ns(started);
            let started = Instant::now();
            let state = ctx
                .state_seq_get(0, LlamaStateSeqFlags::empty())
                .map_err(|e| load_error(&e))?;
            clear_slot(ctx, 0);
            let kv_save_ns = elapsed_ns(started);
            let started = Instant::now();
            let restored = ctx.state_seq_set(&state, 0);
            let kv_restore_ns = elapsed_ns(started);
            restored.map_err(|e| load_error(&e))?;
            let long_bytes = state.byte_len();
            // Decode steps of a batch of sequences, each one token at a time.
            let batch_seqs = config.seqs_max.min(4);
            for s in 1..batch_seqs {
                let slot = i32::try_from(s).unwrap_or(0);
                let head = prompt.get(..8).unwrap_or(&[]);
                recompute(ctx, &mut batch, capacity, slot, head, &mut watch)?;
            }
            let steps = 8_u32;
            let started = Instant::now();
            for step in 0..steps {
                batch.clear();
                for s in 0..batch_seqs {
                    let slot = i32::try_from(s).unwrap_or(0);
                    let base = if s == 0 { prompt_len } else { 8 };
                    let pos = i32::try_from(base).unwrap_or(0) + i32::try_from(step).unwrap_or(0);
                    let token = prompt.get(usize::try_from(step).unwrap_or(0)).copied();
                    let token = token.unwrap_or(LlamaToken(0));
                    batch
                        .add(token, pos, &[slot], true)
                        .map_err(|_| EngineError::Decode { code: -1 })?;
                }
                ctx.decode(&mut batch).map_err(|e| EngineError::Decode {
                    code: decode_error_code(&e),
                })?;
            }
            let decode_ns = elapsed_ns(started) / u64::from(steps);
            rss_peak = rss_peak.max(rss());
            // One full batch: the most of the compute buffers a step touches.
            clear_slot(ctx, 0);
            recompute(ctx, &mut batch, capacity, 0, &prompt_all, &mut watch)?;
            rss_peak = rss_peak.max(rss());
            clear_slot(ctx, 0);
            Ok((
                short_bytes,
                long_bytes,
                prefill_ns,
                (kv_save_ns, kv_restore_ns),
                decode_ns,
                batch_seqs,
                first_step_ns,
            ))
        })?;
        if peak_tracked {
            rss_peak = rss_peak.max(resident_peak_bytes().unwrap_or(0));
        }
        let (short_bytes, long_bytes, prefill_ns, kv_ns, decode_ns, decode_batch, first_step_ns) =
            measured;
        let (kv_save_ns, kv_restore_ns) = kv_ns;
        let started = Instant::now();
        drop(loaded);
        let unload_ns = elapsed_ns(started);
        let rss_unloaded = rss();
        // The repack's share of the weights phase: the same load serving every tensor from the
        // mapped file.
        let started = Instant::now();
        drop(load_weights(&config, Repack::Forbidden)?);
        let plain_weights_ns = elapsed_ns(started);
        let to_u64 = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        let grown = to_u64(long_bytes.saturating_sub(short_bytes));
        let kv_bytes_per_token = (grown / to_u64(prompt_len - half).max(1)).max(1);
        let kv_state_header_bytes =
            to_u64(long_bytes).saturating_sub(kv_bytes_per_token * to_u64(prompt_len));
        let cells = u64::from(config.seqs_max) * u64::from(config.context_tokens);
        let logits = vocab_tokens * 4 * u64::from(config.seqs_max);
        let ctx_kv_bytes = cells * kv_bytes_per_token + logits;
        let memory = MemoryProbe {
            after_weights_bytes: rss_weights.saturating_sub(rss_before),
            after_context_bytes: rss_context.saturating_sub(rss_before),
            after_steps_bytes: rss_peak.saturating_sub(rss_before),
            after_unload_bytes: rss_unloaded.saturating_sub(rss_before),
        };
        let ctx_extra_bytes = memory
            .after_steps_bytes
            .saturating_sub(weights_bytes + ctx_kv_bytes);
        Ok(Calibration {
            weights_bytes,
            kv_bytes_per_token,
            kv_state_header_bytes,
            ctx_bytes: ctx_kv_bytes + ctx_extra_bytes,
            ctx_kv_bytes,
            ctx_extra_bytes,
            memory,
            phases: CalibratedPhases {
                weights_ns,
                repack_ns: weights_ns.saturating_sub(plain_weights_ns),
                context_ns,
                first_step_ns,
                evict_ns: unload_ns,
                kv_save_ns,
                kv_restore_ns,
                kv_state_bytes: to_u64(long_bytes),
            },
            load_ns,
            unload_ns,
            prefill_ns_per_token: prefill_ns / to_u64(prompt_len).max(1),
            decode_step_ns: decode_ns.max(1),
            decode_batch,
            kv_transfer_ps_per_byte: (kv_save_ns + kv_restore_ns).saturating_mul(1000)
                / to_u64(long_bytes).max(1),
        })
    }

    /// Samples one sequence's next token from `row` of the last batch and delivers its text.
    fn sample(&mut self, model: usize, id: u64, row: i32) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let Some(loaded) = self.models.get_mut(model).and_then(|m| m.loaded.as_mut()) else {
            return;
        };
        let piece = &mut self.piece;
        loaded.with_dependent_mut(|model, ctx| {
            let vocab = model.vocab();
            let token = seq.sampler.sample(ctx, row);
            if vocab.is_eog(token) {
                seq.output.on_end_of_generation();
                seq.ended = true;
            } else {
                let index = seq.output.completion_tokens();
                if let Some(deadlines) = seq.deadlines {
                    let due =
                        deadlines.arrived + deadlines.ttft + deadlines.tbt.saturating_mul(index);
                    if Instant::now() <= due {
                        seq.tokens_on_time += 1;
                    }
                }
                piece.clear();
                vocab.token_to_piece_into(token, piece, false, None);
                if seq.output.on_token(piece) {
                    seq.next_token = Some(token);
                } else {
                    seq.ended = true;
                }
            }
        });
        if seq.output.deliver() == Delivery::Closed {
            seq.ended = true;
        }
    }

    /// Removes an ended sequence, frees its slot and reports it; its last events go to the
    /// drain list when the client's channel is full.
    fn finish(&mut self, id: u64) -> FinishedSeq {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return FinishedSeq {
                seq: id,
                tokens_emitted: 0,
                tokens_on_time: 0,
                class: RequestClass::Online,
            };
        };
        let report = seq.report(id);
        if let Some(slot) = seq.slot.take() {
            // A sequence that finished normally leaves its KV for a later prompt's prefix; a
            // failed or abandoned one's is of no use.
            if seq.output.is_finished() {
                self.park_slot(seq.model, slot, std::mem::take(&mut seq.kv_tokens));
            } else {
                self.free_slot(seq.model, slot);
            }
        }
        if seq.output.deliver() == Delivery::Held {
            self.draining.push(seq.output);
        }
        report
    }

    fn free_slot(&mut self, model: usize, slot: i32) {
        let Some(state) = self.models.get_mut(model) else {
            return;
        };
        if let Some(loaded) = state.loaded.as_mut() {
            loaded.with_dependent_mut(|_, ctx| clear_slot(ctx, slot));
            state.cache.forget(slot);
            state.free_slots.insert(slot);
        }
    }

    /// Before a prefill batch is built: each member from `cursor` on that has not fed a token of
    /// its own takes the longest prefix of its prompt that another slot of the model holds —
    /// an idle cached slot, a decoding sequence, or a member already past `cursor` — by copying
    /// that slot's KV (llama.cpp's `llama_memory_seq_cp`; with a KV stream per slot the whole
    /// stream is copied at the next decode, then the tail past the prefix is dropped). A member
    /// that a member still being fed (between `cursor` and it) would give more waits for it,
    /// so a prefix is computed once and copied once. Copied tokens are cached tokens.
    fn share_prefixes(
        &mut self,
        model: usize,
        members: &[Member],
        cursor: usize,
        started: &[bool],
    ) {
        let Self { models, seqs, .. } = self;
        let Some(state) = models.get_mut(model) else {
            return;
        };
        let min_gain = state.config.prefix_reuse_tokens();
        let window = state.window_tokens;
        let (Some(loaded), Some(waiting)) = (state.loaded.as_mut(), members.get(cursor..)) else {
            return;
        };
        if state.config.prefix_cache_tokens_max == 0 {
            // Prefix reuse is off for this model, copies included.
            return;
        }
        for (index, member) in waiting.iter().enumerate() {
            if started.get(cursor + index).copied().unwrap_or(true) {
                continue;
            }
            let growing = waiting.get(..index).unwrap_or(&[]);
            let Some(seq) = seqs.get(&member.seq) else {
                continue;
            };
            let is_growing = |id: &u64| growing.iter().any(|m| m.seq == *id);
            let settled = seqs
                .iter()
                .filter(|(id, s)| {
                    **id != member.seq && s.model == model && !s.ended && !is_growing(id)
                })
                .filter_map(|(_, s)| s.slot.map(|slot| (slot, s.kv_tokens.as_slice())))
                .chain(state.cache.held())
                .filter(|(_, tokens)| fits_window(window, tokens.len()));
            let have = seq.kv_tokens.len();
            let Some((from, tokens)) = best_donor(&seq.prompt, have, settled, min_gain) else {
                continue;
            };
            let later = growing
                .iter()
                .filter_map(|m| seqs.get(&m.seq))
                .map(|s| common_prefix(s.prompt_body(), seq.prompt_body()))
                .max()
                .unwrap_or(0);
            if later >= tokens.saturating_add(min_gain) {
                continue;
            }
            let kept = loaded.with_dependent_mut(|_, ctx| {
                ctx.copy_kv_cache_seq(from, member.slot, None, None)
                    .is_ok()
                    .then(|| keep_prefix(ctx, member.slot, tokens))
            });
            let (Some(kept), Some(seq)) = (kept, seqs.get_mut(&member.seq)) else {
                continue;
            };
            seq.kv_tokens.clear();
            seq.kv_tokens
                .extend_from_slice(seq.prompt.get(..kept).unwrap_or(&[]));
            seq.output
                .set_cached_prompt_tokens(TokenCount::try_from(kept).unwrap_or(0));
        }
    }

    /// Frees `slot` keeping the KV of `tokens` in it for prefix reuse (within the model's
    /// `prefix_cache_tokens_max`: the least recently used idle slots are cleared to fit).
    fn park_slot(&mut self, model: usize, slot: i32, tokens: Vec<LlamaToken>) {
        let Some(state) = self.models.get_mut(model) else {
            return;
        };
        let Some(loaded) = state.loaded.as_mut() else {
            return;
        };
        let bound = usize::try_from(state.config.prefix_cache_tokens_max).unwrap_or(usize::MAX);
        let cleared = if fits_window(state.window_tokens, tokens.len()) {
            state.cache.park(slot, tokens, bound)
        } else {
            // Partial removal is unreliable past a sliding window: nothing to reuse.
            vec![slot]
        };
        loaded.with_dependent_mut(|_, ctx| {
            for &cleared_slot in &cleared {
                clear_slot(ctx, cleared_slot);
            }
        });
        state.free_slots.insert(slot);
    }
}

/// Adds each member's sampled, not yet decoded token to `batch` at its next position (with
/// logits, its row recorded in `rows`). False if the batch is full.
fn add_next_tokens(
    seqs: &mut BTreeMap<u64, Seq>,
    batch: &mut LlamaBatch<'static>,
    members: &[Member],
    rows: &mut Vec<(u64, i32)>,
) -> bool {
    for member in members {
        let Some(seq) = seqs.get_mut(&member.seq) else {
            continue;
        };
        let Some(token) = seq.next_token.take() else {
            continue;
        };
        let pos = i32::try_from(seq.kv_tokens.len()).unwrap_or(i32::MAX);
        rows.push((member.seq, batch.n_tokens()));
        if batch.add(token, pos, &[member.slot], true).is_err() {
            return false;
        }
        seq.kv_tokens.push(token);
    }
    true
}

/// Adds each member's last prompt token (its body is in its slot) to `batch` with logits, its
/// row recorded in `rows`. False if the batch is full.
fn add_last_tokens(
    seqs: &mut BTreeMap<u64, Seq>,
    batch: &mut LlamaBatch<'static>,
    members: &[Member],
    rows: &mut Vec<(u64, i32)>,
) -> bool {
    for member in members {
        let Some(seq) = seqs.get_mut(&member.seq) else {
            continue;
        };
        let index = seq.kv_tokens.len();
        if seq.ended || index + 1 != seq.prompt.len() {
            continue;
        }
        let Some(&token) = seq.prompt.get(index) else {
            continue;
        };
        rows.push((member.seq, batch.n_tokens()));
        let pos = i32::try_from(index).unwrap_or(i32::MAX);
        if batch.add(token, pos, &[member.slot], true).is_err() {
            return false;
        }
        seq.kv_tokens.push(token);
    }
    true
}

fn unknown_model(model: usize) -> EngineError {
    EngineError::Load {
        path: PathBuf::new(),
        reason: format!("no model with index {model} on this accelerator"),
    }
}

/// Whether llama.cpp may repack weights into the CPU's preferred layout (its "extra" buffer
/// types) while loading; `Forbidden` forces every tensor to the plain CPU buffer type, which
/// serves them straight from the mapped file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repack {
    Allowed,
    Forbidden,
}

/// `llama_model_load_from_file`.
fn load_weights(config: &MultiModelConfig, repack: Repack) -> Result<LlamaModel, EngineError> {
    if repack == Repack::Allowed {
        return crate::llama::load_model(&config.path);
    }
    let backend = backend()?;
    let mut params = std::pin::pin!(LlamaModelParams::default());
    params.as_mut().add_cpu_buft_override(c".");
    LlamaModel::load_from_file(backend, &config.path, &params).map_err(|e| EngineError::Load {
        path: config.path.clone(),
        reason: e.to_string(),
    })
}

/// `llama_init_from_model`: the context that borrows `model`.
fn with_context(model: LlamaModel, config: &MultiModelConfig) -> Result<LoadedModel, EngineError> {
    let backend = backend()?;
    LoadedModel::try_new(model, |model| {
        model
            .new_context(backend, config.context_params())
            .map_err(|e| EngineError::Load {
                path: config.path.clone(),
                reason: e.to_string(),
            })
    })
}

fn load_with_context(
    config: &MultiModelConfig,
    repack: Repack,
) -> Result<(LoadedModel, LoadPhases), EngineError> {
    let started = Instant::now();
    let model = load_weights(config, repack)?;
    let weights_ns = elapsed_ns(started);
    let started = Instant::now();
    let loaded = with_context(model, config)?;
    let context_ns = elapsed_ns(started);
    Ok((
        loaded,
        LoadPhases {
            weights_ns,
            context_ns,
        },
    ))
}

/// The process's resident memory (`VmRSS` of `/proc/self/status`), in bytes; `None` where it
/// cannot be read (not Linux).
pub fn resident_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// The process's peak resident memory since the last [`reset_resident_peak`] (`VmHWM`), bytes.
fn resident_peak_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Resets the kernel's record of the peak resident memory to the current one (writing 5 to
/// `/proc/self/clear_refs`); false where that is not allowed.
fn reset_resident_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line
        .trim_start_matches(key)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Keeps the first `reuse` positions of `slot`'s KV and clears the rest; returns how many are
/// kept (0, the slot cleared, when llama.cpp could not remove just the tail).
fn keep_prefix(ctx: &mut LlamaContext<'_>, slot: i32, reuse: usize) -> usize {
    if reuse > 0 {
        let seq = u32::try_from(slot).ok();
        let pos = u32::try_from(reuse).ok();
        let removed = ctx.clear_kv_cache_seq(seq, pos, None).unwrap_or(false);
        let pos_max = ctx.kv_cache_seq_pos_max(slot);
        if removed && usize::try_from(pos_max + 1).ok() == Some(reuse) {
            return reuse;
        }
    }
    clear_slot(ctx, slot);
    0
}

fn clear_slot(ctx: &mut LlamaContext<'_>, slot: i32) {
    let seq = u32::try_from(slot).ok();
    if ctx.clear_kv_cache_seq(seq, None, None).is_err() {
        tracing::error!(slot, "could not clear a sequence's KV");
    }
}

/// Decodes `tokens` into `slot` at positions `0..len` without logits (a restore by recompute,
/// or calibration's prefill).
fn recompute(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'static>,
    capacity: usize,
    slot: i32,
    tokens: &[LlamaToken],
    watch: &mut FirstStepWatch,
) -> Result<(), EngineError> {
    for (chunk_index, chunk) in tokens.chunks(capacity.max(1)).enumerate() {
        batch.clear();
        for (i, &token) in chunk.iter().enumerate() {
            let pos = chunk_index * capacity + i;
            let pos = i32::try_from(pos).unwrap_or(i32::MAX);
            batch
                .add(token, pos, &[slot], false)
                .map_err(|_| EngineError::Decode { code: -1 })?;
        }
        watch.decode(ctx, batch).map_err(|e| EngineError::Decode {
            code: decode_error_code(&e),
        })?;
    }
    Ok(())
}

fn elapsed_ns(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
