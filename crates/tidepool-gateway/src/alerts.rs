//! Webhook alerts (`[[alerts]]`): operational events — a backend's breaker opened or closed, an
//! engine restarted, the ledger's database lost or recovered, a key suspended, a budget reached —
//! sent as signed JSON `POST`s to each receiver that subscribed to them.
//!
//! Nothing here ever blocks a request. [`Alerts::emit`] only `try_send`s into a bounded channel
//! ([`ALERT_QUEUE_LEN_MAX`]; full: the event is dropped, logged and counted). A writer task turns
//! each event into one durable outbox row per subscribed receiver (`alert_outbox`, in the
//! ledger); a delivery task on every replica claims due rows, POSTs them and marks them
//! delivered, or reschedules them with exponential backoff, or after `attempts_max` marks them
//! failed. Claims are leases (`FOR UPDATE SKIP LOCKED` on PostgreSQL), so replicas never send
//! the same row at once.
//!
//! When the outbox cannot be written (the database is the thing that is down, which is exactly
//! when `database_lost` fires), the writer holds the rows in a bounded in-memory queue
//! ([`ALERT_HELD_LEN_MAX`], oldest dropped first) and, while the database stays down, delivers
//! them directly from memory (same signature, same backoff); whatever is still held when the
//! database answers again is written to the outbox and delivered from there. Held rows are lost
//! if this process dies meanwhile.
//!
//! Every body is signed: `X-Tidepool-Signature: sha256=<hex HMAC-SHA256 of the raw body>` with
//! the receiver's secret, plus `X-Tidepool-Timestamp` (Unix seconds of the attempt),
//! `X-Tidepool-Event` and `X-Tidepool-Delivery` (the event's id: a retried or twice-delivered
//! event carries the same id, for receivers to deduplicate on).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;
use sha2::Sha256;
use tidepool_core::{AlertConfig, KeyId, TenantId};
use tidepool_ledger::{ClaimedAlert, Clock, Ledger, Month, NewAlert, QuotaScope};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Events waiting for the writer task; beyond it an event is dropped (logged, counted).
pub const ALERT_QUEUE_LEN_MAX: usize = 1024;
/// Outbox rows held in memory while the database cannot be written; beyond it the oldest is
/// dropped (logged, counted).
pub const ALERT_HELD_LEN_MAX: usize = 1024;
/// How often the delivery task looks for due rows when nothing wakes it sooner.
pub const ALERT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often held rows are retried (written to the outbox, else delivered directly).
pub const ALERT_HELD_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Rows one delivery round claims.
pub const ALERT_CLAIM_LEN: u32 = 16;
/// Lease slack beyond `ALERT_CLAIM_LEN` attempts at the longest `timeout_ms`.
const ALERT_LEASE_SLACK: Duration = Duration::from_secs(30);
/// Deduplication keys remembered per replica (the outbox's unique key is the durable rule;
/// this only spares it a write per refused request); cleared when full.
pub const ALERT_DEDUP_KEYS_MAX: usize = 4096;
/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-tidepool-signature";
/// The attempt's Unix time (seconds) header.
pub const TIMESTAMP_HEADER: &str = "x-tidepool-timestamp";
/// The event name header.
pub const EVENT_HEADER: &str = "x-tidepool-event";
/// The event id header (the same on every attempt and replica).
pub const DELIVERY_HEADER: &str = "x-tidepool-delivery";

/// An operational event. `name()` is its wire name (`tidepool_core::ALERT_EVENTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertEvent {
    /// A remote backend's circuit breaker opened: requests skip it.
    BreakerOpened { backend: String, region: String },
    /// It closed again: the backend takes requests.
    BreakerClosed { backend: String, region: String },
    /// A model's engine was restarted (by the engine watchdog: [`Alerts::engine_restarted`]).
    EngineRestarted { model: String, reason: String },
    /// This replica cannot reach the ledger's database (requests get 503 `unavailable`).
    DatabaseLost { reason: String },
    /// It can again, after `down_ms`.
    DatabaseRecovered { down_ms: u64 },
    /// The leaked-key detector suspended a key.
    KeySuspended {
        key_id: KeyId,
        tenant: TenantId,
        project: String,
        reason: String,
    },
    /// A reservation was refused `insufficient_quota`: a budget or the balance is exhausted.
    BudgetReached {
        tenant: TenantId,
        project: String,
        key_id: KeyId,
        scope: QuotaScope,
        at_ms: i64,
    },
}

