//! Property tests of the pool: seeded random event streams (arrivals, cancellations, jittered
//! action durations 0.5×–2× the estimates) drive the real `Pool` through a tiny fake engine
//! that keeps its own independent model of contexts and saved states and rejects any illegal
//! action. After every event: the ledger recount matches and the budget holds. At the end:
//! every admitted request finished (no starvation), within a bound, with token indices
//! 0..n emitted exactly once, and replaying the event log gives the identical action log.
//! The same streams run again with a share of batch-class requests (docs/pool.md §3.7): the
//! pool's own assertions (batch work never starts while an online request is in the pool,
//! classes never mix in an action) hold, and the batch finishes too.
//! Failures print the seed; replay one with `TIDEPOOL_SEED=n cargo nextest run -p tidepool-pool`.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness: a failed lookup is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidepool_pool::ModelId;
use tidepool_pool::{
    Action, ActionId, CostEstimate, Event, ModelSpec, Pool, PoolConfig, PoolError, PoolPolicy,
    RequestClass, SeqFinished, SeqId,
};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
struct Request {
    at_ns: u64,
    seq: SeqId,
    model: ModelId,
    prompt_tokens: u32,
    max_tokens: u32,
    class: RequestClass,
}

#[derive(Debug, Default)]
struct FakeEngine {
    /// Batch-class sequences: preempted ones keep only their tokens (no saved state bytes).
    batch: BTreeSet<SeqId>,
    loaded: BTreeSet<ModelId>,
    loading: BTreeSet<ModelId>,
    /// seq -> (model, tokens emitted so far) for sequences in a context.
    in_ctx: BTreeMap<SeqId, (ModelId, u32)>,
    /// seq -> (model, tokens emitted when saved).
    saved: BTreeMap<SeqId, (ModelId, u32)>,
    max_tokens: BTreeMap<SeqId, u32>,
    prompt_tokens: BTreeMap<SeqId, u32>,
    tokens: BTreeMap<SeqId, Vec<u32>>,
    compute: Option<(ActionId, ModelId)>,
    transfer: Option<(ActionId, ModelId)>,
}

struct Run {
    pool: Pool,
    engine: FakeEngine,
    queue: BTreeMap<(u64, u64), Event>,
    queue_seq: u64,
    log: Vec<Event>,
    actions: Vec<Action>,
    finished_at: BTreeMap<SeqId, u64>,
    rejected: BTreeSet<SeqId>,
    cancelled: BTreeSet<SeqId>,
    overlap: bool,
}

fn spec(i: usize, rng: &mut ChaCha8Rng) -> ModelSpec {
    let weights_bytes = rng.random_range(50..300) * MIB;
    let kv_bytes_per_token = rng.random_range(8_000..40_000);
    let seqs_max = rng.random_range(1..5);
    let seq_tokens_max = 512;
    ModelSpec {
        id: ModelId::new(format!("m{i}")).unwrap(),
        weights_bytes,
        ctx_bytes: u64::from(seqs_max) * u64::from(seq_tokens_max) * kv_bytes_per_token,
        kv_bytes_per_token,
        seqs_max,
        seq_tokens_max,
        pin: rng.random_bool(0.1),
        keep_alive_ms: if rng.random_bool(0.3) {
            Some(rng.random_range(0..2000))
        } else {
            None
        },
        estimate: CostEstimate {
            load_ns: rng.random_range(50..400) * 1_000_000,
            decode_step_ns: rng.random_range(5..40) * 1_000_000,
            prefill_ns_per_token: rng.random_range(1..5) * 1_000_000,
            kv_transfer_ps_per_byte: 200,
        },
    }
}

