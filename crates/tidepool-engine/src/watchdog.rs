//! The watchdog vocabulary shared by every engine that owns a thread (the pool's accelerator
//! thread in `tidepool-runtime`, the unpooled fake engine): the restart backoff, the heartbeat a
//! thread stamps while it makes progress, the health a readiness probe reads, and the notice a
//! restart broadcasts to whoever subscribed (the gateway's audit log and alerts).
//!
//! What a restart can heal: a thread that panicked or returned. [`install_panic_policy`] keeps
//! that to the engine threads: a panic on any other thread (the HTTP runtime, the ledger's
//! writers) aborts the process, for its supervisor to restart. What it cannot: a thread stuck forever inside a C call holds its state and cannot be stopped from
//! outside; its heartbeat goes stale and readiness reports it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Restart and liveness limits of an engine thread (`[engine]` of the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogConfig {
    /// Wait before the first restart of a streak.
    pub restart_backoff_initial: Duration,
    /// Longest wait between restarts; a thread that ran this long before it died starts a new
    /// streak (its next restart waits `restart_backoff_initial` again).
    pub restart_backoff_max: Duration,
    /// A live thread whose heartbeat is older than this is reported stuck (not ready).
    pub heartbeat_stale: Duration,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            restart_backoff_initial: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(30),
            heartbeat_stale: Duration::from_secs(30),
        }
    }
}

/// How long to wait before each restart: `initial · 2^k` for the `k`-th restart of a streak
/// (0-based), capped at `max`. A pure schedule: no clock inside, so it is tested exactly.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Restarts in the current streak.
    streak: u32,
}

impl Backoff {
    pub fn new(config: &WatchdogConfig) -> Self {
        Self {
            initial: config.restart_backoff_initial,
            max: config
                .restart_backoff_max
                .max(config.restart_backoff_initial),
            streak: 0,
        }
    }

    /// The wait before restarting a thread that ran for `ran_for` since its last (re)start.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.max {
            self.streak = 0;
        }
        let factor = 1_u32.checked_shl(self.streak).unwrap_or(u32::MAX);
        let delay = self.initial.saturating_mul(factor).min(self.max);
        self.streak = self.streak.saturating_add(1);
        delay
    }

    /// Restarts in the current streak.
    pub fn streak(&self) -> u32 {
        self.streak
    }
}

/// A thread's last sign of progress, in nanoseconds since its owner's epoch. The thread stamps
/// it between actions and between decode steps; a reader compares it with the clock.
#[derive(Debug)]
pub struct Heartbeat {
    epoch: Instant,
    last_ns: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ns: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The thread made progress now.
    pub fn beat(&self) {
        self.last_ns.store(self.now_ns(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        Duration::from_nanos(
            self.now_ns()
                .saturating_sub(self.last_ns.load(Ordering::Relaxed)),
        )
    }
}

/// What a readiness probe learns about an engine thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineHealth {
    /// The thread runs (it is not dead and waiting for its restart).
    pub alive: bool,
    /// Time since its last heartbeat.
    pub heartbeat_age: Duration,
    /// The bound beyond which a live thread counts as stuck.
    pub heartbeat_stale: Duration,
    /// Restarts since start-up.
    pub restarts: u64,
}

impl EngineHealth {
    /// `Ok` when the thread is alive and beat recently, else why not (for `/readyz`).
    pub fn check(&self) -> Result<(), String> {
        if !self.alive {
            return Err(format!(
                "dead: the engine thread stopped and waits for its restart ({} restarts so far)",
                self.restarts
            ));
        }
        if self.heartbeat_age > self.heartbeat_stale {
            return Err(format!(
                "stuck: no heartbeat for {} ms (bound {} ms)",
                self.heartbeat_age.as_millis(),
                self.heartbeat_stale.as_millis()
            ));
        }
        Ok(())
    }
}

/// What an engine thread and its readers share: heartbeat, liveness, the restart count and the
/// fault-injection switch.
#[derive(Debug)]
pub struct ThreadWatch {
    pub heartbeat: Heartbeat,
    alive: AtomicBool,
    restarts: AtomicU64,
    heartbeat_stale: Duration,
    /// A panic is wanted at the thread's next step (`fault-injection` builds only arm it).
    fault_armed: AtomicBool,
}

impl ThreadWatch {
    /// A live thread that just beat.
    pub fn new(heartbeat_stale: Duration) -> Self {
        let watch = Self {
            heartbeat: Heartbeat::new(),
            alive: AtomicBool::new(true),
            restarts: AtomicU64::new(0),
            heartbeat_stale,
            fault_armed: AtomicBool::new(false),
        };
        watch.heartbeat.beat();
        watch
    }