impl AlertEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::BreakerOpened { .. } => "breaker_opened",
            Self::BreakerClosed { .. } => "breaker_closed",
            Self::EngineRestarted { .. } => "engine_restarted",
            Self::DatabaseLost { .. } => "database_lost",
            Self::DatabaseRecovered { .. } => "database_recovered",
            Self::KeySuspended { .. } => "key_suspended",
            Self::BudgetReached { .. } => "budget_reached",
        }
    }

    /// The event's own fields (the payload's `data`).
    fn data(&self) -> serde_json::Value {
        match self {
            Self::BreakerOpened { backend, region } | Self::BreakerClosed { backend, region } => {
                json!({ "backend": backend, "region": region })
            }
            Self::EngineRestarted { model, reason } => json!({ "model": model, "reason": reason }),
            Self::DatabaseLost { reason } => json!({ "reason": reason }),
            Self::DatabaseRecovered { down_ms } => json!({ "down_ms": down_ms }),
            Self::KeySuspended {
                key_id,
                tenant,
                project,
                reason,
            } => json!({
                "key_id": key_id.0, "tenant": tenant.as_str(), "project": project,
                "reason": reason,
                "reinstate": format!("POST /admin/keys/{}/reinstate", key_id.0),
            }),
            Self::BudgetReached {
                tenant,
                project,
                key_id,
                scope,
                at_ms,
            } => {
                let (scope, period) = budget_period(*scope, *at_ms);
                json!({
                    "tenant": tenant.as_str(), "project": project, "key_id": key_id.0,
                    "scope": scope, "period": period,
                })
            }
        }
    }

    /// Events stored at most once per receiver with this key (the dedup rule of
    /// `budget_reached`: once per budget and calendar month, once per tenant and hour for the
    /// balance); `None`: every occurrence is sent.
    pub fn dedup_key(&self) -> Option<String> {
        match self {
            Self::BudgetReached {
                tenant,
                project,
                key_id,
                scope,
                at_ms,
            } => {
                let (scope_name, period) = budget_period(*scope, *at_ms);
                let subject = match scope {
                    QuotaScope::Balance => tenant.to_string(),
                    QuotaScope::ProjectBudget => format!("{tenant}/{project}"),
                    QuotaScope::KeyBudget => key_id.0.clone(),
                };
                Some(format!("budget_reached:{scope_name}:{subject}:{period}"))
            }
            Self::BreakerOpened { .. }
            | Self::BreakerClosed { .. }
            | Self::EngineRestarted { .. }
            | Self::DatabaseLost { .. }
            | Self::DatabaseRecovered { .. }
            | Self::KeySuspended { .. } => None,
        }
    }
}

/// A budget's wire name and its dedup period: the UTC month (`2026-12`) of a monthly budget,
/// the UTC hour (`2026-12-06T14`… as hours since the epoch) of the balance.
fn budget_period(scope: QuotaScope, at_ms: i64) -> (&'static str, String) {
    match scope {
        QuotaScope::Balance => ("balance", format!("hour-{}", at_ms.div_euclid(3_600_000))),
        QuotaScope::ProjectBudget => ("project_budget", Month::of_ms(at_ms).to_string()),
        QuotaScope::KeyBudget => ("key_budget", Month::of_ms(at_ms).to_string()),
    }
}

