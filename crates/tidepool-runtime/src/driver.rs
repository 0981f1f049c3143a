//! The accelerator thread. It owns the [`Accelerator`] and loops: take the admitted requests
//! and the pool's actions (under the lock), register the requests, carry out each action on the
//! engine (outside the lock), report its completion to the pool (under the lock, which may emit
//! the next actions), then sweep for clients that left and retry held deliveries.
//!
//! With `overlap_transfers = false` the pool emits at most one engine action at a time, so the
//! engine runs actions strictly one after another, in the order the pool chose.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

use parking_lot::MutexGuard;
use tidepool_core::ModelId;
use tidepool_engine::multi::{
    Accelerator, Calibration, FirstStep, MultiModelConfig, StepOutcome, resident_bytes,
};
use tidepool_engine::watchdog::panic_message;
use tidepool_engine::{EngineError, RequestClass};
use tidepool_pool::{Action, Event, PoolCounters, SeqFinished, SeqId};

use crate::phases::{Phase, first_step_extra_ns};
use crate::{Core, Shared, Signal, metrics};

/// Wait between sweeps while sequences exist (a client leaving is noticed within this).
const SWEEP_INTERVAL: Duration = Duration::from_millis(20);
/// Wait between delivery retries while a client's channel is full.
const HELD_RETRY_INTERVAL: Duration = Duration::from_millis(2);
/// Longest sleep of an idle accelerator.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Thread entry: calibrate, hand the measurements to [`crate::PoolRuntime::start`], wait for the
/// shared state, then drive the pool until shutdown (or a panic, reported to the watchdog).
pub(crate) fn run(
    configs: &[MultiModelConfig],
    calibrated: &SyncSender<Result<Calibrated, EngineError>>,
    shared: &Receiver<Arc<Shared>>,
    signals: &SyncSender<Signal>,
) {
    let mut accelerator = match Accelerator::new(configs.to_vec()) {
        Ok(accelerator) => accelerator,
        Err(error) => {
            if calibrated.send(Err(error)).is_err() {
                tracing::error!("accelerator start-up failed and nobody is waiting for it");
            }
            return;
        }
    };
    let rss_before = resident_bytes();
    let calibrations = match calibrate_all(&mut accelerator, configs) {
        Ok(calibrations) => {
            let residue_bytes = resident_bytes()
                .zip(rss_before)
                .map_or(0, |(after, before)| after.saturating_sub(before));
            let result = Calibrated {
                calibrations: calibrations.clone(),
                residue_bytes,
            };
            if calibrated.send(Ok(result)).is_err() {
                return;
            }
            calibrations
        }
        Err(error) => {
            if calibrated.send(Err(error)).is_err() {
                tracing::error!("calibration failed and nobody is waiting for it");
            }
            return;
        }
    };
    let Ok(shared) = shared.recv() else {
        return;
    };
    metrics::describe();
    drive(Driver::new(shared, accelerator, calibrations), signals);
}

/// Thread entry of a restarted accelerator thread: a fresh [`Accelerator`] (no model loaded)
/// with the start-up calibration, driving the pool the watchdog rebuilt.
pub(crate) fn restart(
    configs: &[MultiModelConfig],
    calibrations: Vec<Calibration>,
    shared: Arc<Shared>,
    signals: &SyncSender<Signal>,
) {
    match Accelerator::new(configs.to_vec()) {
        Ok(accelerator) => drive(Driver::new(shared, accelerator, calibrations), signals),
        Err(error) => {
            let reason = format!("the restarted accelerator could not start: {error}");
            if signals
                .send(Signal::Exited {
                    salvage: None,
                    reason,
                })
                .is_err()
            {
                tracing::error!("the watchdog is gone");
            }
        }
    }
}

/// Runs the driver until shutdown. A panic is caught here: the accelerator's sequences are
/// salvaged (unstarted requests come back, started ones fail with `Restarted`) and handed to the
/// watchdog, which restarts the thread; a second panic while salvaging loses only the salvage
/// (clients then see their channel close).
fn drive(mut driver: Driver, signals: &SyncSender<Signal>) {
    driver.shared.heartbeat.beat();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| driver.run()));
    let Err(payload) = outcome else {
        tracing::info!("accelerator thread stopped");
        return;
    };
    let reason = panic_message(payload.as_ref());
    tracing::error!(%reason, "the accelerator thread panicked");
    let salvage = std::panic::catch_unwind(AssertUnwindSafe(|| {
        driver.accelerator.salvage(&EngineError::Restarted)
    }))
    .ok();
    // Models and contexts are freed here, on their own thread, before the next one loads any.
    if std::panic::catch_unwind(AssertUnwindSafe(move || drop(driver))).is_err() {
        tracing::error!("freeing the stopped accelerator panicked too");
    }
    if signals.send(Signal::Exited { salvage, reason }).is_err() {
        tracing::error!("the watchdog is gone");
    }
}

