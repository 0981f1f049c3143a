//! SQLite only: the write-ahead log is synced and checkpointed by a background task, off the
//! request path.
//!
//! Under WAL with `synchronous = NORMAL` a commit appends to the WAL and does not sync: it is
//! durable against a process crash when it returns, and against an OS crash or power loss once
//! the WAL file is synced. SQLite syncs it at checkpoints, which copy the WAL into the database
//! file (one sync of the WAL before copying, one of the database file after). Its automatic
//! checkpoint runs inside the commit of whichever transaction took the WAL past 1000 pages —
//! several times a second on a busy gateway, often a reservation on a request's path — and holds
//! the write lock through both syncs, so every writer queued behind it waits too. On a cloud
//! disk a sync takes milliseconds: that was the tail metering added at p99.
//!
//! Here one task per `Ledger` handle does both jobs:
//!
//! - every [`WAL_SYNC_INTERVAL`] it syncs the WAL file (`fdatasync` on its own descriptor: on
//!   Linux a sync covers the file's data whoever wrote it), so every commit is durable against
//!   an OS crash or power loss at most one interval after it returned. SQLite's recovery reads
//!   the WAL's frames in order, stops at the first one whose checksum fails and keeps what
//!   precedes the last commit frame before it, so a synced prefix is always a consistent
//!   database. This takes no lock at all;
//! - every [`WAL_CHECKPOINT_INTERVAL`] it checkpoints, to bound the WAL's size, in two steps.
//!   First a `PASSIVE` checkpoint copies the WAL into the database file and syncs both while
//!   writers keep committing (it takes no write lock and waits for nobody). Under steady writes
//!   that copy never quite finishes — new frames arrive while it runs — and SQLite starts a WAL
//!   over only once all of it was copied, so the file would grow without end. So the task then
//!   holds this handle's writer gate (the reserve and settle writers wait) and checkpoints again:
//!   only the frames written during the first step are left, a small copy and its two syncs.
//!
//! Automatic checkpoints stay on only as a safety net, at `store::WAL_AUTOCHECKPOINT_PAGES`, for a
//! task that falls behind. What stays on the writers' path, once per checkpoint interval: the
//! gated second step, and the next commit after it, which starts the WAL over from its beginning
//! and syncs its new header first (SQLite does this so that a restarted log can never be
//! mistaken for the old one).

use std::path::PathBuf;
use std::time::Duration;

use sqlx::SqlitePool;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::store::WriteGate;

/// How often the background task syncs the WAL: the longest an OS crash or power loss can reach
/// back into commits on SQLite.
pub const WAL_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// How often the background task checkpoints the WAL into the database file (the WAL file grows
/// to what this interval's commits write, and is then reused).
pub const WAL_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// Sync intervals per checkpoint interval.
const SYNCS_PER_CHECKPOINT: u32 = 5;
const _: () = assert!(
    WAL_SYNC_INTERVAL.as_millis() * SYNCS_PER_CHECKPOINT as u128
        == WAL_CHECKPOINT_INTERVAL.as_millis(),
    "a checkpoint every SYNCS_PER_CHECKPOINT syncs"
);

/// Syncs and checkpoints `pool`'s database until `alive` has no strong sender left (every
/// handle of the `Ledger` is gone).
pub(crate) async fn run<T>(pool: SqlitePool, gate: WriteGate, alive: mpsc::WeakSender<T>) {
    let mut wal = pool.connect_options().get_filename().as_os_str().to_owned();
    wal.push("-wal");
    let wal = PathBuf::from(wal);
    let mut ticker = tokio::time::interval(WAL_SYNC_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate; there is nothing to sync yet.
    ticker.tick().await;
    let mut tick: u32 = 0;
    loop {
        ticker.tick().await;
        if alive.upgrade().is_none() {
            break;
        }
        tick = tick.wrapping_add(1);
        if tick.is_multiple_of(SYNCS_PER_CHECKPOINT) {
            // With writers running; then the rest, with this handle's writers held.
            passive_checkpoint(&pool).await;
            let _writers_held = gate.enter().await;
            passive_checkpoint(&pool).await;
        } else {
            sync(&wal).await;
        }
    }
    tracing::debug!("ledger WAL task stopped: all handles dropped");
}

/// Syncs the WAL file's data, if there is a WAL file (none before the first write, nor after
/// the last connection closed).
async fn sync(wal: &PathBuf) {
    let result = match tokio::fs::File::open(wal).await {
        Ok(file) => file.sync_data().await,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    };
    if let Err(error) = result {
        tracing::warn!(%error, "WAL sync failed; will retry");
    }
}

/// A `PASSIVE` checkpoint: copies what it can, syncing the WAL first and the database after.
async fn passive_checkpoint(pool: &SqlitePool) {
    let result: Result<(i64, i64, i64), sqlx::Error> =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(pool)
            .await;
    match result {
        Ok((busy, log_frames, checkpointed_frames)) => {
            tracing::trace!(busy, log_frames, checkpointed_frames, "WAL checkpoint");
        }
        Err(error) => tracing::warn!(%error, "WAL checkpoint failed; will retry"),
    }
}