fn config(seed: u64, rng: &mut ChaCha8Rng) -> PoolConfig {
    let policy = [
        PoolPolicy::Dedicated,
        PoolPolicy::SwapLru,
        PoolPolicy::Token,
    ][usize::try_from(seed % 3).unwrap()];
    let mut models: Vec<ModelSpec> = (0..rng.random_range(1..6)).map(|i| spec(i, rng)).collect();
    // Paged KV: a context holds only its compute buffers; sequences are charged one by one.
    let kv_paged = rng.random_bool(0.4);
    if kv_paged {
        for m in &mut models {
            m.ctx_bytes = rng.random_range(1..16) * MIB;
        }
    }
    let largest = models.iter().map(|m| m.full_bytes(kv_paged)).max().unwrap();
    let pinned: u64 = models
        .iter()
        .filter(|m| m.pin)
        .map(|m| m.full_bytes(kv_paged))
        .sum();
    let kv_saved_bytes_max = rng.random_range(20..60) * MIB;
    let memory_bytes_max = largest + pinned + kv_saved_bytes_max + rng.random_range(0..600) * MIB;
    let mut cfg = PoolConfig::new(policy, memory_bytes_max, models);
    cfg.kv_paged = kv_paged;
    cfg.kv_saved_bytes_max = kv_saved_bytes_max;
    cfg.saved_kv_in_memory_budget = rng.random_bool(0.5);
    cfg.overlap_transfers = rng.random_bool(0.5);
    cfg.knobs.admission_queue_len_max = rng.random_range(4..64);
    cfg.knobs.decode_steps_min = rng.random_range(1..8);
    cfg.knobs.decode_steps_max = cfg.knobs.decode_steps_min + rng.random_range(0..64);
    cfg.knobs.hol_blocking = rng.random_bool(0.3);
    cfg.knobs.prefill_cold_lazy = rng.random_bool(0.5);
    cfg.knobs.round_resident_first = rng.random_bool(0.5);
    cfg.knobs.prefill_riders = rng.random_bool(0.7);
    cfg.knobs.ttft_slo_ms = rng.random_range(500..5000);
    cfg.knobs.tbt_slo_ms = rng.random_range(20..200);
    cfg.knobs.turn_quota_ms_max = rng.random_range(100..2000);
    cfg.knobs.alpha_admit_permille_max = if rng.random_bool(0.5) { 1000 } else { u32::MAX };
    cfg
}

fn requests(cfg: &PoolConfig, rng: &mut ChaCha8Rng) -> Vec<Request> {
    let mut at_ns = 0;
    (0..rng.random_range(1..120))
        .map(|i| {
            at_ns += rng.random_range(0..400) * 1_000_000;
            let model = &cfg.models[rng.random_range(0..cfg.models.len())];
            Request {
                at_ns,
                seq: SeqId(i),
                model: model.id.clone(),
                prompt_tokens: rng.random_range(1..200),
                max_tokens: rng.random_range(1..120),
                class: RequestClass::Online,
            }
        })
        .collect()
}

fn jitter(ns: u64, rng: &mut ChaCha8Rng) -> u64 {
    (ns * rng.random_range(50..200) / 100).max(1)
}

impl Run {
    fn push(&mut self, at_ns: u64, event: Event) {
        self.queue.insert((at_ns, self.queue_seq), event);
        self.queue_seq += 1;
    }

    fn feed(&mut self, event: Event, rng: &mut ChaCha8Rng) -> Result<(), PoolError> {
        let mut out = Vec::new();
        self.log.push(event.clone());
        let now_ns = event.now_ns();
        let result = self.pool.handle(event, &mut out);
        self.pool.check_invariants();
        let status = self.pool.status();
        assert!(
            status.memory_bytes_used <= status.memory_bytes_max,
            "budget exceeded"
        );
        for action in out {
            self.execute(&action, now_ns, rng);
            self.actions.push(action);
        }
        let held = self.engine_bytes();
        assert!(
            held <= status.memory_bytes_max,
            "the engine holds {held} bytes, over the budget {}",
            status.memory_bytes_max
        );
        if let Some(at) = self.pool.next_timer_ns()
            && at > now_ns
            && !self.queue.keys().any(|&(t, _)| t == at)
        {
            self.push(at, Event::Tick { now_ns: at });
        }
        result
    }