/// What the accelerator thread measured at start-up.
#[derive(Debug)]
pub(crate) struct Calibrated {
    /// One per model, in configuration order.
    pub(crate) calibrations: Vec<Calibration>,
    /// Resident memory the calibration left behind once every model was freed again (allocator
    /// arenas, llama.cpp's thread pool), in bytes: part of the cold process.
    pub(crate) residue_bytes: u64,
}

/// Measures each distinct model configuration once (several ids may share a file).
fn calibrate_all(
    accelerator: &mut Accelerator,
    configs: &[MultiModelConfig],
) -> Result<Vec<Calibration>, EngineError> {
    let mut done: Vec<(usize, Calibration)> = Vec::new();
    let mut out = Vec::with_capacity(configs.len());
    for (index, config) in configs.iter().enumerate() {
        let same = done.iter().find(|(other, _)| {
            configs.get(*other).is_some_and(|o| {
                o.path == config.path
                    && o.context_tokens == config.context_tokens
                    && o.seqs_max == config.seqs_max
                    && o.batch_tokens_max == config.batch_tokens_max
                    && o.threads == config.threads
            })
        });
        let calibration = if let Some((_, calibration)) = same {
            *calibration
        } else {
            let calibration = accelerator.calibrate(index)?;
            done.push((index, calibration));
            calibration
        };
        out.push(calibration);
    }
    Ok(out)
}

struct Driver {
    shared: Arc<Shared>,
    accelerator: Accelerator,
    /// One per model, in accelerator order.
    calibrations: Vec<Calibration>,
    /// Pool counters already exported to metrics.
    counters: PoolCounters,
    /// Model of the last compute action (a different one next is a switch).
    last_compute: Option<ModelId>,
    flush_pending: bool,
}

impl Driver {
    fn new(shared: Arc<Shared>, accelerator: Accelerator, calibrations: Vec<Calibration>) -> Self {
        Self {
            shared,
            accelerator,
            calibrations,
            counters: PoolCounters::default(),
            last_compute: None,
            flush_pending: false,
        }
    }

    fn run(&mut self) {
        loop {
            self.shared.heartbeat.beat();
            self.shared.fault_point();
            let Some((arrivals, actions)) = self.next_work() else {
                return;
            };
            self.shared.heartbeat.beat();
            self.shared.fault_point();
            for arrival in arrivals {
                // Batch requests have no token deadlines: they never count in attainment.
                let online = arrival.prepared.class() == RequestClass::Online;
                self.accelerator.register(
                    arrival.seq.0,
                    arrival.model,
                    arrival.prepared,
                    online.then_some(arrival.deadlines),
                );
            }
            for action in actions {
                self.execute(action);
            }
            self.sweep();
        }
    }

    /// Waits for admitted requests or actions; returns them, or nothing on shutdown. Also
    /// returns (empty-handed) when a sweep is due.
    fn next_work(&mut self) -> Option<(Vec<crate::Arrival>, Vec<Action>)> {
        let shared = Arc::clone(&self.shared);
        let mut core = shared.core.lock();
        loop {
            if core.shutdown {
                return None;
            }
            if !core.arrivals.is_empty() || !core.actions.is_empty() {
                break;
            }
            let now_ns = shared.now_ns();
            let timer = core.pool.next_timer_ns();
            if timer.is_some_and(|at| at <= now_ns) {
                self.handle(&mut core, Event::Tick { now_ns });
                continue;
            }
            let wait = if self.flush_pending {
                HELD_RETRY_INTERVAL
            } else if self.accelerator.seqs_len() > 0 {
                SWEEP_INTERVAL
            } else {
                timer.map_or(IDLE_WAIT, |at| {
                    Duration::from_nanos(at.saturating_sub(now_ns)).min(IDLE_WAIT)
                })
            };
            if shared.wake.wait_for(&mut core, wait).timed_out() {
                break;
            }
        }
        Some((
            std::mem::take(&mut core.arrivals),
            std::mem::take(&mut core.actions),
        ))
    }

    fn model_index(&self, model: &ModelId) -> usize {
        self.shared.index.get(model).copied().unwrap_or(usize::MAX)
    }

