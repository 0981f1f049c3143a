//! The accelerator thread's watchdog: a second thread (`tidepool-watchdog`) that learns within
//! [`WATCH_INTERVAL`] (at once for a panic, which the dying thread reports) that the accelerator
//! thread stopped, waits out the restart backoff while it delivers the last events owed to
//! clients, rebuilds the pool's state (a fresh `Pool`: the new accelerator holds no model, and the
//! calibration is kept), admits again every request that was queued but not started, starts a new
//! accelerator thread, counts and logs the restart and broadcasts an [`EngineRestart`]. Between
//! restarts it watches the heartbeat: a thread stuck inside a C call cannot be stopped, only
//! reported (`/readyz`, an error log).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tidepool_engine::EngineError;
use tidepool_engine::multi::{Calibration, MultiModelConfig, Salvage, SalvagedSeq, TokenDeadlines};
use tidepool_engine::watchdog::{Backoff, EngineRestart, count_restart};
use tidepool_pool::{Event, Pool};
use tokio::sync::broadcast;

use crate::{Arrival, Shared, Signal, driver};

/// How often the watchdog looks at the accelerator thread when nothing reported to it: the
/// bound on noticing a thread that exited without a word, and the heartbeat's check period.
pub(crate) const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Retry period of the last events owed to clients whose channels were full.
const OWED_RETRY_INTERVAL: Duration = Duration::from_millis(2);
/// Capacity of the watchdog's inbox (exits, operator commands, shutdown): each sender has at
/// most one message in flight.
pub(crate) const SIGNALS_BUFFERED_MAX: usize = 8;
/// The `engine` label and the notices' name of the pool's thread.
pub(crate) const ENGINE_NAME: &str = "accelerator";

pub(crate) struct Watchdog {
    pub(crate) shared: Arc<Shared>,
    pub(crate) configs: Vec<MultiModelConfig>,
    pub(crate) calibrations: Vec<Calibration>,
    pub(crate) signals_tx: SyncSender<Signal>,
    pub(crate) signals: Receiver<Signal>,
    pub(crate) thread: Option<JoinHandle<()>>,
    /// When the current accelerator thread started.
    pub(crate) started: Instant,
    pub(crate) backoff: Backoff,
    pub(crate) notices: broadcast::Sender<EngineRestart>,
    /// Events still owed to clients of the last stopped thread.
    pub(crate) owed: Salvage,
    pub(crate) stuck_reported: bool,
}

impl Watchdog {
    pub(crate) fn run(mut self) {
        loop {
            let wait = if self.owed.owed_len() > 0 {
                OWED_RETRY_INTERVAL
            } else {
                WATCH_INTERVAL
            };
            let keep_going = match self.signals.recv_timeout(wait) {
                Ok(Signal::Shutdown) | Err(RecvTimeoutError::Disconnected) => false,
                Ok(Signal::RestartNow) => true,
                Ok(Signal::Exited { salvage, reason }) => self.recover(salvage, reason),
                Err(RecvTimeoutError::Timeout) => self.check(),
            };
            self.owed.flush();
            if !keep_going {
                return;
            }
        }
    }

    /// The periodic look: a thread that is gone without a word, or a stale heartbeat.
    fn check(&mut self) -> bool {
        if self.shared.core.lock().shutdown {
            return false;
        }
        let gone = self.thread.as_ref().is_none_or(JoinHandle::is_finished);
        if gone {
            return self.recover(None, "the accelerator thread exited".to_owned());
        }
        let health = self.shared.health();
        match health.check() {
            Err(why) if !self.stuck_reported => {
                tracing::error!(
                    engine = ENGINE_NAME,
                    heartbeat_age_ms = u64::try_from(health.heartbeat_age.as_millis()).unwrap_or(u64::MAX),
                    %why,
                    "the accelerator thread makes no progress; it cannot be restarted while it \
                     is inside a call, so readiness reports it"
                );
                self.stuck_reported = true;
            }
            Ok(()) if self.stuck_reported => {
                tracing::warn!(
                    engine = ENGINE_NAME,
                    "the accelerator thread makes progress again"
                );
                self.stuck_reported = false;
            }
            _ => {}
        }
        true
    }