/// The JSON body sent for one event.
#[derive(Debug, Serialize)]
struct Payload<'a> {
    /// A UUID (version 7); the same on every attempt (`X-Tidepool-Delivery`).
    id: String,
    event: &'static str,
    at_ms: i64,
    replica: &'a str,
    data: serde_json::Value,
}

/// One receiver, ready to send to.
#[derive(Clone)]
pub struct AlertSink {
    config: AlertConfig,
    secret: Arc<[u8]>,
    client: reqwest::Client,
}

impl std::fmt::Debug for AlertSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertSink")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A receiver that cannot be set up (its secret is missing, or the HTTP client failed).
#[derive(Debug, thiserror::Error)]
pub enum AlertSetupError {
    #[error("alert receiver `{id}`: the environment variable `{var}` (secret_env) is not set")]
    SecretMissing { id: String, var: String },
    #[error("alert receiver `{id}`: cannot build its HTTP client: {source}")]
    Client {
        id: String,
        #[source]
        source: reqwest::Error,
    },
}

impl AlertSink {
    /// Reads the secret (`secret`, else the variable `secret_env`) and builds the client.
    pub fn new(config: &AlertConfig) -> Result<Self, AlertSetupError> {
        let secret = match (&config.secret, &config.secret_env) {
            (Some(secret), _) => secret.clone(),
            (None, Some(var)) => {
                std::env::var(var).map_err(|_| AlertSetupError::SecretMissing {
                    id: config.id.clone(),
                    var: var.clone(),
                })?
            }
            (None, None) => String::new(),
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|source| AlertSetupError::Client {
                id: config.id.clone(),
                source,
            })?;
        Ok(Self {
            config: config.clone(),
            secret: secret.into_bytes().into(),
            client,
        })
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// One attempt: POSTs `body`, signed; `Err` says why it failed.
    async fn send(
        &self,
        event: &str,
        delivery: &str,
        body: &str,
        now_ms: i64,
    ) -> Result<(), String> {
        let signature = sign(&self.secret, body.as_bytes());
        let response = self
            .client
            .post(&self.config.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(TIMESTAMP_HEADER, now_ms.div_euclid(1000).to_string())
            .header(EVENT_HEADER, event)
            .header(DELIVERY_HEADER, delivery)
            .body(body.to_owned())
            .send()
            .await
            .map_err(|error| {
                if error.is_timeout() {
                    format!("no answer within {} ms", self.config.timeout_ms)
                } else if error.is_connect() {
                    "cannot connect".to_owned()
                } else {
                    "request failed".to_owned()
                }
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", response.status().as_u16()))
        }
    }

    /// The delay before the next attempt after `failed` attempts (1 = the first failed), or
    /// `None` when `attempts_max` is spent.
    fn retry_in(&self, failed: u32) -> Option<u64> {
        (failed < self.config.attempts_max).then(|| {
            backoff_ms(
                self.config.backoff_initial_ms,
                self.config.backoff_max_ms,
                failed,
            )
        })
    }
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `body`): the value of `X-Tidepool-Signature`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mac = Hmac::<Sha256>::new_from_slice(secret).map(|mut mac| {
        mac.update(body);
        mac.finalize().into_bytes()
    });
    match mac {
        Ok(bytes) => format!("sha256={}", hex::encode(bytes)),
        Err(_) => "sha256=".to_owned(),
    }
}

/// Exponential backoff: `initial × 2^(failed − 1)`, at most `max` (all in ms).
pub fn backoff_ms(initial_ms: u64, max_ms: u64, failed: u32) -> u64 {
    let doublings = failed.saturating_sub(1).min(62);
    initial_ms.saturating_mul(1_u64 << doublings).min(max_ms)
}

/// One event on its way to the writer task.
#[derive(Debug)]
struct Emitted {
    event: AlertEvent,
    at_ms: i64,
}

/// The handle the rest of the gateway emits events through; cheap to clone. Disabled (every
/// call a no-op) when no `[[alerts]]` receiver is configured.
#[derive(Debug, Clone, Default)]
pub struct Alerts {
    inner: Option<Arc<AlertsInner>>,
}

#[derive(Debug)]
struct AlertsInner {
    tx: mpsc::Sender<Emitted>,
    clock: Arc<dyn Clock>,
    /// Dedup keys already emitted by this replica (see [`ALERT_DEDUP_KEYS_MAX`]).
    seen: Mutex<BTreeSet<String>>,
    /// Whether any receiver subscribed to each event, by wire name.
    subscribed: BTreeSet<&'static str>,
    stop: CancellationToken,
}

impl Alerts {
    /// No receivers: every event is ignored.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the writer and delivery tasks on `tasks` for `sinks` (none: disabled).
    pub fn start(
        sinks: Vec<AlertSink>,
        ledger: Ledger,
        clock: Arc<dyn Clock>,
        tasks: &TaskTracker,
    ) -> Self {
        if sinks.is_empty() {
            return Self::disabled();
        }
        let subscribed = tidepool_core::ALERT_EVENTS
            .iter()
            .copied()
            .filter(|event| sinks.iter().any(|s| s.config.wants(event)))
            .collect();
        let (tx, rx) = mpsc::channel(ALERT_QUEUE_LEN_MAX);
        let sinks: Arc<[AlertSink]> = sinks.into();
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let writer = Writer {
            stop: stop.clone(),
            sinks: sinks.clone(),
            ledger: ledger.clone(),
            clock: clock.clone(),
            rx,
            held: VecDeque::new(),
            wake: wake.clone(),
        };
        let deliverer = Deliverer {
            stop: stop.clone(),
            sinks,
            ledger,
            clock: clock.clone(),
            wake,
        };
        tasks.spawn(writer.run());
        tasks.spawn(deliverer.run());
        Self {
            inner: Some(Arc::new(AlertsInner {
                tx,
                clock,
                seen: Mutex::new(BTreeSet::new()),
                subscribed,
                stop,
            })),
        }
    }

    /// Stops the writer and delivery tasks (at shutdown, before draining the task tracker);
    /// rows not yet delivered stay in the outbox for the next start or another replica.
    pub fn stop(&self) {
        if let Some(inner) = &self.inner {
            inner.stop.cancel();
        }
    }

    /// Whether any receiver is configured.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues `event` for its receivers; never waits. Dropped (logged, counted) when the queue
    /// is full; skipped when no receiver subscribed to it or its dedup key was already sent.
    pub fn emit(&self, event: AlertEvent) {
        let Some(inner) = &self.inner else {
            return;
        };
        if !inner.subscribed.contains(event.name()) {
            return;
        }
        if let Some(key) = event.dedup_key() {
            let mut seen = inner.seen.lock();
            if seen.contains(&key) {
                return;
            }
            if seen.len() >= ALERT_DEDUP_KEYS_MAX {
                seen.clear();
            }
            seen.insert(key);
        }
        let name = event.name();
        let emitted = Emitted {
            event,
            at_ms: inner.clock.now_ms(),
        };
        if inner.tx.try_send(emitted).is_err() {
            metrics::counter!(crate::metrics::ALERTS_DROPPED_TOTAL, "event" => name).increment(1);
            tracing::error!(event = name, "alert queue full: event dropped");
        }
    }

    /// For the engine watchdog: a model's engine was restarted (`engine_restarted`).
    pub fn engine_restarted(&self, model: &str, reason: &str) {
        self.emit(AlertEvent::EngineRestarted {
            model: model.to_owned(),
            reason: reason.to_owned(),
        });
    }
}

/// Turns events into outbox rows; holds them in memory while the database is down.
struct Writer {
    stop: CancellationToken,
    sinks: Arc<[AlertSink]>,
    ledger: Ledger,
    clock: Arc<dyn Clock>,
    rx: mpsc::Receiver<Emitted>,
    held: VecDeque<Held>,
    wake: Arc<Notify>,
}

/// A row that could not be written yet.
struct Held {
    row: NewAlert,
    /// The event id (`X-Tidepool-Delivery`).
    delivery: String,
    failed: u32,
    next_at_ms: i64,
}

impl Writer {
    async fn run(mut self) {
        let mut retry = tokio::time::interval(ALERT_HELD_RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                emitted = self.rx.recv() => match emitted {
                    Some(emitted) => self.write(emitted).await,
                    None => return,
                },
                _ = retry.tick() => self.retry_held().await,
            }
        }
    }

    async fn write(&mut self, emitted: Emitted) {
        let id = uuid::Uuid::now_v7().to_string();
        let name = emitted.event.name();
        let payload = Payload {
            id: id.clone(),
            event: name,
            at_ms: emitted.at_ms,
            replica: self.ledger.replica_id(),
            data: emitted.event.data(),
        };
        let Ok(body) = serde_json::to_string(&payload) else {
            tracing::error!(event = name, "cannot serialize an alert");
            return;
        };
        let dedup_key = emitted.event.dedup_key();
        let rows: Vec<NewAlert> = self
            .sinks
            .iter()
            .filter(|sink| sink.config.wants(name))
            .map(|sink| NewAlert {
                sink_id: sink.config.id.clone(),
                event: name.to_owned(),
                payload: body.clone(),
                dedup_key: dedup_key.clone(),
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        // Earlier held rows go first, so events keep their order.
        if self.held.is_empty() {
            match self.ledger.enqueue_alerts(&rows).await {
                Ok(_) => {
                    self.wake.notify_one();
                    return;
                }
                Err(error) => {
                    tracing::warn!(event = name, %error, "cannot write alerts to the outbox: holding them in memory");
                }
            }
        }
        let now_ms = self.clock.now_ms();
        for row in rows {
            self.hold(Held {
                row,
                delivery: id.clone(),
                failed: 0,
                next_at_ms: now_ms,
            });
        }
        self.retry_held().await;
    }

    fn hold(&mut self, held: Held) {
        if self.held.len() >= ALERT_HELD_LEN_MAX
            && let Some(dropped) = self.held.pop_front()
        {
            metrics::counter!(crate::metrics::ALERTS_DROPPED_TOTAL, "event" => "held_overflow")
                .increment(1);
            tracing::error!(event = %dropped.row.event, sink = %dropped.row.sink_id,
                "alert memory queue full: oldest held alert dropped");
        }
        self.held.push_back(held);
    }

    /// Writes the held rows to the outbox; if the database is still down, delivers the due ones
    /// directly.
    async fn retry_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let rows: Vec<NewAlert> = self.held.iter().map(|h| h.row.clone()).collect();
        if self.ledger.enqueue_alerts(&rows).await.is_ok() {
            tracing::info!(rows = rows.len(), "held alerts written to the outbox");
            self.held.clear();
            self.wake.notify_one();
            return;
        }
        let now_ms = self.clock.now_ms();
        let mut keep = VecDeque::with_capacity(self.held.len());
        while let Some(mut held) = self.held.pop_front() {
            let Some(sink) = self.sinks.iter().find(|s| s.config.id == held.row.sink_id) else {
                continue;
            };
            if held.next_at_ms > now_ms {
                keep.push_back(held);
                continue;
            }
            match sink
                .send(&held.row.event, &held.delivery, &held.row.payload, now_ms)
                .await
            {
                Ok(()) => {
                    metrics::counter!(crate::metrics::ALERT_DELIVERIES_TOTAL, "outcome" => "delivered_direct").increment(1);
                }
                Err(reason) => {
                    held.failed = held.failed.saturating_add(1);
                    if let Some(delay) = sink.retry_in(held.failed) {
                        held.next_at_ms =
                            now_ms.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX));
                        keep.push_back(held);
                    } else {
                        metrics::counter!(crate::metrics::ALERT_DELIVERIES_TOTAL, "outcome" => "failed")
                            .increment(1);
                        tracing::error!(sink = %sink.id(), event = %held.row.event, %reason,
                            "alert given up after attempts_max (held in memory)");
                    }
                }
            }
        }
        self.held = keep;
    }
}