    /// Carries out one action on the engine and reports its completion to the pool.
    #[expect(
        clippy::too_many_lines,
        reason = "one arm per action kind, each timing its phase"
    )]
    fn execute(&mut self, action: Action) {
        self.shared.heartbeat.beat();
        self.shared.fault_point();
        let started = Instant::now();
        let event = match action {
            Action::Release { seq, .. } => {
                self.accelerator.release(seq.0);
                return;
            }
            Action::Load { id, model } => {
                let index = self.model_index(&model);
                let loaded = self.accelerator.load(index);
                let duration_ns = elapsed_ns(started);
                metrics::loaded(&model, started.elapsed(), loaded.is_ok());
                if let Some(failure) = self.shared.load_failures.lock().get_mut(index) {
                    *failure = loaded.as_ref().err().map(ToString::to_string);
                }
                if let Ok(phases) = loaded {
                    self.note_phase(index, Phase::Weights, phases.weights_ns);
                    self.note_phase(index, Phase::Context, phases.context_ns);
                }
                Completion::Load { id, duration_ns }
            }
            Action::Evict { id, model } => {
                let index = self.model_index(&model);
                self.accelerator.evict(index);
                if let Some(hints) = self.shared.prefix_hints.get(index) {
                    hints.lock().clear();
                }
                self.note_phase(index, Phase::Evict, elapsed_ns(started));
                Completion::Unload { id }
            }
            Action::SaveKv { id, seq, model } => {
                let batch = self.accelerator.seq_class(seq.0) == Some(RequestClass::Batch);
                let bytes = self.accelerator.save(seq.0);
                let index = self.model_index(&model);
                if batch {
                    // A batch preemption drops cells: not a switch phase.
                    return self.complete(Completion::Saved { id, bytes });
                }
                self.note_phase(index, Phase::KvSave, elapsed_ns(started));
                if let Some(phases) = self.shared.switches.lock().get_mut(index) {
                    phases.kv_save_bytes = bytes;
                }
                Completion::Saved { id, bytes }
            }
            Action::RestoreKv { id, seq, model } => {
                let batch = self.accelerator.seq_class(seq.0) == Some(RequestClass::Batch);
                self.accelerator.restore(seq.0);
                let index = self.model_index(&model);
                if batch {
                    // A batch resume recomputes the sequence: not a switch phase.
                    return self.complete(Completion::Restored { id });
                }
                self.note_phase(index, Phase::KvRestore, elapsed_ns(started));
                self.note_first_step(index);
                Completion::Restored { id }
            }
            Action::Prefill {
                id,
                model,
                seqs,
                riders,
            } => {
                self.note_compute(&model);
                let (ids, riders) = (engine_ids(&seqs), engine_ids(&riders));
                let index = self.model_index(&model);
                let outcome = self.accelerator.prefill(index, &ids, &riders);
                self.note_first_step(index);
                metrics::finished(&model, &outcome);
                tracing::debug!(
                    %model,
                    seqs = ids.len(),
                    riders = riders.len(),
                    duration_us = elapsed_ns(started) / 1_000,
                    "prefill"
                );
                Completion::Step {
                    id,
                    outcome,
                    duration_ns: elapsed_ns(started),
                    prefill: true,
                }
            }
            Action::Decode {
                id,
                model,
                seqs,
                steps,
            } => {
                self.note_compute(&model);
                let ids = engine_ids(&seqs);
                // Between steps, the pool may want the turn cut short (a request of this model
                // waits and nothing else decodes): a short lock per step, ≪ one step's time.
                let shared = Arc::clone(&self.shared);
                let mut stop = || {
                    shared.heartbeat.beat();
                    shared.fault_point();
                    shared.core.lock().pool.decode_yield_wanted()
                };
                let index = self.model_index(&model);
                let outcome = self.accelerator.decode_until(index, &ids, steps, &mut stop);
                self.note_first_step(index);
                metrics::finished(&model, &outcome);
                tracing::debug!(
                    %model,
                    seqs = ids.len(),
                    steps = outcome.steps,
                    duration_us = elapsed_ns(started) / 1_000,
                    "decode"
                );
                Completion::Step {
                    id,
                    outcome,
                    duration_ns: elapsed_ns(started),
                    prefill: false,
                }
            }
        };
        self.complete(event);
    }

    /// Reports an action's completion to the pool.
    fn complete(&mut self, event: Completion) {
        let shared = Arc::clone(&self.shared);
        let mut core = shared.core.lock();
        let now_ns = shared.now_ns();
        let event = event.into_event(now_ns);
        self.handle(&mut core, event);
    }

    /// Records one phase of a switch of model `index`: its last value and the histogram.
    fn note_phase(&self, index: usize, phase: Phase, ns: u64) {
        metrics::switch_phase(phase, ns);
        let mut switches = self.shared.switches.lock();
        let Some(phases) = switches.get_mut(index) else {
            return;
        };
        match phase {
            Phase::Weights => phases.weights_ns = ns,
            Phase::Context => phases.context_ns = ns,
            Phase::FirstStep => phases.first_step_ns = ns,
            Phase::Evict => phases.evict_ns = ns,
            Phase::KvSave => phases.kv_save_ns = ns,
            Phase::KvRestore => phases.kv_restore_ns = ns,
        }
    }

    /// The first step on a fresh context, once it ran (an action that decoded nothing leaves it
    /// for the next).
    fn note_first_step(&mut self, index: usize) {
        let Some(first) = self.accelerator.take_first_step(index) else {
            return;
        };
        let Some(calibration) = self.calibrations.get(index) else {
            return;
        };
        let extra = first_step_extra_ns(first, calibration);
        self.note_phase(index, Phase::FirstStep, extra);
        if let Some(phases) = self.shared.switches.lock().get_mut(index) {
            let FirstStep { ns, tokens } = first;
            phases.first_step_raw_ns = ns;
            phases.first_step_tokens = tokens;
        }
    }

    fn note_compute(&mut self, model: &ModelId) {
        if self.last_compute.as_ref() != Some(model) {
            if self.last_compute.is_some() {
                metrics::switched();
            }
            self.last_compute = Some(model.clone());
        }
    }

    /// Feeds one event to the pool under the lock and queues what it emits.
    fn handle(&mut self, core: &mut MutexGuard<'_, Core>, event: Event) {
        let mut actions = Vec::new();
        if let Err(error) = core.pool.handle(event, &mut actions) {
            // Only a driver bug gets here (unknown action, wrong kind, clock).
            tracing::error!(%error, "the pool refused an event from its driver");
        }
        core.actions.extend(actions);
        let counters = core.pool.counters();
        metrics::counters(&self.counters, &counters);
        metrics::memory(core.pool.memory_bytes_used(), &counters);
        metrics::batch(&core.pool.batch_status());
        self.counters = counters;
    }

    /// Tells the pool about clients that left, frees what only the engine knew about, and
    /// retries held deliveries.
    fn sweep(&mut self) {
        let gone = self.accelerator.cancelled();
        if !gone.is_empty() {
            let mut forget = Vec::new();
            {
                let shared = Arc::clone(&self.shared);
                let mut core = shared.core.lock();
                for seq in gone {
                    let now_ns = shared.now_ns();
                    let seq = SeqId(seq);
                    self.handle(&mut core, Event::Cancelled { now_ns, seq });
                    if !core.pool.contains_seq(seq) {
                        forget.push(seq);
                    }
                }
            }
            for seq in forget {
                self.accelerator.release(seq.0);
            }
        }
        self.flush_pending = self.accelerator.flush();
    }
}