    /// Bytes the fake engine holds by its own count (the pool's ledger is not consulted):
    /// weights and contexts of loading or loaded models, each in-context sequence's worst-case
    /// KV when paged, saved states when they share the budget.
    fn engine_bytes(&self) -> u64 {
        let cfg = self.pool.config();
        let spec = |id: &ModelId| cfg.models.iter().find(|s| &s.id == id).unwrap();
        let models: u64 = self
            .engine
            .loaded
            .iter()
            .chain(&self.engine.loading)
            .map(|id| spec(id).resident_bytes())
            .sum();
        let worst = |seq: &SeqId| {
            u64::from(self.engine.prompt_tokens[seq]) + u64::from(self.engine.max_tokens[seq])
        };
        let paged: u64 = if cfg.kv_paged {
            self.engine
                .in_ctx
                .iter()
                .map(|(seq, (id, _))| spec(id).saved_bytes(worst(seq)))
                .sum()
        } else {
            0
        };
        let saved: u64 = if cfg.saved_kv_in_memory_budget {
            self.engine
                .saved
                .iter()
                .filter(|(seq, _)| !self.engine.batch.contains(seq))
                .map(|(seq, (id, n))| {
                    spec(id).saved_bytes(u64::from(self.engine.prompt_tokens[seq]) + u64::from(*n))
                })
                .sum()
        } else {
            0
        };
        models + paged + saved
    }