    pub fn health(&self) -> EngineHealth {
        EngineHealth {
            alive: self.alive.load(Ordering::Acquire),
            heartbeat_age: self.heartbeat.age(),
            heartbeat_stale: self.heartbeat_stale,
            restarts: self.restarts.load(Ordering::Acquire),
        }
    }

    pub fn set_alive(&self, alive: bool) {
        if alive {
            self.heartbeat.beat();
        }
        self.alive.store(alive, Ordering::Release);
    }

    /// Counts a restart; returns the count so far.
    pub fn restarted(&self) -> u64 {
        self.restarts.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Asks for a panic at the thread's next step.
    #[cfg(feature = "fault-injection")]
    pub fn arm_fault(&self) {
        self.fault_armed.store(true, Ordering::Release);
    }

    /// Where the thread may be made to panic: a no-op unless a fault was armed, which only a
    /// `fault-injection` build can do.
    pub fn fault_point(&self) {
        let armed = self.fault_armed.swap(false, Ordering::AcqRel);
        assert!(!armed, "injected fault: the engine thread panics");
    }
}

/// Broadcast after every restart of an engine thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineRestart {
    /// `accelerator` for the pool's thread, else the model id of an unpooled engine.
    pub engine: String,
    /// Why the thread stopped (the panic's message, or that it returned).
    pub reason: String,
    /// Restarts of this engine since start-up, this one included.
    pub restarts: u64,
    /// The wait before this restart (the backoff).
    pub backoff: Duration,
    /// How long the engine was out: from its stop being detected to the new thread (or
    /// context) ready to run, the backoff included; models reload after it, on demand.
    pub down: Duration,
    /// Requests that were running and ended with `EngineError::Restarted`.
    pub failed_requests: u32,
    /// Requests that were queued and were admitted again to the restarted thread.
    pub readmitted_requests: u32,
}

/// Capacity of a restart notice channel: a subscriber that lags further loses the oldest
/// notices (`broadcast::error::RecvError::Lagged`), never blocks a restart.
pub const RESTART_NOTICES_BUFFERED_MAX: usize = 64;

/// The counter of engine-thread restarts, labelled `engine` (`accelerator` or a model id).
pub const RESTARTS_TOTAL: &str = "tidepool_engine_restarts_total";

/// Counts one restart of `engine` (see [`RESTARTS_TOTAL`]).
/// Threads whose panics a watchdog heals: the pool's accelerator thread and the unpooled engine
/// threads (their names' prefixes).
pub const HEALED_THREAD_PREFIXES: &[&str] =
    &["tidepool-accelerator", "tidepool-llama-", "tidepool-fake-"];

/// Whether a panic on the thread named `name` is healed in place (see
/// [`HEALED_THREAD_PREFIXES`]).
pub fn is_healed_thread(name: Option<&str>) -> bool {
    name.is_some_and(|name| {
        HEALED_THREAD_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
    })
}

/// Installs the process's panic policy (call once, at start-up, in a server process): a panic on
/// an engine thread is reported and unwinds into its watchdog, which restarts the thread; a panic
/// anywhere else is reported and then aborts the process, whose state (a ledger writer, a
/// half-handled request) no watchdog owns. The release profile unwinds so that the first case
/// can happen at all.
pub fn install_panic_policy() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        if !is_healed_thread(std::thread::current().name()) {
            std::process::abort();
        }
    }));
}