    /// Restarts the accelerator thread after it stopped; `false` once the runtime shuts down.
    fn recover(&mut self, salvage: Option<Salvage>, reason: String) -> bool {
        self.shared.alive.store(false, Ordering::Release);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::debug!("the accelerator thread's panic reached its join");
        }
        if self.shared.core.lock().shutdown {
            return false;
        }
        let detected = Instant::now();
        let restarts = self.shared.restarts.fetch_add(1, Ordering::AcqRel) + 1;
        count_restart(ENGINE_NAME);
        let backoff = self.backoff.next_delay(self.started.elapsed());
        let mut salvage = salvage.unwrap_or_default();
        let failed_requests = salvage.failed;
        tracing::error!(
            engine = ENGINE_NAME,
            %reason,
            restarts,
            backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
            failed_requests,
            queued_requests = salvage.unstarted.len(),
            "the accelerator thread stopped; restarting it"
        );
        let until = detected + backoff;
        loop {
            let owed = !salvage.flush();
            let now = Instant::now();
            if now >= until {
                break;
            }
            let wait = if owed {
                OWED_RETRY_INTERVAL.min(until - now)
            } else {
                until - now
            };
            match self.signals.recv_timeout(wait) {
                Ok(Signal::Shutdown) | Err(RecvTimeoutError::Disconnected) => return false,
                Ok(Signal::RestartNow) => break,
                Ok(Signal::Exited { .. }) | Err(RecvTimeoutError::Timeout) => {}
            }
        }
        let unstarted = std::mem::take(&mut salvage.unstarted);
        self.owed.merge(salvage);
        let Some(readmitted_requests) = self.rebuild(unstarted) else {
            return false;
        };
        self.spawn();
        let notice = EngineRestart {
            engine: ENGINE_NAME.to_owned(),
            reason,
            restarts,
            backoff,
            down: detected.elapsed(),
            failed_requests,
            readmitted_requests,
        };
        tracing::warn!(
            engine = ENGINE_NAME,
            restarts,
            readmitted_requests,
            restart_ms = u64::try_from(detected.elapsed().as_millis()).unwrap_or(u64::MAX),
            "the accelerator thread restarted"
        );
        // No subscriber is fine: the notice is for whoever listens.
        if self.notices.send(notice).is_err() {
            tracing::debug!("no subscriber for restart notices");
        }
        true
    }

    /// A fresh pool (the new accelerator holds nothing) with every request that had not started:
    /// the salvaged ones and those admitted since the thread stopped, in arrival order. Returns
    /// how many were admitted again, `None` on shutdown.
    fn rebuild(&self, unstarted: Vec<SalvagedSeq>) -> Option<u32> {
        let shared = &self.shared;
        let mut core = shared.core.lock();
        if core.shutdown {
            for seq in unstarted {
                seq.prepared.fail(EngineError::ShutDown);
            }
            return None;
        }
        let (ttft, tbt) = shared.slo;
        let mut arrivals: Vec<Arrival> = unstarted
            .into_iter()
            .map(|s| Arrival {
                seq: tidepool_pool::SeqId(s.seq),
                model: s.model,
                prepared: s.prepared,
                deadlines: s.deadlines.unwrap_or(TokenDeadlines {
                    arrived: Instant::now(),
                    ttft,
                    tbt,
                }),
            })
            .collect();
        arrivals.append(&mut core.arrivals);
        arrivals.sort_by_key(|a| a.seq);
        core.actions.clear();
        for hints in &shared.prefix_hints {
            // The new engine holds no KV.
            hints.lock().clear();
        }
        match Pool::new(core.pool.config().clone()) {
            Ok(pool) => core.pool = pool,
            Err(error) => {
                // The same configuration built the first pool: only a bug gets here.
                tracing::error!(%error, "cannot rebuild the pool after a restart");
            }
        }
        let now_ns = shared.now_ns();
        let mut actions = Vec::new();
        let mut readmitted = 0_u32;
        for arrival in arrivals {
            let Some(model) = shared.model_ids.get(arrival.model) else {
                arrival.prepared.fail(EngineError::ShutDown);
                continue;
            };
            let event = Event::RequestArrived {
                now_ns,
                seq: arrival.seq,
                model: model.clone(),
                prompt_tokens: arrival.prepared.prompt_tokens(),
                max_tokens: arrival.prepared.max_tokens(),
                class: arrival.prepared.class(),
                // The restarted engine holds no KV.
                cached_tokens: 0,
            };
            match core.pool.handle(event, &mut actions) {
                Ok(()) => {
                    readmitted += 1;
                    core.arrivals.push(arrival);
                }
                Err(error) => {
                    tracing::error!(%error, "a queued request could not be admitted again");
                    arrival.prepared.fail(EngineError::Restarted);
                }
            }
        }
        if let Err(error) = core.pool.handle(Event::Tick { now_ns }, &mut actions) {
            tracing::error!(%error, "the rebuilt pool refused its first tick");
        }
        core.actions = actions;
        Some(readmitted)
    }

    fn spawn(&mut self) {
        let shared = Arc::clone(&self.shared);
        let configs = self.configs.clone();
        let calibrations = self.calibrations.clone();
        let signals = self.signals_tx.clone();
        shared.heartbeat.beat();
        let spawned = std::thread::Builder::new()
            .name("tidepool-accelerator".to_owned())
            .spawn(move || driver::restart(&configs, calibrations, shared, &signals));
        self.started = Instant::now();
        match spawned {
            Ok(thread) => {
                self.thread = Some(thread);
                self.shared.alive.store(true, Ordering::Release);
                self.shared.wake.notify_one();
            }
            Err(error) => {
                // Left dead: the next look restarts it again, after a longer backoff.
                tracing::error!(%error, "cannot start a new accelerator thread");
                self.thread = None;
            }
        }
    }
}
