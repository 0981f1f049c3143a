//! `tidepool-runtime` runs the model pool on a real engine. One OS thread per accelerator owns a
//! `tidepool-engine` [`Accelerator`] (llama.cpp weights and contexts, which are not `Send`) and
//! carries out the actions of a `tidepool-pool` [`Pool`]; request threads admit into the same
//! pool under a short lock, so admission errors (queue full, model over the budget) are
//! synchronous. Every pooled model is a [`TextEngine`] the gateway serves like any other.
//!
//! A watchdog thread restarts the accelerator thread when it stops (a panic): running requests
//! end with `EngineError::Restarted`, queued ones are admitted again to a rebuilt pool, and every
//! restart is counted, logged and broadcast ([`PoolRuntime::subscribe_restarts`]).
//!
//! It depends on the pool and the engine, never on the gateway or the ledger. Read
//! [`PoolRuntime::start`] first, then the thread loop in [`driver`](crate::driver) and the
//! [`watchdog`](crate::watchdog).
#![forbid(unsafe_code)]

mod driver;
mod metrics;
mod phases;
mod watchdog;

pub use metrics::{SWITCH_SECONDS, SWITCH_SECONDS_BUCKETS};
pub use phases::SwitchPhases;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tidepool_core::{ModelId, PoolPolicy, PoolSection, TokenCount};
use tidepool_engine::multi::{
    Accelerator, Calibration, ModelFrontEnd, MultiModelConfig, PrefixHints, PreparedSeq,
    TokenDeadlines,
};
use tidepool_engine::watchdog::{
    Backoff, EngineHealth, EngineRestart, Heartbeat, RESTART_NOTICES_BUFFERED_MAX, WatchdogConfig,
};
use tidepool_engine::{
    ChatMessage, EngineError, EngineStats, GenerateRequest, Generation, TextEngine, TokenId,
};
use tidepool_pool::{
    Action, CostEstimate, Event, ModelSpec, Pool, PoolConfig, PoolError, PoolStatus, SeqId,
};
use tokio::sync::broadcast;

/// One model of the pool.
#[derive(Debug, Clone)]
pub struct PooledModelConfig {
    pub engine: MultiModelConfig,
    /// Never evicted once loaded.
    pub pin: bool,
    /// Unloaded after this long without work (scale to zero); `None` = until memory is needed.
    pub keep_alive_ms: Option<u64>,
}

/// How the pool runs: `[pool]` of the server's configuration (policy, budget, and the
/// scheduler's knobs: SLOs, the admission queue, turn bounds) and the models.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `[pool]` as configured (`enabled` is the caller's business: a runtime is the pool).
    pub pool: PoolSection,
    /// `Retry-After` hint of a full queue.
    pub overload_retry_after_ms: u32,
    pub models: Vec<PooledModelConfig>,
    /// Restart backoff and heartbeat bound of the accelerator thread (`[engine]`).
    pub watchdog: WatchdogConfig,
}

impl RuntimeConfig {
    /// `policy` with the `[pool]` defaults.
    pub fn new(policy: PoolPolicy, models: Vec<PooledModelConfig>) -> Self {
        Self {
            pool: PoolSection {
                policy,
                ..PoolSection::default()
            },
            overload_retry_after_ms: 1000,
            models,
            watchdog: WatchdogConfig::default(),
        }
    }
}

/// The pooled models of one accelerator and the thread that runs them. Dropping the last
/// handle stops the thread after its current action, and its watchdog.
#[derive(Debug)]
pub struct PoolRuntime {
    shared: Arc<Shared>,
    fronts: Vec<Arc<ModelFrontEnd>>,
    calibrations: Vec<Calibration>,
    overhead: PoolOverhead,
    /// The watchdog's inbox.
    signals: SyncSender<Signal>,
    notices: broadcast::Sender<EngineRestart>,
    /// Each model's `pin`, in configuration order.
    pins: Vec<bool>,
}

/// Resident memory of the pooled models that the budget does not charge, in bytes, measured at
/// start-up (see docs/pool.md §6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolOverhead {
    /// What the start-up calibration left resident after freeing every model again (allocator
    /// arenas, llama.cpp's threads): already in the cold process.
    pub calibration_residue_bytes: u64,
    /// What the process may hold above `memory_bytes_max` while models switch: allocator slack
    /// (freed compute buffers and saved states the allocator keeps for reuse), from the
    /// measured per-model extras and the saved-KV pool.
    pub pool_overhead_bytes: u64,
}