pub fn count_restart(engine: &str) {
    metrics::describe_counter!(
        RESTARTS_TOTAL,
        "Engine threads restarted by the watchdog after they stopped (a panic or an exit)"
    );
    metrics::counter!(RESTARTS_TOTAL, "engine" => engine.to_owned()).increment(1);
}

/// Text of a caught panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_engine_threads_are_healed_in_place() {
        for healed in [
            "tidepool-accelerator",
            "tidepool-llama-smollm2-135m-instruct",
            "tidepool-fake-fake-chat",
        ] {
            assert!(is_healed_thread(Some(healed)), "{healed}");
        }
        for aborts in [
            None,
            Some("main"),
            Some("tokio-runtime-worker"),
            Some("tidepool-watchdog"),
            Some("tidepool-embed-all-minilm-l6-v2"),
        ] {
            assert!(!is_healed_thread(aborts), "{aborts:?}");
        }
    }

    fn config(initial_ms: u64, max_ms: u64) -> WatchdogConfig {
        WatchdogConfig {
            restart_backoff_initial: Duration::from_millis(initial_ms),
            restart_backoff_max: Duration::from_millis(max_ms),
            heartbeat_stale: Duration::from_secs(1),
        }
    }

    #[test]
    fn repeated_deaths_double_the_wait_up_to_the_cap() {
        let mut backoff = Backoff::new(&config(100, 1000));
        let quick = Duration::from_millis(10);
        let delays: Vec<u128> = (0..7)
            .map(|_| backoff.next_delay(quick).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(backoff.streak(), 7);
    }

    #[test]
    fn a_thread_that_ran_long_enough_starts_a_new_streak() {
        let mut backoff = Backoff::new(&config(100, 1000));
        let quick = Duration::from_millis(10);
        assert_eq!(backoff.next_delay(quick), Duration::from_millis(100));
        assert_eq!(backoff.next_delay(quick), Duration::from_millis(200));
        // Just short of the cap: still the same streak.
        assert_eq!(
            backoff.next_delay(Duration::from_millis(999)),
            Duration::from_millis(400)
        );
        // Ran for the cap: forgiven.
        assert_eq!(
            backoff.next_delay(Duration::from_secs(1)),
            Duration::from_millis(100)
        );
        assert_eq!(backoff.streak(), 1);
    }

    #[test]
    fn a_cap_below_the_initial_wait_is_the_initial_wait() {
        let mut backoff = Backoff::new(&config(500, 100));
        assert_eq!(
            backoff.next_delay(Duration::ZERO),
            Duration::from_millis(500)
        );
        assert_eq!(
            backoff.next_delay(Duration::ZERO),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn the_shift_never_overflows() {
        let mut backoff = Backoff::new(&config(1, u64::MAX / 2));
        let mut last = Duration::ZERO;
        for _ in 0..100 {
            let delay = backoff.next_delay(Duration::ZERO);
            assert!(delay >= last, "the schedule never shrinks within a streak");
            last = delay;
        }
    }

    #[test]
    fn health_names_a_dead_and_a_stuck_thread() {
        let mut health = EngineHealth {
            alive: true,
            heartbeat_age: Duration::from_millis(10),
            heartbeat_stale: Duration::from_millis(100),
            restarts: 0,
        };
        assert_eq!(health.check(), Ok(()));
        health.heartbeat_age = Duration::from_millis(101);
        assert!(health.check().is_err_and(|e| e.starts_with("stuck")));
        health.alive = false;
        assert!(health.check().is_err_and(|e| e.starts_with("dead")));
    }
}