/// The engine's ids of pool sequences.
fn engine_ids(seqs: &[SeqId]) -> Vec<u64> {
    seqs.iter().map(|s| s.0).collect()
}

/// An engine action's completion, timed before the lock is taken.
enum Completion {
    Load {
        id: tidepool_pool::ActionId,
        duration_ns: u64,
    },
    Unload {
        id: tidepool_pool::ActionId,
    },
    Saved {
        id: tidepool_pool::ActionId,
        bytes: u64,
    },
    Restored {
        id: tidepool_pool::ActionId,
    },
    Step {
        id: tidepool_pool::ActionId,
        outcome: StepOutcome,
        duration_ns: u64,
        prefill: bool,
    },
}

impl Completion {
    fn into_event(self, now_ns: u64) -> Event {
        match self {
            Self::Load { id, duration_ns } => Event::LoadFinished {
                now_ns,
                action: id,
                duration_ns,
            },
            Self::Unload { id } => Event::UnloadFinished { now_ns, action: id },
            Self::Saved { id, bytes } => Event::KvSaved {
                now_ns,
                action: id,
                bytes,
            },
            Self::Restored { id } => Event::KvRestored { now_ns, action: id },
            Self::Step {
                id,
                outcome,
                duration_ns,
                prefill,
            } => Event::StepFinished {
                now_ns,
                action: id,
                steps: if prefill { 1 } else { outcome.steps },
                duration_ns,
                finished: outcome
                    .finished
                    .iter()
                    .map(|f| SeqFinished {
                        seq: SeqId(f.seq),
                        tokens_emitted: f.tokens_emitted,
                    })
                    .collect(),
            },
        }
    }
}

fn elapsed_ns(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