    fn lane_check(&mut self, id: ActionId, model: &ModelId, compute: bool) {
        let e = &mut self.engine;
        if compute {
            assert!(e.compute.is_none(), "two compute actions in flight");
            if let Some((_, m)) = &e.transfer {
                assert_ne!(m, model, "compute on a model with a transfer in flight");
            }
            e.compute = Some((id, model.clone()));
        } else {
            assert!(e.transfer.is_none(), "two transfers in flight");
            if let Some((_, m)) = &e.compute {
                assert_ne!(m, model, "transfer on a model that is computing");
            }
            e.transfer = Some((id, model.clone()));
        }
        assert!(
            self.overlap || e.compute.is_none() || e.transfer.is_none(),
            "overlap without overlap_transfers"
        );
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one arm per action kind of the fake engine"
    )]
    fn execute(&mut self, action: &Action, now_ns: u64, rng: &mut ChaCha8Rng) {
        match action {
            Action::Load { id, model } => {
                let load_ns = self
                    .pool
                    .config()
                    .models
                    .iter()
                    .find(|s| &s.id == model)
                    .unwrap()
                    .estimate
                    .load_ns;
                self.lane_check(*id, model, false);
                assert!(
                    !self.engine.loaded.contains(model)
                        && self.engine.loading.insert(model.clone()),
                    "double load"
                );
                let d = jitter(load_ns, rng);
                self.push(
                    now_ns + d,
                    Event::LoadFinished {
                        now_ns: now_ns + d,
                        action: *id,
                        duration_ns: d,
                    },
                );
            }
            Action::Evict { id, model } => {
                self.lane_check(*id, model, false);
                assert!(
                    self.engine.loaded.remove(model),
                    "evict of a model not loaded"
                );
                assert!(
                    self.engine.in_ctx.values().all(|(m, _)| m != model),
                    "evict with sequences in the context"
                );
                self.push(
                    now_ns + 1_000_000,
                    Event::UnloadFinished {
                        now_ns: now_ns + 1_000_000,
                        action: *id,
                    },
                );
            }
            Action::SaveKv { id, model, seq } => {
                self.lane_check(*id, model, false);
                assert!(
                    self.engine.loaded.contains(model),
                    "save from a model not loaded"
                );
                let (m, n) = self
                    .engine
                    .in_ctx
                    .remove(seq)
                    .expect("save of a sequence not in a context");
                assert_eq!(&m, model, "save from the wrong model");
                self.engine.saved.insert(*seq, (m, n));
                let d = jitter(2_000_000, rng);
                self.push(
                    now_ns + d,
                    Event::KvSaved {
                        now_ns: now_ns + d,
                        action: *id,
                        bytes: 1,
                    },
                );
            }
            Action::RestoreKv { id, model, seq } => {
                self.lane_check(*id, model, false);
                assert!(
                    self.engine.loaded.contains(model),
                    "restore into a model not loaded"
                );
                let (m, n) = self
                    .engine
                    .saved
                    .remove(seq)
                    .expect("restore of a sequence not saved");
                assert_eq!(&m, model, "restore into the wrong model");
                self.engine.in_ctx.insert(*seq, (m, n));
                let d = jitter(2_000_000, rng);
                self.push(
                    now_ns + d,
                    Event::KvRestored {
                        now_ns: now_ns + d,
                        action: *id,
                    },
                );
            }
            Action::Prefill {
                id,
                model,
                seqs,
                riders,
            } => self.prefill(*id, model, seqs, riders, now_ns, rng),
            Action::Decode {
                id,
                model,
                seqs,
                steps,
            } => self.decode(*id, model, seqs, *steps, now_ns, rng),
            Action::Release { model, seq } => {
                let a = self.engine.in_ctx.remove(seq);
                let b = self.engine.saved.remove(seq);
                assert!(
                    a.is_some() ^ b.is_some(),
                    "release of a sequence the engine does not hold"
                );
                assert_eq!(&a.or(b).unwrap().0, model, "release names the wrong model");
            }
        }
    }

    fn prefill(
        &mut self,
        id: ActionId,
        model: &ModelId,
        seqs: &[SeqId],
        riders: &[SeqId],
        now_ns: u64,
        rng: &mut ChaCha8Rng,
    ) {
        self.lane_check(id, model, true);
        assert!(
            self.engine.loaded.contains(model),
            "prefill on a model not loaded"
        );
        assert!(!seqs.is_empty(), "empty prefill");
        assert!(
            self.pool.config().knobs.prefill_riders || riders.is_empty(),
            "riders with prefill_riders off"
        );
        let mut finished = Vec::new();
        // Riders: decoding sequences of this model, one token each (a decode step of one).
        for seq in riders {
            assert!(!seqs.contains(seq), "a rider is also prefilled");
            let owed = self.engine.in_ctx.get(seq).map(|e| e.1) < Some(self.engine.max_tokens[seq]);
            assert!(owed, "a rider not in a context, or already finished");
            finished.extend(self.emit(*seq, model, 1));
        }
        for seq in seqs {
            assert!(!self.engine.tokens.contains_key(seq), "prefill twice");
            self.engine.in_ctx.insert(*seq, (model.clone(), 1));
            self.engine.tokens.insert(*seq, vec![0]);
            if self.engine.max_tokens[seq] == 1 {
                finished.push(SeqFinished {
                    seq: *seq,
                    tokens_emitted: 1,
                });
            }
        }
        self.retire(&finished);
        let d = jitter(10_000_000, rng);
        let event = Event::StepFinished {
            now_ns: now_ns + d,
            action: id,
            steps: 1,
            duration_ns: d,
            finished,
        };
        self.push(now_ns + d, event);
    }

    fn decode(
        &mut self,
        id: ActionId,
        model: &ModelId,
        seqs: &[SeqId],
        steps: u32,
        now_ns: u64,
        rng: &mut ChaCha8Rng,
    ) {
        self.lane_check(id, model, true);
        assert!(
            self.engine.loaded.contains(model),
            "decode on a model not loaded"
        );
        assert!(steps > 0 && !seqs.is_empty(), "empty decode");
        // A driver may cut a turn short at a step boundary (`Pool::decode_yield_wanted`): the
        // completion then reports the steps that ran. Do it at random, whatever the pool says.
        let steps = if rng.random_bool(0.2) {
            rng.random_range(1..=steps)
        } else {
            steps
        };
        let mut finished = Vec::new();
        for seq in seqs {
            finished.extend(self.emit(*seq, model, steps));
        }
        self.retire(&finished);
        let step_ns = self
            .pool
            .config()
            .models
            .iter()
            .find(|s| &s.id == model)
            .unwrap()
            .estimate
            .decode_step_ns;
        let d = jitter(step_ns * u64::from(steps), rng);
        let event = Event::StepFinished {
            now_ns: now_ns + d,
            action: id,
            steps,
            duration_ns: d,
            finished,
        };
        self.push(now_ns + d, event);
    }

    /// Emits up to `steps` tokens of `seq` (in `model`'s context); its finish if it reached
    /// its `max_tokens`.
    fn emit(&mut self, seq: SeqId, model: &ModelId, steps: u32) -> Option<SeqFinished> {
        let max = self.engine.max_tokens[&seq];
        let entry = self
            .engine
            .in_ctx
            .get_mut(&seq)
            .expect("a step of a sequence not in a context");
        assert_eq!(&entry.0, model, "a step of another model's sequence");
        for _ in 0..steps {
            if entry.1 >= max {
                break;
            }
            self.engine.tokens.get_mut(&seq).unwrap().push(entry.1);
            entry.1 += 1;
        }
        (entry.1 >= max).then_some(SeqFinished {
            seq,
            tokens_emitted: entry.1,
        })
    }

    fn retire(&mut self, finished: &[SeqFinished]) {
        for f in finished {
            self.engine.in_ctx.remove(&f.seq);
        }
    }

    fn complete(&mut self, event: &Event) {
        let id = match event {
            Event::LoadFinished { action, .. }
            | Event::UnloadFinished { action, .. }
            | Event::KvSaved { action, .. }
            | Event::KvRestored { action, .. }
            | Event::StepFinished { action, .. } => *action,
            _ => return,
        };
        if let Event::LoadFinished { .. } = event {
            let model = self.engine.transfer.as_ref().unwrap().1.clone();
            self.engine.loading.remove(&model);
            self.engine.loaded.insert(model);
        }
        if let Event::StepFinished {
            finished, now_ns, ..
        } = event
        {
            for f in finished {
                self.finished_at.insert(f.seq, *now_ns);
            }
        }
        if self.engine.compute.as_ref().is_some_and(|(a, _)| *a == id) {
            self.engine.compute = None;
        } else {
            assert_eq!(
                self.engine.transfer.as_ref().map(|t| t.0),
                Some(id),
                "completion of an unknown action"
            );
            self.engine.transfer = None;
        }
    }
}

