//! The pool's state and event handling. Decisions (what runs next, what gets evicted) live in
//! `sched.rs`; this file applies events, emits actions and keeps the memory ledger.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::{ModelId, PoolPolicy, RequestClass};

use crate::PoolError;
use crate::config::{CostEstimate, ModelSpec, PoolConfig};
use crate::event::{Action, ActionId, Event, SeqFinished, SeqId};
use crate::status::{BatchStatus, DecodeByBatch, ModelStatus, PoolCounters, PoolStatus, Residency};

/// Where a sequence's KV cells are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kv {
    /// Not prefilled yet.
    None,
    /// In the model's context (or a slot reserved for it by an in-flight prefill/restore).
    InCtx,
    /// A save is in flight; `bytes` are already charged to the saved pool.
    Saving {
        bytes: u64,
    },
    Saved {
        bytes: u64,
    },
    /// A restore is in flight; the slot is reserved and the bytes still charged.
    Restoring {
        bytes: u64,
    },
}

impl Kv {
    /// The sequence holds a context slot: its cells are there, or a slot is reserved for them
    /// (restore in flight) or still held (save in flight).
    pub(crate) fn holds_slot(self) -> bool {
        matches!(
            self,
            Self::InCtx | Self::Saving { .. } | Self::Restoring { .. }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for admission (`token`: KV reservation and attainment prediction).
    Pending,
    /// Admitted, waiting in its model's prefill queue.
    Queued,
    Prefilling,
    Decoding,
}

#[derive(Debug, Clone)]
pub(crate) struct SeqState {
    pub(crate) model: usize,
    /// `Batch`: lives in `Pool::batch_q` / `ModelState::batch_decoding`, never in the online
    /// queues and rounds (docs/pool.md §3.7).
    pub(crate) class: RequestClass,
    pub(crate) arrival_ns: u64,
    pub(crate) prompt_tokens: u32,
    /// The driver's hint of `prompt_tokens` already in the engine's KV (≤ `prompt_tokens − 1`).
    pub(crate) cached_tokens: u32,
    pub(crate) max_tokens: u32,
    pub(crate) emitted: u32,
    pub(crate) kv: Kv,
    pub(crate) phase: Phase,
    pub(crate) in_action: bool,
    pub(crate) cancelled: bool,
    /// Worst-case saved bytes reserved at admission (`token` only).
    pub(crate) reserved_bytes: u64,
    /// KV bytes charged while the sequence holds a context slot (`kv_paged`; else 0).
    pub(crate) ctx_kv_bytes: u64,
}

impl SeqState {
    /// Prompt tokens its prefill computes: the prompt but the hinted cached prefix.
    pub(crate) fn prefill_tokens(&self) -> u64 {
        u64::from(self.prompt_tokens.saturating_sub(self.cached_tokens))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ModelState {
    pub(crate) residency: Residency,
    pub(crate) prefill_q: VecDeque<SeqId>,
    pub(crate) decoding: crate::seqset::SeqSet,
    /// The online decoding sequences whose cells are in the context (`Kv::InCtx`): the ones a
    /// save can take, without walking the saved ones.
    pub(crate) decoding_in_ctx: crate::seqset::SeqSet,
    /// Batch sequences with cells in the context (or a slot reserved by an in-flight prefill,
    /// restore or preemption): decoded only while no online request is in the pool.
    pub(crate) batch_decoding: BTreeSet<SeqId>,
    /// Context slots in use or reserved (`≤ seqs_max`).
    pub(crate) in_ctx: u32,
    /// In-flight actions touching this model.
    pub(crate) busy: u32,
    pub(crate) last_used_ns: u64,
    /// Its recent arrivals (online requests), for eviction ties (`sched.rs`, `make_room`).
    pub(crate) demand: crate::demand::Demand,
    pub(crate) last_switch_ns: Option<u64>,
    pub(crate) decode_step_ns: u64,
    pub(crate) load_ns: u64,
    pub(crate) saved_bytes: u64,
    /// Requests held in the admission queue for this model.
    pub(crate) pending: u32,
    /// An operator asked to load it (`Event::LoadRequested`): loaded when nothing else needs
    /// the transfer lane and memory allows.
    pub(crate) load_requested: bool,
    /// An operator asked to unload it (`Event::UnloadRequested`): evicted next.
    pub(crate) unload_requested: bool,
    /// This model's share of `PoolCounters::decode_by_batch`.
    pub(crate) decode_by_batch: DecodeByBatch,
}

impl ModelState {
    /// Nothing queued, decoding, saved, in the context or in flight: the model can go without
    /// any work being saved or lost.
    pub(crate) fn is_idle(&self) -> bool {
        self.busy == 0
            && self.in_ctx == 0
            && self.decoding.is_empty()
            && self.batch_decoding.is_empty()
            && self.prefill_q.is_empty()
            && self.pending == 0
            && self.saved_bytes == 0
    }

    fn new(spec: &ModelSpec) -> Self {
        Self {
            residency: Residency::Cold,
            prefill_q: VecDeque::new(),
            decoding: crate::seqset::SeqSet::new(),
            decoding_in_ctx: crate::seqset::SeqSet::new(),
            batch_decoding: BTreeSet::new(),
            in_ctx: 0,
            busy: 0,
            last_used_ns: 0,
            demand: crate::demand::Demand::default(),
            last_switch_ns: None,
            decode_step_ns: spec.estimate.decode_step_ns,
            load_ns: spec.estimate.load_ns,
            saved_bytes: 0,
            pending: 0,
            load_requested: false,
            unload_requested: false,
            decode_by_batch: DecodeByBatch::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    Compute,
    Transfer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Work {
    Load,
    Evict,
    Save(SeqId),
    Restore(SeqId),
    /// Prompts to prefill, and the model's decoding sequences riding along (one token each).
    Prefill(Vec<SeqId>, Vec<SeqId>),
    Decode(Vec<SeqId>, u32),
}

#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    pub(crate) model: usize,
    pub(crate) work: Work,
    /// When the pool handed the action out.
    pub(crate) issued_ns: u64,
    /// Batch work (a batch sequence's prefill, decode, preemption or resume, or a load or
    /// eviction for batch work): it leaves the online bookkeeping (LRU order, estimates,
    /// switch spacing) as it was.
    pub(crate) batch: bool,
}

/// One decode turn of the round: a chunk of a model's decoding sequences and its step count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Turn {
    pub(crate) model: usize,
    pub(crate) chunk: u32,
    pub(crate) steps: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Prefill { model: usize },
    Decode(Turn),
}

/// Bytes charged right now. See [`Pool::check_invariants`] for the recount it must match.
#[derive(Debug, Clone, Copy, Default)]
#[expect(
    clippy::struct_field_names,
    reason = "every field is a byte count: the unit stays in the name"
)]
pub(crate) struct Ledger {
    /// Weights + context of every model that is loading, resident or evicting.
    pub(crate) resident_bytes: u64,
    /// Sequence states saving, saved or restoring.
    pub(crate) saved_bytes: u64,
    /// Paged KV of the sequences holding context slots (`kv_paged`; else 0).
    pub(crate) ctx_kv_bytes: u64,
}

/// The sans-IO scheduler. Feed it [`Event`]s with [`Pool::handle`]; carry out the [`Action`]s
/// it returns; report each engine action's completion as an event.
#[derive(Debug, Clone)]
pub struct Pool {
    pub(crate) cfg: PoolConfig,
    pub(crate) now_ns: u64,
    pub(crate) models: Vec<ModelState>,
    pub(crate) index: BTreeMap<ModelId, usize>,
    /// Whether each model can ever be loaded under the budget (else admission refuses it).
    pub(crate) loadable: Vec<bool>,
    pub(crate) seqs: BTreeMap<SeqId, SeqState>,
    pub(crate) pending: VecDeque<SeqId>,
    pub(crate) queued_len: u32,
    pub(crate) in_flight: BTreeMap<ActionId, InFlight>,
    pub(crate) compute_busy: bool,
    pub(crate) transfer_busy: bool,
    pub(crate) next_action: u64,
    pub(crate) target: Option<Target>,
    pub(crate) round: Vec<Turn>,
    pub(crate) turn: usize,
    pub(crate) prefill_credit: bool,
    /// When the latest load was handed out (`token` spaces switches by the turn quota).
    pub(crate) last_load_ns: Option<u64>,
    pub(crate) ledger: Ledger,
    pub(crate) kv_reserved_bytes: u64,
    pub(crate) counters: PoolCounters,
    /// Batch sequences waiting for a context slot, FCFS; preempted ones go back to the front.
    pub(crate) batch_q: VecDeque<SeqId>,
    /// Batch sequences tracked (queued, in a context or preempted), `≤ batch_queue_max`.
    pub(crate) batch_len: u32,
    /// The model whose batch decode turn ran last (batch turns rotate over models).
    pub(crate) batch_turn_model: usize,
}

impl Pool {
    /// Builds a pool; models are kept in `ModelId` order, which is the round order.
    pub fn new(mut cfg: PoolConfig) -> Result<Self, PoolError> {
        cfg.validate()?;
        cfg.models.sort_by(|a, b| a.id.cmp(&b.id));
        let paged = cfg.kv_paged;
        let total: u64 = cfg.models.iter().map(|m| m.full_bytes(paged)).sum();
        if cfg.policy == PoolPolicy::Dedicated {
            // "The budget is raised to fit": dedicated keeps everything resident by definition.
            cfg.memory_bytes_max = cfg.memory_bytes_max.max(total);
        }
        let pinned: u64 = cfg
            .models
            .iter()
            .filter(|m| m.pin)
            .map(|m| m.full_bytes(paged))
            .sum();
        let saved_share = if cfg.policy == PoolPolicy::Token && cfg.saved_kv_in_memory_budget {
            cfg.kv_saved_bytes_max
        } else {
            0
        };
        let loadable = cfg
            .models
            .iter()
            .map(|m| {
                let others = if m.pin {
                    pinned - m.full_bytes(paged)
                } else {
                    pinned
                };
                m.full_bytes(paged)
                    .saturating_add(others)
                    .saturating_add(saved_share)
                    <= cfg.memory_bytes_max
            })
            .collect();
        let models = cfg.models.iter().map(ModelState::new).collect();
        let index = cfg
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        Ok(Self {
            cfg,
            now_ns: 0,
            models,
            index,
            loadable,
            seqs: BTreeMap::new(),
            pending: VecDeque::new(),
            queued_len: 0,
            in_flight: BTreeMap::new(),
            compute_busy: false,
            transfer_busy: false,
            next_action: 1,
            target: None,
            round: Vec::new(),
            turn: 0,
            prefill_credit: true,
            last_load_ns: None,
            ledger: Ledger::default(),
            kv_reserved_bytes: 0,
            counters: PoolCounters::default(),
            batch_q: VecDeque::new(),
            batch_len: 0,
            batch_turn_model: 0,
        })
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    pub fn counters(&self) -> PoolCounters {
        self.counters
    }

    /// Applies one event and appends the resulting actions to `actions` (at most one action per
    /// lane plus `Release`s). On `Err` nothing changed except the clock.
    pub fn handle(&mut self, event: Event, actions: &mut Vec<Action>) -> Result<(), PoolError> {
        let now_ns = event.now_ns();
        if now_ns < self.now_ns {
            return Err(PoolError::TimeWentBackwards {
                now_ns,
                clock_ns: self.now_ns,
            });
        }
        self.now_ns = now_ns;
        match event {
            Event::RequestArrived {
                seq,
                model,
                prompt_tokens,
                max_tokens,
                class,
                cached_tokens,
                ..
            } => {
                self.admit(seq, &model, prompt_tokens, max_tokens, class, cached_tokens)?;
            }
            Event::Cancelled { seq, .. } => self.cancel(seq, actions),
            Event::LoadRequested { model, .. } => self.request_load(&model)?,
            Event::UnloadRequested { model, .. } => self.request_unload(&model)?,
            Event::LoadFinished {
                action,
                duration_ns,
                ..
            } => {
                let done = self.take(action, "load", |w| matches!(w, Work::Load))?;
                self.finish_load(done.model, duration_ns, done.batch);
            }
            Event::UnloadFinished { action, .. } => {
                let done = self.take(action, "evict", |w| matches!(w, Work::Evict))?;
                self.finish_evict(done.model);
            }
            Event::KvSaved { action, .. } => {
                let done = self.take(action, "save", |w| matches!(w, Work::Save(_)))?;
                if let Work::Save(seq) = done.work {
                    self.finish_save(seq, actions);
                }
            }
            Event::KvRestored { action, .. } => {
                let done = self.take(action, "restore", |w| matches!(w, Work::Restore(_)))?;
                if let Work::Restore(seq) = done.work {
                    self.finish_restore(seq, actions);
                }
            }
            Event::StepFinished {
                action,
                steps,
                duration_ns,
                finished,
                ..
            } => {
                let done = self.take(action, "step", |w| {
                    matches!(w, Work::Prefill(..) | Work::Decode(..))
                })?;
                self.finish_step(done, steps, duration_ns, &finished, actions);
            }
            Event::Tick { .. } => {}
        }
        self.check_ledger();
        self.schedule(actions);
        self.check_ledger();
        Ok(())
    }

    fn admit(
        &mut self,
        seq: SeqId,
        model: &ModelId,
        prompt_tokens: u32,
        max_tokens: u32,
        class: RequestClass,
        cached_tokens: u32,
    ) -> Result<(), PoolError> {
        let result = self.admission_check(seq, model, prompt_tokens, max_tokens, class);
        let index = match result {
            Ok(index) => index,
            Err(error) => {
                self.counters.requests_rejected += 1;
                return Err(error);
            }
        };
        let token = self.cfg.policy == PoolPolicy::Token;
        let batch = class == RequestClass::Batch;
        let state = SeqState {
            model: index,
            class,
            arrival_ns: self.now_ns,
            prompt_tokens,
            cached_tokens: cached_tokens.min(prompt_tokens.saturating_sub(1)),
            max_tokens,
            emitted: 0,
            kv: Kv::None,
            phase: if token && !batch {
                Phase::Pending
            } else {
                Phase::Queued
            },
            in_action: false,
            cancelled: false,
            reserved_bytes: 0,
            ctx_kv_bytes: if self.cfg.kv_paged {
                self.cfg.models[index].saved_bytes(u64::from(prompt_tokens) + u64::from(max_tokens))
            } else {
                0
            },
        };
        self.seqs.insert(seq, state);
        self.counters.requests_admitted += 1;
        if batch {
            self.batch_q.push_back(seq);
            self.batch_len += 1;
            self.counters.batch_admitted += 1;
            return Ok(());
        }
        let m = &mut self.models[index];
        m.last_used_ns = self.now_ns;
        m.demand.arrive(self.now_ns);
        if token {
            self.pending.push_back(seq);
            m.pending += 1;
        } else {
            m.prefill_q.push_back(seq);
        }
        self.queued_len += 1;
        Ok(())
    }

    fn admission_check(
        &self,
        seq: SeqId,
        model: &ModelId,
        prompt_tokens: u32,
        max_tokens: u32,
        class: RequestClass,
    ) -> Result<usize, PoolError> {
        let Some(&index) = self.index.get(model) else {
            return Err(PoolError::ModelNotFound {
                model: model.clone(),
            });
        };
        let spec = &self.cfg.models[index];
        if !self.loadable[index] {
            return Err(PoolError::ModelTooLarge {
                model: model.clone(),
                bytes_needed: spec.resident_bytes(),
                memory_bytes_max: self.cfg.memory_bytes_max,
            });
        }
        let tokens = u64::from(prompt_tokens) + u64::from(max_tokens);
        let too_long = tokens > u64::from(spec.seq_tokens_max)
            || max_tokens == 0
            || prompt_tokens == 0
            || (self.cfg.policy == PoolPolicy::Token
                && spec.saved_bytes(tokens) > self.cfg.kv_saved_bytes_max);
        if too_long {
            return Err(PoolError::RequestTooLong {
                model: model.clone(),
                tokens,
                seq_tokens_max: spec.seq_tokens_max,
            });
        }
        if self.seqs.contains_key(&seq) {
            return Err(PoolError::DuplicateSeq { seq });
        }
        if class == RequestClass::Batch {
            if self.batch_len >= self.cfg.knobs.batch_queue_max {
                return Err(PoolError::BatchQueueFull {
                    batch_queue_max: self.cfg.knobs.batch_queue_max,
                });
            }
        } else if self.queued_len >= self.cfg.knobs.admission_queue_len_max {
            return Err(PoolError::QueueFull {
                admission_queue_len_max: self.cfg.knobs.admission_queue_len_max,
            });
        }
        Ok(index)
    }

    /// An operator's load: a hint (the model is loaded when the transfer lane has nothing more
    /// urgent, evicting only idle models); a loaded or loading model is left as it is.
    fn request_load(&mut self, model: &ModelId) -> Result<(), PoolError> {
        let index = self.model_index(model)?;
        if !self.loadable[index] {
            let spec = &self.cfg.models[index];
            return Err(PoolError::ModelTooLarge {
                model: model.clone(),
                bytes_needed: spec.resident_bytes(),
                memory_bytes_max: self.cfg.memory_bytes_max,
            });
        }
        let m = &mut self.models[index];
        m.unload_requested = false;
        m.load_requested = m.residency == Residency::Cold;
        Ok(())
    }

    /// An operator's unload: only of an idle, unpinned model under a swapping policy; a cold
    /// model is already unloaded.
    fn request_unload(&mut self, model: &ModelId) -> Result<(), PoolError> {
        let index = self.model_index(model)?;
        let busy = |reason: &'static str| {
            Err(PoolError::ModelBusy {
                model: model.clone(),
                reason,
            })
        };
        if self.cfg.policy == PoolPolicy::Dedicated {
            return busy("the dedicated policy keeps every model resident");
        }
        if self.cfg.models[index].pin {
            return busy("the model is pinned");
        }
        let m = &mut self.models[index];
        if !m.is_idle() {
            return busy("the model has requests in flight");
        }
        m.load_requested = false;
        match m.residency {
            Residency::Cold | Residency::Evicting => Ok(()),
            Residency::Loading => busy("the model is loading"),
            Residency::Resident => {
                m.unload_requested = true;
                Ok(())
            }
        }
    }

    fn model_index(&self, model: &ModelId) -> Result<usize, PoolError> {
        self.index
            .get(model)
            .copied()
            .ok_or_else(|| PoolError::ModelNotFound {
                model: model.clone(),
            })
    }

    /// Whether the pool still tracks `seq` (admitted and neither finished nor cancelled). A
    /// driver uses it after `Cancelled` to free engine-side state the pool never asked for.
    pub fn contains_seq(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    fn cancel(&mut self, seq: SeqId, actions: &mut Vec<Action>) {
        let Some(state) = self.seqs.get_mut(&seq) else {
            return;
        };
        if state.in_action {
            // Finished when the action that holds it completes.
            state.cancelled = true;
            return;
        }
        let (model, phase) = (state.model, state.phase);
        if state.class == RequestClass::Batch {
            self.batch_q.retain(|s| *s != seq);
            self.counters.requests_cancelled += 1;
            self.finish_seq(seq, true, actions);
            return;
        }
        match phase {
            Phase::Pending => {
                self.pending.retain(|s| *s != seq);
                self.models[model].pending -= 1;
                self.queued_len -= 1;
            }
            Phase::Queued => {
                self.models[model].prefill_q.retain(|s| *s != seq);
                self.queued_len -= 1;
            }
            Phase::Prefilling | Phase::Decoding => {}
        }
        self.counters.requests_cancelled += 1;
        self.finish_seq(seq, true, actions);
    }

    /// Removes a finished or cancelled sequence and frees what it holds. `release` tells the
    /// engine to drop its cells or saved state (a normal finish frees them engine-side).
    pub(crate) fn finish_seq(&mut self, seq: SeqId, release: bool, actions: &mut Vec<Action>) {
        let Some(state) = self.seqs.remove(&seq) else {
            return;
        };
        assert!(
            !state.in_action,
            "a sequence inside an in-flight action cannot finish"
        );
        let batch = state.class == RequestClass::Batch;
        let model = &mut self.models[state.model];
        model.decoding.remove(seq);
        model.decoding_in_ctx.remove(seq);
        if batch {
            model.batch_decoding.remove(&seq);
            self.batch_q.retain(|s| *s != seq);
            assert!(self.batch_len > 0, "batch count underflow");
            self.batch_len -= 1;
            if !state.cancelled && !release {
                self.counters.batch_finished += 1;
            }
        } else {
            model.last_used_ns = self.now_ns;
        }
        let model_id = self.cfg.models[state.model].id.clone();
        match state.kv {
            Kv::None => {}
            Kv::InCtx => {
                assert!(model.in_ctx > 0, "slot count underflow");
                model.in_ctx -= 1;
                self.ledger.ctx_kv_bytes -= state.ctx_kv_bytes;
                if release {
                    actions.push(Action::Release {
                        model: model_id,
                        seq,
                    });
                }
            }
            Kv::Saved { bytes } => {
                model.saved_bytes -= bytes;
                self.ledger.saved_bytes -= bytes;
                actions.push(Action::Release {
                    model: model_id,
                    seq,
                });
            }
            Kv::Saving { .. } | Kv::Restoring { .. } => {
                unreachable_state("a sequence with a transfer in flight is always in an action");
            }
        }
        assert!(
            self.kv_reserved_bytes >= state.reserved_bytes,
            "KV reservation underflow"
        );
        self.kv_reserved_bytes -= state.reserved_bytes;
        if !state.cancelled && !release {
            self.counters.requests_finished += 1;
        }
        if state.cancelled {
            self.counters.requests_cancelled += 1;
        }
    }

    /// Removes an in-flight action after checking its kind; frees its lane.
    fn take(
        &mut self,
        action: ActionId,
        expected: &'static str,
        kind: impl Fn(&Work) -> bool,
    ) -> Result<InFlight, PoolError> {
        match self.in_flight.get(&action) {
            None => return Err(PoolError::UnknownAction { action }),
            Some(f) if !kind(&f.work) => return Err(PoolError::EventMismatch { action, expected }),
            Some(_) => {}
        }
        let Some(done) = self.in_flight.remove(&action) else {
            return Err(PoolError::UnknownAction { action });
        };
        match lane_of(&done.work) {
            Lane::Compute => self.compute_busy = false,
            Lane::Transfer => self.transfer_busy = false,
        }
        let took_ns = self.now_ns.saturating_sub(done.issued_ns);
        let times = &mut self.counters.in_flight_ns;
        let kind = match &done.work {
            Work::Load => &mut times.load,
            Work::Evict => &mut times.evict,
            Work::Save(_) => &mut times.kv_save,
            Work::Restore(_) => &mut times.kv_restore,
            Work::Prefill(..) => &mut times.prefill,
            Work::Decode(..) => &mut times.decode,
        };
        *kind = kind.saturating_add(took_ns);
        let model = &mut self.models[done.model];
        model.busy -= 1;
        if !done.batch {
            model.last_used_ns = self.now_ns;
        }
        let (seqs, riders): (&[SeqId], &[SeqId]) = match &done.work {
            Work::Save(seq) | Work::Restore(seq) => (std::slice::from_ref(seq), &[]),
            Work::Prefill(seqs, riders) => (seqs, riders),
            Work::Decode(seqs, _) => (seqs, &[]),
            Work::Load | Work::Evict => (&[], &[]),
        };
        for seq in seqs.iter().chain(riders) {
            if let Some(state) = self.seqs.get_mut(seq) {
                state.in_action = false;
            }
        }
        Ok(done)
    }

    fn finish_load(&mut self, model: usize, duration_ns: u64, batch: bool) {
        let now_ns = self.now_ns;
        let m = &mut self.models[model];
        assert_eq!(
            m.residency,
            Residency::Loading,
            "load finished for a non-loading model"
        );
        m.residency = Residency::Resident;
        if !batch {
            m.last_used_ns = now_ns;
        }
        m.load_requested = false;
        m.load_ns = ewma(m.load_ns, duration_ns);
    }

    fn finish_evict(&mut self, model: usize) {
        let m = &mut self.models[model];
        assert_eq!(
            m.residency,
            Residency::Evicting,
            "unload finished for a model not evicting"
        );
        assert_eq!(
            m.in_ctx, 0,
            "a model was evicted with sequences in its context"
        );
        m.residency = Residency::Cold;
        m.unload_requested = false;
        let bytes = self.cfg.models[model].resident_bytes();
        assert!(
            self.ledger.resident_bytes >= bytes,
            "ledger underflow on evict"
        );
        self.ledger.resident_bytes -= bytes;
        self.counters.evictions += 1;
    }

    fn finish_save(&mut self, seq: SeqId, actions: &mut Vec<Action>) {
        let Some(state) = self.seqs.get_mut(&seq) else {
            return;
        };
        let Kv::Saving { bytes } = state.kv else {
            unreachable_state("save finished for a sequence not saving");
            return;
        };
        state.kv = Kv::Saved { bytes };
        let (model, cancelled, ctx_kv) = (state.model, state.cancelled, state.ctx_kv_bytes);
        let batch = state.class == RequestClass::Batch;
        assert!(
            self.models[model].in_ctx > 0,
            "slot count underflow on save"
        );
        self.models[model].in_ctx -= 1;
        self.ledger.ctx_kv_bytes -= ctx_kv;
        if batch {
            // Preempted: back to the front of the batch queue, recomputed on resume.
            self.models[model].batch_decoding.remove(&seq);
            self.counters.batch_preemptions += 1;
            if !cancelled {
                self.batch_q.push_front(seq);
            }
        } else {
            self.counters.kv_saves += 1;
        }
        if cancelled {
            self.finish_seq(seq, true, actions);
        }
    }

    fn finish_restore(&mut self, seq: SeqId, actions: &mut Vec<Action>) {
        let Some(state) = self.seqs.get_mut(&seq) else {
            return;
        };
        let Kv::Restoring { bytes } = state.kv else {
            unreachable_state("restore finished for a sequence not restoring");
            return;
        };
        state.kv = Kv::InCtx;
        let (model, cancelled) = (state.model, state.cancelled);
        let batch = state.class == RequestClass::Batch;
        if self.models[model].decoding.contains(seq) {
            self.models[model].decoding_in_ctx.insert(seq);
        }
        self.models[model].saved_bytes -= bytes;
        self.ledger.saved_bytes -= bytes;
        if batch {
            self.models[model].batch_decoding.insert(seq);
            self.counters.batch_resumes += 1;
        } else {
            self.counters.kv_restores += 1;
        }
        if cancelled {
            self.finish_seq(seq, true, actions);
        }
    }

    fn finish_step(
        &mut self,
        done: InFlight,
        steps: u32,
        duration_ns: u64,
        finished: &[SeqFinished],
        actions: &mut Vec<Action>,
    ) {
        let (seqs, riders) = match done.work {
            Work::Prefill(seqs, riders) => (seqs, Some(riders)),
            Work::Decode(seqs, _) => (seqs, None),
            Work::Load | Work::Evict | Work::Save(_) | Work::Restore(_) => return,
        };
        let prefill = riders.is_some();
        if !prefill && steps > 0 {
            let m = &mut self.models[done.model];
            if !done.batch {
                // Batch turns leave the online estimates as online work measured them.
                m.decode_step_ns = ewma(m.decode_step_ns, duration_ns / u64::from(steps)).max(1);
            }
            m.decode_by_batch.record(seqs.len(), steps, duration_ns);
            self.counters.decode_steps += u64::from(steps);
            self.counters
                .decode_by_batch
                .record(seqs.len(), steps, duration_ns);
        }
        let steps = if prefill { 1 } else { steps };
        let riders = riders.unwrap_or_default();
        let prompts = seqs.len();
        for (index, seq) in seqs.into_iter().chain(riders).enumerate() {
            let Some(state) = self.seqs.get_mut(&seq) else {
                continue;
            };
            let reported = finished.iter().find(|f| f.seq == seq);
            if state.cancelled && reported.is_none() {
                // Cancelled mid-step: the engine still holds its cells.
                self.finish_seq(seq, true, actions);
                continue;
            }
            let emitted = match reported {
                Some(f) => f.tokens_emitted,
                None => state.emitted.saturating_add(steps),
            };
            let emitted = emitted.min(state.max_tokens);
            let batch = state.class == RequestClass::Batch;
            if index >= prompts {
                self.counters.rider_tokens += u64::from(emitted.saturating_sub(state.emitted));
            }
            if batch {
                self.counters.batch_tokens += u64::from(emitted.saturating_sub(state.emitted));
            }
            state.emitted = emitted;
            if index < prompts && prefill {
                state.phase = Phase::Decoding;
                let m = &mut self.models[done.model];
                if batch {
                    m.batch_decoding.insert(seq);
                } else {
                    m.decoding.insert(seq);
                    if state.kv == Kv::InCtx {
                        m.decoding_in_ctx.insert(seq);
                    }
                }
            }
            if reported.is_some() || state.emitted >= state.max_tokens {
                self.finish_seq(seq, false, actions);
            }
        }
    }

    /// Emits one engine action of online work and books everything it reserves.
    pub(crate) fn emit(&mut self, model: usize, work: Work, actions: &mut Vec<Action>) {
        self.emit_as(model, work, false, actions);
    }

    /// Emits one engine action, online or batch work (docs/pool.md §3.7), and books it.
    pub(crate) fn emit_as(
        &mut self,
        model: usize,
        work: Work,
        batch: bool,
        actions: &mut Vec<Action>,
    ) {
        self.check_classes(&work, batch);
        let id = ActionId(self.next_action);
        self.next_action += 1;
        let model_id = self.cfg.models[model].id.clone();
        let action = match &work {
            Work::Load => self.book_load(id, model, model_id, batch),
            Work::Evict => self.book_evict(id, model, model_id),
            Work::Save(seq) => self.book_save(id, model, model_id, *seq),
            Work::Restore(seq) => self.book_restore(id, model, model_id, *seq),
            Work::Prefill(seqs, riders) => self.book_prefill(id, model, model_id, seqs, riders),
            Work::Decode(seqs, steps) => self.book_decode(id, model, model_id, seqs, *steps),
        };
        match lane_of(&work) {
            Lane::Compute => {
                assert!(!self.compute_busy, "two compute actions in flight");
                self.compute_busy = true;
            }
            Lane::Transfer => {
                assert!(!self.transfer_busy, "two transfer actions in flight");
                self.transfer_busy = true;
            }
        }
        assert!(
            self.cfg.overlap_transfers || !(self.compute_busy && self.transfer_busy),
            "overlap without overlap_transfers"
        );
        self.models[model].busy += 1;
        let issued_ns = self.now_ns;
        self.in_flight.insert(
            id,
            InFlight {
                model,
                work,
                issued_ns,
                batch,
            },
        );
        actions.push(action);
    }

    fn book_evict(&mut self, id: ActionId, model: usize, model_id: ModelId) -> Action {
        let m = &mut self.models[model];
        assert_eq!(
            m.residency,
            Residency::Resident,
            "evict of a non-resident model"
        );
        assert_eq!(
            m.in_ctx, 0,
            "evict of a model with sequences in its context"
        );
        let pinned = self.cfg.models[model].pin;
        assert!(
            !pinned || self.cfg.policy == PoolPolicy::Dedicated,
            "evict of a pinned model"
        );
        m.residency = Residency::Evicting;
        Action::Evict {
            id,
            model: model_id,
        }
    }

    fn book_decode(
        &mut self,
        id: ActionId,
        model: usize,
        model_id: ModelId,
        seqs: &[SeqId],
        steps: u32,
    ) -> Action {
        let residency = self.models[model].residency;
        assert_eq!(
            residency,
            Residency::Resident,
            "decode of a non-resident model"
        );
        assert!(steps > 0, "decode of zero steps");
        for seq in seqs {
            let state = self.seqs.get_mut(seq);
            let ready = state
                .as_ref()
                .is_some_and(|s| s.kv == Kv::InCtx && !s.in_action);
            assert!(ready, "decode of a sequence not in the context");
            if let Some(state) = state {
                state.in_action = true;
            }
        }
        self.counters.decode_turns += 1;
        Action::Decode {
            id,
            model: model_id,
            seqs: seqs.to_vec(),
            steps,
        }
    }

    fn book_load(&mut self, id: ActionId, model: usize, model_id: ModelId, batch: bool) -> Action {
        let bytes = self.cfg.models[model].resident_bytes();
        let m = &mut self.models[model];
        assert_eq!(
            m.residency,
            Residency::Cold,
            "load of a model that is not cold"
        );
        m.residency = Residency::Loading;
        m.last_switch_ns = Some(self.now_ns);
        if !batch {
            // `token` spaces online switches from the last online load only.
            self.last_load_ns = Some(self.now_ns);
        }
        self.ledger.resident_bytes += bytes;
        self.counters.loads += 1;
        Action::Load {
            id,
            model: model_id,
        }
    }

    fn book_save(&mut self, id: ActionId, model: usize, model_id: ModelId, seq: SeqId) -> Action {
        let spec = &self.cfg.models[model];
        let Some(state) = self.seqs.get_mut(&seq) else {
            unreachable_state("save of an unknown sequence");
            return Action::Release {
                model: model_id,
                seq,
            };
        };
        assert_eq!(state.kv, Kv::InCtx, "save of a sequence not in the context");
        assert!(!state.in_action, "save of a sequence inside an action");
        // A batch sequence is preempted by dropping its cells: the engine keeps its tokens and
        // recomputes them on resume, so nothing is charged to the saved-KV pool.
        let bytes = if state.class == RequestClass::Batch {
            0
        } else {
            spec.saved_bytes(u64::from(state.prompt_tokens) + u64::from(state.emitted))
        };
        state.kv = Kv::Saving { bytes };
        state.in_action = true;
        self.models[model].decoding_in_ctx.remove(seq);
        self.models[model].saved_bytes += bytes;
        self.ledger.saved_bytes += bytes;
        Action::SaveKv {
            id,
            model: model_id,
            seq,
        }
    }

    fn book_restore(
        &mut self,
        id: ActionId,
        model: usize,
        model_id: ModelId,
        seq: SeqId,
    ) -> Action {
        let Some(state) = self.seqs.get_mut(&seq) else {
            unreachable_state("restore of an unknown sequence");
            return Action::Release {
                model: model_id,
                seq,
            };
        };
        let Kv::Saved { bytes } = state.kv else {
            unreachable_state("restore of a sequence that is not saved");
            return Action::Release {
                model: model_id,
                seq,
            };
        };
        assert!(!state.in_action, "restore of a sequence inside an action");
        state.kv = Kv::Restoring { bytes };
        state.in_action = true;
        self.ledger.ctx_kv_bytes += state.ctx_kv_bytes;
        let m = &mut self.models[model];
        assert_eq!(
            m.residency,
            Residency::Resident,
            "restore into a non-resident model"
        );
        m.in_ctx += 1;
        assert!(
            m.in_ctx <= self.cfg.models[model].seqs_max,
            "restore past the context's slots"
        );
        Action::RestoreKv {
            id,
            model: model_id,
            seq,
        }
    }

    fn book_prefill(
        &mut self,
        id: ActionId,
        model: usize,
        model_id: ModelId,
        seqs: &[SeqId],
        riders: &[SeqId],
    ) -> Action {
        for seq in riders {
            let state = self.seqs.get_mut(seq);
            let ready = state.as_ref().is_some_and(|s| {
                s.model == model && s.phase == Phase::Decoding && s.kv == Kv::InCtx && !s.in_action
            });
            assert!(ready, "a rider must be decoding in the prefill's context");
            if let Some(state) = state {
                state.in_action = true;
            }
        }
        let m = &mut self.models[model];
        assert_eq!(
            m.residency,
            Residency::Resident,
            "prefill of a non-resident model"
        );
        let mut online = 0_u32;
        for seq in seqs {
            let Some(state) = self.seqs.get_mut(seq) else {
                unreachable_state("prefill of an unknown sequence");
                continue;
            };
            if state.class == RequestClass::Online {
                assert_eq!(
                    m.prefill_q.front(),
                    Some(seq),
                    "prefill takes its model's queue in order"
                );
                m.prefill_q.pop_front();
                online += 1;
            }
            assert_eq!(
                state.phase,
                Phase::Queued,
                "prefill of a sequence not queued"
            );
            state.phase = Phase::Prefilling;
            state.kv = Kv::InCtx;
            state.in_action = true;
            self.ledger.ctx_kv_bytes += state.ctx_kv_bytes;
        }
        let count = u32::try_from(seqs.len()).unwrap_or(u32::MAX);
        m.in_ctx += count;
        assert!(
            m.in_ctx <= self.cfg.models[model].seqs_max,
            "prefill past the context's slots"
        );
        self.queued_len -= online;
        self.counters.prefills += 1;
        Action::Prefill {
            id,
            model: model_id,
            seqs: seqs.to_vec(),
            riders: riders.to_vec(),
        }
    }

    /// Bytes charged against `memory_bytes_max` now.
    pub fn memory_bytes_used(&self) -> u64 {
        let saved = if self.cfg.saved_kv_in_memory_budget {
            self.ledger.saved_bytes
        } else {
            0
        };
        self.ledger.resident_bytes + self.ledger.ctx_kv_bytes + saved
    }

    /// Bytes a load (or, with `kv_paged`, a sequence entering a context) may take now. Under
    /// `token` with saved states in the budget the whole saved pool is held back, so a victim's
    /// sequences can always be saved before it is evicted (without this headroom two full
    /// resident models deadlock: neither can be saved, so neither can leave).
    pub(crate) fn memory_bytes_free(&self) -> u64 {
        // The part of the saved pool not in use yet, held back beside what is charged now.
        let saved_pool_rest =
            if self.cfg.policy == PoolPolicy::Token && self.cfg.saved_kv_in_memory_budget {
                self.cfg
                    .kv_saved_bytes_max
                    .saturating_sub(self.ledger.saved_bytes)
            } else {
                0
            };
        self.cfg
            .memory_bytes_max
            .saturating_sub(self.memory_bytes_used().saturating_add(saved_pool_rest))
    }

    /// O(1) ledger bounds, on every event; the O(n) recount runs in debug builds.
    fn check_ledger(&self) {
        assert!(
            self.memory_bytes_used() <= self.cfg.memory_bytes_max,
            "memory budget exceeded"
        );
        assert!(
            self.ledger.saved_bytes <= self.cfg.kv_saved_bytes_max,
            "saved-KV pool exceeded"
        );
        assert!(
            self.kv_reserved_bytes <= self.cfg.kv_saved_bytes_max,
            "KV reservations exceed the pool"
        );
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
    }

    /// Recounts the ledger and every per-model count from scratch and asserts they match the
    /// incremental values, plus the legality invariants of docs/pool.md. O(models + sequences).
    pub fn check_invariants(&self) {
        let mut ledger = Ledger::default();
        for (i, m) in self.models.iter().enumerate() {
            if m.residency != Residency::Cold {
                ledger.resident_bytes += self.cfg.models[i].resident_bytes();
            }
        }
        let SeqRecount {
            in_ctx,
            saved,
            ctx_kv,
        } = self.recount_seqs();
        ledger.saved_bytes = saved.iter().sum();
        ledger.ctx_kv_bytes = ctx_kv;
        assert_eq!(
            ledger.ctx_kv_bytes, self.ledger.ctx_kv_bytes,
            "paged KV ledger drifted"
        );
        for m in &self.models {
            let in_ctx = m
                .decoding
                .iter()
                .filter(|s| self.seqs.get(s).is_some_and(|st| st.kv == Kv::InCtx));
            assert!(
                in_ctx.eq(m.decoding_in_ctx.iter()),
                "the in-context decoding set drifted"
            );
        }
        assert_eq!(
            ledger.resident_bytes, self.ledger.resident_bytes,
            "resident ledger drifted"
        );
        assert_eq!(
            ledger.saved_bytes, self.ledger.saved_bytes,
            "saved ledger drifted"
        );
        for (i, m) in self.models.iter().enumerate() {
            assert_eq!(m.in_ctx, in_ctx[i], "slot count drifted");
            assert_eq!(m.saved_bytes, saved[i], "per-model saved bytes drifted");
            assert!(
                m.in_ctx <= self.cfg.models[i].seqs_max,
                "context over its slots"
            );
        }
        let by_model = self.models.iter().fold(DecodeByBatch::default(), |sum, m| {
            sum.saturating_add(&m.decode_by_batch)
        });
        assert_eq!(
            by_model, self.counters.decode_by_batch,
            "per-model decode counters drifted"
        );
        let reserved: u64 = self.seqs.values().map(|s| s.reserved_bytes).sum();
        assert_eq!(reserved, self.kv_reserved_bytes, "KV reservations drifted");
        let queued = self
            .seqs
            .values()
            .filter(|s| {
                s.class == RequestClass::Online && matches!(s.phase, Phase::Pending | Phase::Queued)
            })
            .count();
        assert_eq!(
            u32::try_from(queued).ok(),
            Some(self.queued_len),
            "queue length drifted"
        );
        assert!(
            self.queued_len <= self.cfg.knobs.admission_queue_len_max,
            "admission queue over its bound"
        );
        self.check_batch_invariants();
    }

    /// Per-model context slots and saved bytes, and the paged KV in contexts, recounted from the
    /// sequences themselves (for `check_invariants`), checking each sequence's own legality on
    /// the way.
    fn recount_seqs(&self) -> SeqRecount {
        let n = self.models.len();
        let mut recount = SeqRecount {
            in_ctx: vec![0; n],
            saved: vec![0; n],
            ctx_kv: 0,
        };
        let SeqRecount {
            in_ctx,
            saved,
            ctx_kv,
        } = &mut recount;
        for state in self.seqs.values() {
            match state.kv {
                Kv::None => {}
                Kv::InCtx => in_ctx[state.model] += 1,
                Kv::Restoring { bytes } | Kv::Saving { bytes } => {
                    in_ctx[state.model] += 1;
                    saved[state.model] += bytes;
                }
                Kv::Saved { bytes } => saved[state.model] += bytes,
            }
            let in_context = state.kv.holds_slot();
            if in_context {
                *ctx_kv += state.ctx_kv_bytes;
            }
            assert!(
                self.cfg.kv_paged || state.ctx_kv_bytes == 0,
                "paged KV charged without kv_paged"
            );
            let residency = self.models[state.model].residency;
            assert!(
                !in_context || residency == Residency::Resident,
                "sequence cells in a model that is not resident"
            );
        }
        recount
    }

    /// The snapshot behind `GET /v1/pool`.
    pub fn status(&self) -> PoolStatus {
        let mut queued = vec![0_u32; self.models.len()];
        let mut in_flight = vec![0_u32; self.models.len()];
        let mut ctx_kv = vec![0_u64; self.models.len()];
        for state in self.seqs.values() {
            if state.class == RequestClass::Batch {
                if state.kv.holds_slot() {
                    ctx_kv[state.model] += state.ctx_kv_bytes;
                }
                continue;
            }
            match state.phase {
                Phase::Pending | Phase::Queued => queued[state.model] += 1,
                Phase::Prefilling | Phase::Decoding => in_flight[state.model] += 1,
            }
            if state.kv.holds_slot() {
                ctx_kv[state.model] += state.ctx_kv_bytes;
            }
        }
        let models = self
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let spec = &self.cfg.models[i];
                let resident = if m.residency == Residency::Cold {
                    0
                } else {
                    spec.resident_bytes()
                };
                ModelStatus {
                    model: spec.id.clone(),
                    state: m.residency,
                    pinned: spec.pin,
                    queued: queued[i],
                    in_flight: in_flight[i],
                    memory_bytes: resident + ctx_kv[i] + m.saved_bytes,
                    saved_kv_bytes: m.saved_bytes,
                    last_switch_ns: m.last_switch_ns,
                    last_used_ns: m.last_used_ns,
                    estimate: CostEstimate {
                        decode_step_ns: m.decode_step_ns,
                        load_ns: m.load_ns,
                        ..spec.estimate
                    },
                    decode_by_batch: m.decode_by_batch,
                }
            })
            .collect();
        PoolStatus {
            now_ns: self.now_ns,
            policy: self.cfg.policy,
            memory_bytes_max: self.cfg.memory_bytes_max,
            memory_bytes_used: self.memory_bytes_used(),
            kv_saved_bytes: self.ledger.saved_bytes,
            kv_saved_bytes_max: self.cfg.kv_saved_bytes_max,
            queued: self.queued_len,
            models,
            counters: self.counters,
            batch: self.batch_status(),
        }
    }

    /// The batch-class sequences now (part of [`Pool::status`], cheaper on its own).
    pub fn batch_status(&self) -> BatchStatus {
        let mut batch = BatchStatus {
            queue_max: self.cfg.knobs.batch_queue_max,
            ..BatchStatus::default()
        };
        if self.batch_len == 0 {
            return batch;
        }
        for state in self.seqs.values() {
            if state.class != RequestClass::Batch {
                continue;
            }
            if state.kv.holds_slot() {
                batch.in_flight += 1;
            } else if state.phase == Phase::Queued {
                batch.queued += 1;
            } else {
                batch.preempted += 1;
            }
        }
        batch
    }

    /// True when nothing is queued, running or in flight.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty() && self.in_flight.is_empty()
    }

    /// Sequences the pool still tracks (queued, running or saved).
    pub fn seqs_len(&self) -> usize {
        self.seqs.len()
    }
}

/// What `Pool::recount_seqs` finds, per model index.
struct SeqRecount {
    in_ctx: Vec<u32>,
    saved: Vec<u64>,
    /// All models together (the ledger keeps only the total).
    ctx_kv: u64,
}

pub(crate) fn lane_of(work: &Work) -> Lane {
    match work {
        Work::Prefill(..) | Work::Decode(..) => Lane::Compute,
        Work::Load | Work::Evict | Work::Save(_) | Work::Restore(_) => Lane::Transfer,
    }
}

/// Exponential average with weight 1/8 for the new sample.
fn ewma(old: u64, sample: u64) -> u64 {
    (old.saturating_mul(7).saturating_add(sample)) / 8
}

/// A state the bookkeeping rules out; asserts stay on in release (docs/pool.md, invariants).
/// Every message is non-empty, so this always fires (`panic!` is denied outside tests).
fn unreachable_state(what: &'static str) {
    assert!(what.is_empty(), "pool invariant violated: {what}");
}