/// What the watchdog hears.
pub(crate) enum Signal {
    /// The accelerator thread caught a panic and stops; what it salvaged comes along.
    Exited {
        salvage: Option<tidepool_engine::multi::Salvage>,
        reason: String,
    },
    /// Restart now instead of waiting out the backoff (fault-injection tests).
    #[cfg_attr(
        not(feature = "fault-injection"),
        expect(dead_code, reason = "sent only by the fault-injection API")
    )]
    RestartNow,
    /// The runtime was dropped.
    Shutdown,
}

/// What the request threads and the accelerator thread share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) core: Mutex<Core>,
    pub(crate) wake: Condvar,
    epoch: Instant,
    /// Model ids in accelerator order (the order of `RuntimeConfig::models`).
    pub(crate) model_ids: Vec<ModelId>,
    pub(crate) index: BTreeMap<ModelId, usize>,
    /// Each model's last switch, phase by phase, in accelerator order.
    pub(crate) switches: Mutex<Vec<SwitchPhases>>,
    /// Each model's recent prompts, in accelerator order: the cached-prefix hint a request
    /// arrives at the pool with (cleared when the model's KV goes).
    pub(crate) prefix_hints: Vec<Mutex<PrefixHints>>,
    slo: (Duration, Duration),
    retry_after_ms: u32,
    /// Stamped by the accelerator thread between actions and decode steps.
    pub(crate) heartbeat: Heartbeat,
    /// The accelerator thread runs (false from its death to its restart).
    pub(crate) alive: AtomicBool,
    /// Restarts since start-up.
    pub(crate) restarts: AtomicU64,
    heartbeat_stale: Duration,
    /// Why each model's last load failed (`None`: it loaded, or was never loaded), in
    /// accelerator order.
    pub(crate) load_failures: Mutex<Vec<Option<String>>>,
    /// A panic is wanted at the accelerator thread's next step (only `fault-injection` builds
    /// can arm it).
    fault_armed: AtomicBool,
}

impl Shared {
    /// The accelerator thread's health, for `/readyz` and the watchdog.
    pub(crate) fn health(&self) -> EngineHealth {
        EngineHealth {
            alive: self.alive.load(Ordering::Acquire),
            heartbeat_age: self.heartbeat.age(),
            heartbeat_stale: self.heartbeat_stale,
            restarts: self.restarts.load(Ordering::Acquire),
        }
    }

    /// Where the accelerator thread may be made to panic: a no-op unless a fault was armed,
    /// which only a `fault-injection` build can do ([`PoolRuntime::inject_panic`]).
    pub(crate) fn fault_point(&self) {
        let armed = self.fault_armed.swap(false, Ordering::AcqRel);
        assert!(!armed, "injected fault: the accelerator thread panics");
    }

    /// Nanoseconds since the runtime started: the pool's clock. Read it under the core lock
    /// so events reach the pool in clock order.
    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// State behind the lock.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) pool: Pool,
    /// Actions the pool emitted that the accelerator thread has not taken yet.
    pub(crate) actions: Vec<Action>,
    /// Admitted requests the accelerator thread has not registered yet (always taken before
    /// `actions`, which may refer to them).
    pub(crate) arrivals: Vec<Arrival>,
    next_seq: u64,
    pub(crate) shutdown: bool,
}

#[derive(Debug)]
pub(crate) struct Arrival {
    pub(crate) seq: SeqId,
    pub(crate) model: usize,
    pub(crate) prepared: PreparedSeq,
    pub(crate) deadlines: TokenDeadlines,
}