/// One seeded run; returns the event log and action log for the replay check.
#[expect(
    clippy::too_many_lines,
    reason = "the whole driver loop of one seeded run"
)]
fn run(
    seed: u64,
    batch_share: f64,
) -> (
    PoolConfig,
    Vec<Event>,
    Vec<Action>,
    tidepool_pool::PoolCounters,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cfg = config(seed, &mut rng);
    let mut requests = requests(&cfg, &mut rng);
    // Classes from a stream of their own, so the online streams stay those of `batch_share` 0.
    let mut classes = ChaCha8Rng::seed_from_u64(seed ^ 0xba7c_4000);
    for req in &mut requests {
        if batch_share > 0.0 && classes.random_bool(batch_share) {
            req.class = RequestClass::Batch;
        }
    }
    let overlap = cfg.overlap_transfers;
    let mut r = Run {
        pool: Pool::new(cfg.clone()).unwrap(),
        engine: FakeEngine::default(),
        queue: BTreeMap::new(),
        queue_seq: 0,
        log: Vec::new(),
        actions: Vec::new(),
        finished_at: BTreeMap::new(),
        rejected: BTreeSet::new(),
        cancelled: BTreeSet::new(),
        overlap,
    };
    for req in &requests {
        r.engine.max_tokens.insert(req.seq, req.max_tokens);
        r.engine.prompt_tokens.insert(req.seq, req.prompt_tokens);
        if req.class == RequestClass::Batch {
            r.engine.batch.insert(req.seq);
        }
        let event = Event::RequestArrived {
            now_ns: req.at_ns,
            seq: req.seq,
            model: req.model.clone(),
            prompt_tokens: req.prompt_tokens,
            max_tokens: req.max_tokens,
            class: req.class,
            cached_tokens: 0,
        };
        r.push(req.at_ns, event);
        if rng.random_bool(0.05) {
            let at = req.at_ns + rng.random_range(0..3000) * 1_000_000;
            r.push(
                at,
                Event::Cancelled {
                    now_ns: at,
                    seq: req.seq,
                },
            );
        }
        if rng.random_bool(0.05) {
            // An operator's load or unload of a random model at a random time.
            let at = req.at_ns + rng.random_range(0..3000) * 1_000_000;
            let model = cfg.models[rng.random_range(0..cfg.models.len())].id.clone();
            let event = if rng.random_bool(0.5) {
                Event::LoadRequested { now_ns: at, model }
            } else {
                Event::UnloadRequested { now_ns: at, model }
            };
            r.push(at, event);
        }
    }
    let mut events_max = 200_000;
    while let Some(((_, _), event)) = r.queue.pop_first() {
        events_max -= 1;
        assert!(
            events_max > 0,
            "seed {seed}: livelock (event budget exhausted); last actions {:?}; {:?}",
            &r.actions[r.actions.len().saturating_sub(12)..],
            r.pool.status()
        );
        r.complete(&event);
        let (seq, arrival) = match &event {
            Event::RequestArrived { seq, .. } => (Some(*seq), true),
            Event::Cancelled { seq, .. } => (Some(*seq), false),
            _ => (None, false),
        };
        let result = r.feed(event, &mut rng);
        match (result, seq) {
            (Ok(()), Some(seq)) if !arrival => {
                r.cancelled.insert(seq);
            }
            (Ok(()), _)
            | (Err(PoolError::ModelBusy { .. } | PoolError::ModelTooLarge { .. }), None) => {}
            (
                Err(
                    PoolError::QueueFull { .. }
                    | PoolError::BatchQueueFull { .. }
                    | PoolError::ModelTooLarge { .. },
                ),
                Some(seq),
            ) if arrival => {
                r.rejected.insert(seq);
            }
            (Err(e), _) => panic!("seed {seed}: unexpected error {e}"),
        }
    }
    assert!(
        r.pool.is_idle(),
        "seed {seed}: work left with no event pending (starvation or deadlock): {:?}",
        r.pool.status()
    );
    check_outcomes(seed, &cfg, &requests, &r);
    let counters = r.pool.counters();
    (cfg, r.log, r.actions, counters)
}