/// Claims due outbox rows and delivers them.
struct Deliverer {
    stop: CancellationToken,
    sinks: Arc<[AlertSink]>,
    ledger: Ledger,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
}

impl Deliverer {
    async fn run(self) {
        let timeout_ms_max = self
            .sinks
            .iter()
            .map(|s| s.config.timeout_ms)
            .max()
            .unwrap_or(0);
        let lease = Duration::from_millis(timeout_ms_max)
            .saturating_mul(ALERT_CLAIM_LEN)
            .saturating_add(ALERT_LEASE_SLACK);
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            match self.ledger.claim_alerts(ALERT_CLAIM_LEN, lease_ms).await {
                Ok(claimed) if !claimed.is_empty() => {
                    for row in claimed {
                        self.deliver(row).await;
                    }
                    // There may be more due rows: look again at once.
                    continue;
                }
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "cannot claim alerts"),
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(ALERT_POLL_INTERVAL) => {}
            }
        }
    }

    async fn deliver(&self, row: ClaimedAlert) {
        let Some(sink) = self.sinks.iter().find(|s| s.config.id == row.sink_id) else {
            // A receiver removed from the configuration since: give the row up.
            drop(
                self.ledger
                    .mark_alert_failed(row.id, "no such receiver in the configuration", None)
                    .await,
            );
            return;
        };
        let delivery = serde_json::from_str::<serde_json::Value>(&row.payload)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned))
            .unwrap_or_else(|| row.id.to_string());
        let now_ms = self.clock.now_ms();
        let outcome = sink.send(&row.event, &delivery, &row.payload, now_ms).await;
        let marked = match outcome {
            Ok(()) => {
                metrics::counter!(crate::metrics::ALERT_DELIVERIES_TOTAL, "outcome" => "delivered")
                    .increment(1);
                self.ledger.mark_alert_delivered(row.id).await
            }
            Err(reason) => {
                let failed = row.attempts.saturating_add(1);
                let retry_in = sink.retry_in(failed);
                let outcome = if retry_in.is_some() {
                    "retry"
                } else {
                    "failed"
                };
                metrics::counter!(crate::metrics::ALERT_DELIVERIES_TOTAL, "outcome" => outcome)
                    .increment(1);
                tracing::warn!(sink = %sink.id(), event = %row.event, %reason, attempt = failed,
                    given_up = retry_in.is_none(), "alert delivery failed");
                self.ledger
                    .mark_alert_failed(row.id, &reason, retry_in)
                    .await
            }
        };
        match marked {
            Ok(true) => {}
            Ok(false) => tracing::warn!(row = row.id, "alert claim lost before it was marked"),
            Err(error) => tracing::warn!(row = row.id, %error, "cannot mark an alert"),
        }
    }
}