impl PoolRuntime {
    /// Opens every model's vocabulary, starts the accelerator thread, measures each model on it
    /// (load time, sizes, step costs: the pool's estimates), builds the pool and returns the
    /// runtime once the thread is ready. Blocks for the calibration (seconds): call it from a
    /// blocking context.
    #[expect(
        clippy::too_many_lines,
        reason = "the start-up handshake with the accelerator thread, in order"
    )]
    pub fn start(config: &RuntimeConfig) -> Result<Arc<Self>, EngineError> {
        let fronts = config
            .models
            .iter()
            .map(|m| ModelFrontEnd::open(m.engine.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let engine_configs: Vec<MultiModelConfig> =
            config.models.iter().map(|m| m.engine.clone()).collect();
        let (calibrated_tx, calibrated_rx) = sync_channel(1);
        let (shared_tx, shared_rx) = sync_channel::<Arc<Shared>>(1);
        let (signals_tx, signals_rx) = sync_channel(watchdog::SIGNALS_BUFFERED_MAX);
        let thread_configs = engine_configs.clone();
        let thread_signals = signals_tx.clone();
        let thread = std::thread::Builder::new()
            .name("tidepool-accelerator".to_owned())
            .spawn(move || {
                driver::run(&thread_configs, &calibrated_tx, &shared_rx, &thread_signals);
            })
            .map_err(|e| EngineError::Load {
                path: std::path::PathBuf::new(),
                reason: format!("cannot start the accelerator thread: {e}"),
            })?;
        let driver::Calibrated {
            calibrations,
            residue_bytes,
        } = calibrated_rx.recv().map_err(|_| thread_gone())??;
        let pool_config = pool_config(&config.pool, model_specs(config, &calibrations));
        let overhead = PoolOverhead {
            calibration_residue_bytes: residue_bytes,
            pool_overhead_bytes: pool_overhead_bytes(&pool_config, &calibrations),
        };
        let pool = Pool::new(pool_config).map_err(|e| EngineError::Load {
            path: std::path::PathBuf::new(),
            reason: e.to_string(),
        })?;
        let model_ids: Vec<ModelId> = config
            .models
            .iter()
            .map(|m| m.engine.model_id.clone())
            .collect();
        let index = model_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                pool,
                actions: Vec::new(),
                arrivals: Vec::new(),
                next_seq: 1,
                shutdown: false,
            }),
            wake: Condvar::new(),
            epoch: Instant::now(),
            switches: Mutex::new(vec![SwitchPhases::default(); model_ids.len()]),
            prefix_hints: fronts
                .iter()
                .map(|front| Mutex::new(front.prefix_hints()))
                .collect(),
            model_ids,
            index,
            slo: (
                Duration::from_millis(config.pool.knobs.ttft_slo_ms),
                Duration::from_millis(config.pool.knobs.tbt_slo_ms),
            ),
            retry_after_ms: config.overload_retry_after_ms,
            heartbeat: Heartbeat::new(),
            alive: AtomicBool::new(true),
            restarts: AtomicU64::new(0),
            heartbeat_stale: config.watchdog.heartbeat_stale,
            load_failures: Mutex::new(vec![None; config.models.len()]),
            fault_armed: AtomicBool::new(false),
        });
        shared.heartbeat.beat();
        shared_tx
            .send(Arc::clone(&shared))
            .map_err(|_| thread_gone())?;
        {
            // The first event: dedicated loads everything, the others nothing yet.
            let mut core = shared.core.lock();
            let now_ns = shared.now_ns();
            let mut actions = Vec::new();
            core.pool
                .handle(Event::Tick { now_ns }, &mut actions)
                .map_err(|e| scheduler_error(&e))?;
            core.actions.extend(actions);
        }
        shared.wake.notify_one();
        for (model, calibration) in config.models.iter().zip(&calibrations) {
            tracing::info!(model = %model.engine.model_id, ?calibration, "pooled model calibrated");
        }
        tracing::info!(?overhead, "pool memory overhead measured");
        let (notices, _) = broadcast::channel(RESTART_NOTICES_BUFFERED_MAX);
        let watchdog = watchdog::Watchdog {
            shared: Arc::clone(&shared),
            configs: engine_configs,
            calibrations: calibrations.clone(),
            signals_tx: signals_tx.clone(),
            signals: signals_rx,
            thread: Some(thread),
            started: Instant::now(),
            backoff: Backoff::new(&config.watchdog),
            notices: notices.clone(),
            owed: tidepool_engine::multi::Salvage::default(),
            stuck_reported: false,
        };
        std::thread::Builder::new()
            .name("tidepool-watchdog".to_owned())
            .spawn(move || watchdog.run())
            .map_err(|e| EngineError::Load {
                path: std::path::PathBuf::new(),
                reason: format!("cannot start the watchdog thread: {e}"),
            })?;
        Ok(Arc::new(Self {
            shared,
            fronts,
            calibrations,
            overhead,
            signals: signals_tx,
            notices,
            pins: config.models.iter().map(|m| m.pin).collect(),
        }))
    }

    /// One [`TextEngine`] per pooled model, in configuration order.
    pub fn engines(self: &Arc<Self>) -> Vec<Arc<dyn TextEngine>> {
        (0..self.fronts.len())
            .filter_map(|model| {
                let front = Arc::clone(self.fronts.get(model)?);
                let engine: Arc<dyn TextEngine> = Arc::new(PooledEngine {
                    runtime: Arc::clone(self),
                    front,
                    model,
                });
                Some(engine)
            })
            .collect()
    }

    /// A receiver of every later restart of the accelerator thread (for the audit log and
    /// alerts). A subscriber more than [`RESTART_NOTICES_BUFFERED_MAX`] notices behind loses the
    /// oldest (`RecvError::Lagged`); a restart never waits for a subscriber.
    pub fn subscribe_restarts(&self) -> broadcast::Receiver<EngineRestart> {
        self.notices.subscribe()
    }

    /// The accelerator thread's liveness: alive, and how long since its last heartbeat.
    pub fn health(&self) -> EngineHealth {
        self.shared.health()
    }

    /// `/readyz`: the accelerator thread's health check, and for each pinned model whether it
    /// can be loaded (its file is there and its last load did not fail), in configuration order.
    pub fn readiness(&self) -> PoolReadiness {
        let failures = self.shared.load_failures.lock().clone();
        let pinned = self
            .fronts
            .iter()
            .zip(&self.pins)
            .zip(failures)
            .filter(|((_, pin), _)| **pin)
            .map(|((front, _), failure)| {
                let path = &front.config().path;
                let check = if !path.is_file() {
                    Err(format!("its file {} is missing", path.display()))
                } else if let Some(failure) = failure {
                    Err(format!("its last load failed: {failure}"))
                } else {
                    Ok(())
                };
                (front.model_id().clone(), check)
            })
            .collect();
        PoolReadiness {
            accelerator: self.health().check(),
            pinned,
        }
    }

    /// Makes the accelerator thread panic at its next step (between actions or decode steps),
    /// as a crash would: the watchdog's test hook.
    #[cfg(feature = "fault-injection")]
    pub fn inject_panic(&self) {
        self.shared.fault_armed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }

    /// Cuts a pending restart's backoff short (tests that set a long backoff to observe the
    /// dead thread).
    #[cfg(feature = "fault-injection")]
    pub fn restart_now(&self) {
        if self.signals.try_send(Signal::RestartNow).is_err() {
            tracing::debug!("the watchdog's inbox is full or closed");
        }
    }

    /// The pool's state (`GET /v1/pool`).
    pub fn status(&self) -> PoolStatus {
        self.shared.core.lock().pool.status()
    }

    /// What was measured for each model at start-up, in configuration order.
    pub fn calibrations(&self) -> impl Iterator<Item = (&ModelId, &Calibration)> {
        self.shared.model_ids.iter().zip(&self.calibrations)
    }

    /// Each model's last switch, phase by phase, in configuration order.
    pub fn switch_phases(&self) -> impl Iterator<Item = (&ModelId, SwitchPhases)> {
        let switches = self.shared.switches.lock().clone();
        self.shared.model_ids.iter().zip(switches)
    }

    /// Resident memory the budget does not charge, measured at start-up.
    pub fn overhead(&self) -> PoolOverhead {
        self.overhead
    }

    /// An operator's load (a hint: the model loads when nothing more urgent needs the engine).
    pub fn request_load(&self, model: &ModelId) -> Result<(), PoolError> {
        self.admin(|now_ns| Event::LoadRequested {
            now_ns,
            model: model.clone(),
        })
    }

    /// An operator's unload; `PoolError::ModelBusy` unless the model is idle.
    pub fn request_unload(&self, model: &ModelId) -> Result<(), PoolError> {
        self.admin(|now_ns| Event::UnloadRequested {
            now_ns,
            model: model.clone(),
        })
    }

    fn admin(&self, event: impl FnOnce(u64) -> Event) -> Result<(), PoolError> {
        let mut core = self.shared.core.lock();
        let now_ns = self.shared.now_ns();
        let mut actions = Vec::new();
        core.pool.handle(event(now_ns), &mut actions)?;
        core.actions.extend(actions);
        drop(core);
        self.shared.wake.notify_one();
        Ok(())
    }

    fn submit(
        &self,
        model: usize,
        front: &ModelFrontEnd,
        request: GenerateRequest,
    ) -> Result<Generation, EngineError> {
        let arrived = Instant::now();
        let (prepared, generation) = front.prepare(request)?;
        let cached_tokens = self.shared.prefix_hints.get(model).map_or(0, |hints| {
            prepared.expected_cached_tokens(&mut hints.lock())
        });
        let (ttft, tbt) = self.shared.slo;
        let mut core = self.shared.core.lock();
        if core.shutdown {
            return Err(EngineError::ShutDown);
        }
        let seq = SeqId(core.next_seq);
        core.next_seq += 1;
        let now_ns = self.shared.now_ns();
        let mut actions = Vec::new();
        let event = Event::RequestArrived {
            now_ns,
            seq,
            model: front.model_id().clone(),
            prompt_tokens: prepared.prompt_tokens(),
            max_tokens: prepared.max_tokens(),
            class: prepared.class(),
            cached_tokens,
        };
        if let Err(error) = core.pool.handle(event, &mut actions) {
            metrics::rejected(front.model_id(), &error);
            return Err(self.admission_error(error, &prepared));
        }
        core.arrivals.push(Arrival {
            seq,
            model,
            prepared,
            deadlines: TokenDeadlines { arrived, ttft, tbt },
        });
        core.actions.extend(actions);
        drop(core);
        self.shared.wake.notify_one();
        Ok(generation)
    }

    fn admission_error(&self, error: PoolError, prepared: &PreparedSeq) -> EngineError {
        match error {
            PoolError::QueueFull { .. } | PoolError::BatchQueueFull { .. } => {
                EngineError::Overloaded {
                    retry_after_ms: self.shared.retry_after_ms,
                }
            }
            PoolError::ModelTooLarge {
                bytes_needed,
                memory_bytes_max,
                ..
            } => EngineError::ExceedsMemoryBudget {
                bytes_needed,
                memory_bytes_max,
            },
            PoolError::RequestTooLong { seq_tokens_max, .. } => {
                EngineError::ContextLengthExceeded {
                    prompt_tokens: prepared.prompt_tokens(),
                    max_tokens: prepared.max_tokens(),
                    context_tokens: seq_tokens_max,
                }
            }
            other => scheduler_error(&other),
        }
    }

    fn model_stats(&self, model: &ModelId) -> EngineStats {
        let status = self.status();
        status
            .models
            .iter()
            .find(|m| &m.model == model)
            .map_or_else(EngineStats::default, |m| EngineStats {
                queued: m.queued,
                active: m.in_flight,
            })
    }
}