fn check_outcomes(seed: u64, cfg: &PoolConfig, requests: &[Request], r: &Run) {
    // Bound: everything serialised (every request loading its model twice, prefilling and
    // decoding alone at 2× the estimate, plus a save/restore per step group) from its arrival.
    let per_request: u64 = cfg
        .models
        .iter()
        .map(|m| {
            4 * m.estimate.load_ns
                + 2 * 200 * 10_000_000
                + 2 * 120 * m.estimate.decode_step_ns * 2
                + 1_000_000_000
        })
        .max()
        .unwrap();
    let bound = per_request * u64::try_from(requests.len()).unwrap() + 3_000_000_000;
    for req in requests {
        if r.rejected.contains(&req.seq) {
            continue;
        }
        let tokens = r.engine.tokens.get(&req.seq);
        if r.cancelled.contains(&req.seq) && !r.finished_at.contains_key(&req.seq) {
            // A cancelled request may have emitted some prefix, never a repeat.
            if let Some(t) = tokens {
                assert!(
                    t.iter().copied().eq(0..u32::try_from(t.len()).unwrap()),
                    "seed {seed}: tokens {t:?}"
                );
            }
            continue;
        }
        let done = r
            .finished_at
            .get(&req.seq)
            .unwrap_or_else(|| panic!("seed {seed}: {} never finished", req.seq));
        assert!(
            *done - req.at_ns <= bound,
            "seed {seed}: {} took {} ns > bound {bound}",
            req.seq,
            done - req.at_ns
        );
        let t = tokens.unwrap();
        assert!(
            t.iter().copied().eq(0..req.max_tokens),
            "seed {seed}: {} emitted {t:?}",
            req.seq
        );
    }
    let counters = r.pool.counters();
    if cfg.policy != PoolPolicy::Token {
        assert_eq!(
            counters.kv_saves, 0,
            "seed {seed}: request-level policies never preempt"
        );
    }
    if cfg.policy == PoolPolicy::Dedicated {
        assert_eq!(counters.evictions, 0, "seed {seed}: dedicated never evicts");
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("TIDEPOOL_SEED") {
        Ok(seed) => vec![seed.parse().unwrap()],
        Err(_) => (0..300).collect(),
    }
}

#[test]
fn random_event_streams_keep_every_invariant() {
    let (mut saves, mut restores, mut swap_evictions, mut cancels) = (0, 0, 0, 0);
    let (mut paged_saves, mut paged_evictions) = (0, 0);
    for seed in seeds() {
        println!("seed {seed}");
        let (cfg, _, _, counters) = run(seed, 0.0);
        if cfg.policy == PoolPolicy::Token {
            saves += counters.kv_saves;
            restores += counters.kv_restores;
            if cfg.kv_paged {
                paged_saves += counters.kv_saves;
            }
        }
        if cfg.policy == PoolPolicy::SwapLru && cfg.kv_paged {
            paged_evictions += counters.evictions;
        }
        if cfg.policy == PoolPolicy::SwapLru {
            swap_evictions += counters.evictions;
        }
        cancels += counters.requests_cancelled;
    }
    println!(
        "token saves {saves} restores {restores}; swap-lru evictions {swap_evictions}; cancels {cancels}; \
         paged: token saves {paged_saves}, swap-lru evictions {paged_evictions}"
    );
    if std::env::var("TIDEPOOL_SEED").is_err() {
        // The streams must actually exercise preemption, eviction and cancellation.
        assert!(
            saves > 100
                && restores > 100
                && swap_evictions > 100
                && cancels > 50
                && paged_saves > 30
                && paged_evictions > 30,
            "weak coverage"
        );
    }
}

#[test]
fn replayed_events_give_identical_actions() {
    for seed in seeds().into_iter().take(60) {
        let (cfg, log, actions, _) = run(seed, 0.3);
        let mut pool = Pool::new(cfg).unwrap();
        let mut replayed = Vec::new();
        for event in log {
            let _ignored = pool.handle(event, &mut replayed);
        }
        assert_eq!(replayed, actions, "seed {seed}: replay diverged");
    }
}

#[test]
fn random_event_streams_with_a_batch_keep_every_invariant() {
    let (mut preemptions, mut resumes, mut finished) = (0, 0, 0);
    for seed in seeds() {
        let (_, _, _, counters) = run(seed, 0.3);
        preemptions += counters.batch_preemptions;
        resumes += counters.batch_resumes;
        finished += counters.batch_finished;
    }
    println!("batch: {finished} finished, {preemptions} preemptions, {resumes} resumes");
    if std::env::var("TIDEPOOL_SEED").is_err() {
        assert!(
            finished > 1000 && preemptions > 100 && resumes > 100,
            "weak coverage"
        );
    }
}