/// Watches the ledger's database for [`AlertEvent::DatabaseLost`] and
/// [`AlertEvent::DatabaseRecovered`]: sans-IO, fed one check result at a time.
#[derive(Debug, Default)]
pub struct DatabaseWatch {
    failures_in_a_row: u32,
    lost_at_ms: Option<i64>,
}

/// Failed checks in a row that declare the database lost (one failed query is not an outage).
pub const DATABASE_LOST_CHECKS_MIN: u32 = 2;
/// Interval between two checks of the database by the watch task.
pub const DATABASE_WATCH_INTERVAL: Duration = Duration::from_secs(1);

impl DatabaseWatch {
    /// One check's result; returns the event it causes, if any.
    pub fn observe(&mut self, ok: bool, reason: &str, now_ms: i64) -> Option<AlertEvent> {
        if ok {
            self.failures_in_a_row = 0;
            let lost_at = self.lost_at_ms.take()?;
            let down_ms = u64::try_from(now_ms.saturating_sub(lost_at)).unwrap_or(0);
            return Some(AlertEvent::DatabaseRecovered { down_ms });
        }
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        if self.lost_at_ms.is_none() && self.failures_in_a_row >= DATABASE_LOST_CHECKS_MIN {
            self.lost_at_ms = Some(now_ms);
            return Some(AlertEvent::DatabaseLost {
                reason: reason.to_owned(),
            });
        }
        None
    }
}