impl Drop for PoolRuntime {
    fn drop(&mut self) {
        self.shared.core.lock().shutdown = true;
        self.shared.wake.notify_one();
        if self.signals.try_send(Signal::Shutdown).is_err() {
            tracing::debug!("the watchdog's inbox is full or closed; it sees the shutdown flag");
        }
    }
}

/// What `/readyz` needs of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReadiness {
    /// The accelerator thread is alive and its heartbeat fresh, else why not.
    pub accelerator: Result<(), String>,
    /// Each pinned model and whether it can be loaded, else why not.
    pub pinned: Vec<(ModelId, Result<(), String>)>,
}

impl PoolReadiness {
    pub fn is_ready(&self) -> bool {
        self.accelerator.is_ok() && self.pinned.iter().all(|(_, check)| check.is_ok())
    }
}

/// One pooled model as the gateway sees it.
#[derive(Debug)]
struct PooledEngine {
    runtime: Arc<PoolRuntime>,
    front: Arc<ModelFrontEnd>,
    model: usize,
}

impl TextEngine for PooledEngine {
    fn model_id(&self) -> &ModelId {
        self.front.model_id()
    }

    fn context_tokens(&self) -> TokenCount {
        self.front.context_tokens()
    }

    fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.front.apply_chat_template(messages)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<TokenId>, EngineError> {
        self.front.tokenize(text)
    }

