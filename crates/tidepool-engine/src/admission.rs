//! Bounded admission shared by every engine: a request enters the engine thread's queue with
//! `try_send` or is refused at once (`Overloaded`), and live counters back `TextEngine::stats`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};

use crate::{EngineError, EngineStats};

/// Counters updated by the caller (queued on admission) and the engine thread (queued → active).
#[derive(Debug, Default)]
pub(crate) struct LiveStats {
    pub(crate) queued: AtomicU32,
    pub(crate) active: AtomicU32,
}

impl LiveStats {
    pub(crate) fn snapshot(&self) -> EngineStats {
        EngineStats {
            queued: self.queued.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
        }
    }
}

/// Queues `job` without waiting. Counted as queued before the send so the engine thread, which
/// decrements on receipt, never sees the counter below zero.
pub(crate) fn admit<T>(
    commands: &SyncSender<T>,
    stats: &LiveStats,
    job: T,
    retry_after_ms: u32,
) -> Result<(), EngineError> {
    stats.queued.fetch_add(1, Ordering::Relaxed);
    match commands.try_send(job) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => {
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            Err(EngineError::Overloaded { retry_after_ms })
        }
        Err(TrySendError::Disconnected(_)) => {
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            Err(EngineError::ShutDown)
        }
    }
}