/// Checks the database every [`DATABASE_WATCH_INTERVAL`] (with the `/readyz` check) and emits
/// `database_lost` / `database_recovered`; runs until aborted.
pub(crate) async fn watch_database(
    ledger: Ledger,
    alerts: Alerts,
    clock: Arc<dyn Clock>,
    check_timeout: Duration,
) {
    let mut watch = DatabaseWatch::default();
    let mut interval = tokio::time::interval(DATABASE_WATCH_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let readiness = ledger.readiness(check_timeout).await;
        let ok = readiness.database.is_ok();
        if let Some(event) = watch.observe(ok, &readiness.database.to_string(), clock.now_ms()) {
            tracing::warn!(event = event.name(), "ledger database state changed");
            alerts.emit(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_max() {
        assert_eq!(backoff_ms(1_000, 60_000, 1), 1_000);
        assert_eq!(backoff_ms(1_000, 60_000, 2), 2_000);
        assert_eq!(backoff_ms(1_000, 60_000, 3), 4_000);
        assert_eq!(backoff_ms(1_000, 60_000, 7), 60_000);
        assert_eq!(backoff_ms(1_000, 60_000, 200), 60_000, "no overflow");
    }

    #[test]
    fn signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let signature = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            signature,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(sign(b"other", b"what do ya want for nothing?"), signature);
    }

    #[test]
    fn database_watch_needs_two_failures_and_reports_recovery_once() {
        let mut watch = DatabaseWatch::default();
        assert_eq!(watch.observe(true, "ok", 0), None);
        assert_eq!(
            watch.observe(false, "down", 1_000),
            None,
            "one failure is no outage"
        );
        let lost = watch.observe(false, "down", 2_000);
        assert_eq!(
            lost,
            Some(AlertEvent::DatabaseLost {
                reason: "down".into()
            })
        );
        assert_eq!(watch.observe(false, "down", 3_000), None, "reported once");
        assert_eq!(
            watch.observe(true, "ok", 5_000),
            Some(AlertEvent::DatabaseRecovered { down_ms: 3_000 })
        );
        assert_eq!(watch.observe(true, "ok", 6_000), None);
    }

    #[test]
    fn budget_alerts_deduplicate_per_budget_and_month_or_tenant_and_hour() {
        let event = |scope, at_ms| AlertEvent::BudgetReached {
            tenant: TenantId::new("acme").unwrap(),
            project: "default".into(),
            key_id: KeyId("k".into()),
            scope,
            at_ms,
        };
        let t0 = 1_794_700_800_000; // 2026-11-15T00:00Z
        let day = 86_400_000;
        let hour = 3_600_000;
        let key = |scope, at| event(scope, at).dedup_key().unwrap();
        assert_eq!(
            key(QuotaScope::KeyBudget, t0),
            key(QuotaScope::KeyBudget, t0 + 10 * day),
            "same month"
        );
        assert_ne!(
            key(QuotaScope::KeyBudget, t0),
            key(QuotaScope::KeyBudget, t0 + 20 * day),
            "next month"
        );
        assert_ne!(
            key(QuotaScope::KeyBudget, t0),
            key(QuotaScope::ProjectBudget, t0)
        );
        assert_eq!(
            key(QuotaScope::Balance, t0),
            key(QuotaScope::Balance, t0 + hour - 1)
        );
        assert_ne!(
            key(QuotaScope::Balance, t0),
            key(QuotaScope::Balance, t0 + hour)
        );
        assert_eq!(
            AlertEvent::DatabaseLost { reason: "x".into() }.dedup_key(),
            None
        );
    }
}