    fn submit(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        self.runtime.submit(self.model, &self.front, request)
    }

    fn stats(&self) -> EngineStats {
        self.runtime.model_stats(self.front.model_id())
    }
}

/// The pool's models: configured limits, measured sizes and costs.
fn model_specs(config: &RuntimeConfig, calibrations: &[Calibration]) -> Vec<ModelSpec> {
    config
        .models
        .iter()
        .zip(calibrations)
        .map(|(model, cal)| ModelSpec {
            id: model.engine.model_id.clone(),
            weights_bytes: cal.weights_bytes,
            ctx_bytes: cal.ctx_bytes,
            kv_bytes_per_token: cal.kv_bytes_per_token,
            seqs_max: model.engine.seqs_max,
            seq_tokens_max: model.engine.context_tokens,
            pin: model.pin,
            keep_alive_ms: model.keep_alive_ms,
            estimate: CostEstimate {
                load_ns: cal.load_ns,
                decode_step_ns: cal.decode_step_ns,
                prefill_ns_per_token: cal.prefill_ns_per_token,
                kv_transfer_ps_per_byte: cal.kv_transfer_ps_per_byte,
            },
        })
        .collect()
}

/// The pool the server runs for `[pool]` and these models: the section's policy and knobs as
/// they are, its budget (`memory_bytes_max`, else `memory_models_max` of the models' measured
/// sizes, else everything; see [`tidepool_pool::memory_budget`]), and what the llama.cpp
/// accelerator can do ([`Accelerator::CAPABILITIES`]). `tidepool plan --config` plans for the
/// same knobs (a test in `tidepool-bench` compares them).
pub fn pool_config(section: &PoolSection, models: Vec<ModelSpec>) -> PoolConfig {
    let memory_bytes_max = tidepool_pool::memory_budget(
        section.memory_bytes_max,
        section.memory_models_max,
        section.kv_saved_bytes_max,
        &models,
    );
    let engine = Accelerator::CAPABILITIES;
    let mut pool = PoolConfig::new(section.policy, memory_bytes_max, models);
    pool.kv_saved_bytes_max = section.kv_saved_bytes_max;
    pool.saved_kv_in_memory_budget = engine.saved_kv_in_memory_budget;
    pool.overlap_transfers = engine.overlap_transfers;
    pool.kv_paged = engine.kv_paged;
    pool.knobs = section.knobs;
    pool
}

/// What the process may hold above the budget while models switch: the allocator (glibc malloc)
/// keeps freed compute buffers and saved states in its arenas for reuse instead of returning
/// them, so besides what is live it may hold once more what can be live at once of those: the
/// measured extra of as many models as fit the budget together (the largest extras), plus the
/// saved-KV pool. Weights (mapped) and KV cells (one large allocation each) go back to the
/// kernel when freed and are not in it.
fn pool_overhead_bytes(pool: &PoolConfig, calibrations: &[Calibration]) -> u64 {
    let mut sizes: Vec<u64> = pool.models.iter().map(ModelSpec::resident_bytes).collect();
    sizes.sort_unstable();
    let mut total = 0_u64;
    let fitting = sizes
        .iter()
        .take_while(|&&size| {
            total = total.saturating_add(size);
            total <= pool.memory_bytes_max
        })
        .count()
        .max(1);
    let mut extras: Vec<u64> = calibrations.iter().map(|c| c.ctx_extra_bytes).collect();
    extras.sort_unstable_by(|a, b| b.cmp(a));
    let extra: u64 = extras.iter().take(fitting).sum();
    extra.saturating_add(pool.kv_saved_bytes_max)
}

fn thread_gone() -> EngineError {
    EngineError::Load {
        path: std::path::PathBuf::new(),
        reason: "the accelerator thread exited during start-up".to_owned(),
    }
}

fn scheduler_error(error: &PoolError) -> EngineError {
    tracing::error!(%error, "pool scheduler error");
    EngineError::Scheduler {
        reason: error.to_string(),
    }
}
