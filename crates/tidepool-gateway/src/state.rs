//! [`AppState`]: everything a handler needs, built once at start-up and shared by reference —
//! the engines by model id, the ledger, the limits, the task tracker that owns every spawned
//! task (so shutdown can drain settlement writes) and the metrics handle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tidepool_core::config::ResidencyConfig;
use tidepool_core::{
    BatchConfig, BillingConfig, LeakDetectionConfig, Limits, ModelId, ModelKind, TelemetryConfig,
};
use tidepool_engine::{EmbeddingEngine, TextEngine};
use tidepool_ledger::{AuditActor, AuditContext, Clock, Ledger, SystemClock};
use tidepool_runtime::PoolRuntime;
use tokio_util::task::TaskTracker;

use crate::alerts::{AlertSink, Alerts};
use crate::backends::Backends;
use crate::error::CURRENT_REQUEST_ID;
use crate::leak::LeakDetector;

/// The audit context of a change `actor` makes while serving the current request: with its
/// request id when there is one. Every audited ledger call takes one.
pub(crate) fn audit_context(actor: AuditActor) -> AuditContext {
    let context = AuditContext::new(actor);
    match CURRENT_REQUEST_ID.try_with(|id| *id) {
        Ok(request_id) => context.with_request_id(request_id),
        Err(_) => context,
    }
}

/// The audit context of an operator's change through the admin API.
pub(crate) fn admin_audit() -> AuditContext {
    audit_context(AuditActor::Admin)
}

/// The engine behind one served model.
#[derive(Debug, Clone)]
pub enum ModelEngine {
    /// `chat` or `completion` models.
    Text(Arc<dyn TextEngine>),
    /// `embedding` models.
    Embedding(Arc<dyn EmbeddingEngine>),
}

/// One model the gateway serves.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub id: ModelId,
    pub kind: ModelKind,
    /// Longest prompt + completion (text) or input (embedding), in tokens.
    pub context_tokens: u32,
    pub engine: ModelEngine,
}

impl ServedModel {
    /// A text model; `kind` must be `Chat` or `Completion`.
    pub fn text(kind: ModelKind, engine: Arc<dyn TextEngine>) -> Self {
        assert!(
            kind != ModelKind::Embedding,
            "text engines serve chat or completion models"
        );
        Self {
            id: engine.model_id().clone(),
            kind,
            context_tokens: engine.context_tokens(),
            engine: ModelEngine::Text(engine),
        }
    }

    pub fn embedding(engine: Arc<dyn EmbeddingEngine>) -> Self {
        Self {
            id: engine.model_id().clone(),
            kind: ModelKind::Embedding,
            context_tokens: engine.input_tokens_max(),
            engine: ModelEngine::Embedding(engine),
        }
    }
}

/// Shared, cheap-to-clone application state.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    models: BTreeMap<ModelId, ServedModel>,
    ledger: Ledger,
    limits: Limits,
    billing: BillingConfig,
    /// SHA-256 of the admin token; `None`: the admin API answers 404.
    admin_token_sha256: Option<[u8; 32]>,
    /// The key console session cookies are signed with (`console.rs`).
    console_key: [u8; 32],
    /// `[server] base_path`: "" or a prefix like "/gw".
    base_path: String,
    tasks: TaskTracker,
    clock: Arc<dyn Clock>,
    pool: Option<Arc<PoolRuntime>>,
    backends: Option<Arc<Backends>>,
    region: String,
    residency: ResidencyConfig,
    telemetry: TelemetryConfig,
    /// Start-up recovery and the price sync have run; until then model requests are 503.
    started: AtomicBool,
    /// Webhook alerts (disabled without `[[alerts]]`).
    alerts: Alerts,
    /// The leaked-key detector (`None`: `[leak_detection] enabled = false`).
    leak: Option<Mutex<LeakDetector>>,
    /// `[batch]`, with `files_dir` resolved.
    batch: BatchConfig,
    files_dir: std::path::PathBuf,
}

/// Everything [`AppState`] is built from besides models and ledger.
#[derive(Clone)]
pub struct StateOptions {
    pub limits: Limits,
    pub billing: BillingConfig,
    /// Bearer token of `/admin/*`; `None` disables the admin API.
    pub admin_token: Option<String>,
    /// Wall clock for usage timestamps and `created` fields.
    pub clock: Arc<dyn Clock>,
    /// The model pool behind the pooled models (`GET /v1/pool`, admin load/unload).
    pub pool: Option<Arc<PoolRuntime>>,
    /// The remote backends behind the `backend = "remote"` models (`GET /v1/backends`).
    pub backends: Option<Arc<Backends>>,
    /// The region this process runs in (`[server] region`): where its local models run.
    pub region: String,
    /// Residency pins per tenant and per project (`[residency]`).
    pub residency: ResidencyConfig,
    /// The `[[alerts]]` receivers; none: alerts are off.
    pub alert_sinks: Vec<AlertSink>,
    /// `[leak_detection]`.
    pub leak_detection: LeakDetectionConfig,
    /// `[telemetry]`: which projects may have their text exported on their spans.
    pub telemetry: TelemetryConfig,
    /// `[server] base_path`: every route is served under it ("" or e.g. "/gw").
    pub base_path: String,
    /// `[batch]`; an unset `files_dir` means `batch-files` in the working directory
    /// (`tidepool serve` resolves it next to the SQLite database: [`crate::batch_line::files_dir_for`]).
    pub batch: BatchConfig,
}

/// Secrets never reach a log: the admin token is redacted.
impl std::fmt::Debug for StateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateOptions")
            .field("limits", &self.limits)
            .field("billing", &self.billing)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("pool", &self.pool.is_some())
            .field("backends", &self.backends.is_some())
            .field("region", &self.region)
            .field("residency", &self.residency)
            .field("alert_sinks", &self.alert_sinks)
            .field("leak_detection", &self.leak_detection)
            .field("telemetry", &self.telemetry)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl StateOptions {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            billing: BillingConfig::default(),
            admin_token: None,
            clock: Arc::new(SystemClock),
            pool: None,
            backends: None,
            region: tidepool_core::REGION_DEFAULT.to_owned(),
            residency: ResidencyConfig::default(),
            alert_sinks: Vec::new(),
            leak_detection: LeakDetectionConfig::default(),
            telemetry: TelemetryConfig::default(),
            base_path: String::new(),
            batch: BatchConfig::default(),
        }
    }
}

impl AppState {
    /// Builds the state. Model ids are unique (the config validated it; a duplicate here is a
    /// programming error).
    pub fn new(models: Vec<ServedModel>, ledger: Ledger, limits: Limits) -> Self {
        Self::with_options(models, ledger, StateOptions::new(limits))
    }

    /// [`AppState::new`] with every option explicit.
    pub fn with_options(models: Vec<ServedModel>, ledger: Ledger, options: StateOptions) -> Self {
        let StateOptions {
            limits,
            billing,
            admin_token,
            clock,
            pool,
            backends,
            region,
            residency,
            alert_sinks,
            leak_detection,
            telemetry,
            base_path,
            batch,
        } = options;
        let files_dir = batch
            .files_dir
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from(crate::batch_line::FILES_DIR_DEFAULT));
        let admin_token_sha256: Option<[u8; 32]> = admin_token.map(|token| {
            use sha2::Digest as _;
            sha2::Sha256::digest(token.as_bytes()).into()
        });
        let console_key = console_key(admin_token_sha256.as_ref());
        let count = models.len();
        let models: BTreeMap<ModelId, ServedModel> =
            models.into_iter().map(|m| (m.id.clone(), m)).collect();
        assert!(models.len() == count, "served model ids are unique");
        crate::metrics::install();
        let tasks = TaskTracker::new();
        // Alert tasks need a runtime; without receivers nothing is spawned.
        let alerts = Alerts::start(alert_sinks, ledger.clone(), clock.clone(), &tasks);
        if let Some(backends) = &backends {
            backends.set_alerts(alerts.clone());
        }
        let leak = leak_detection
            .enabled
            .then(|| Mutex::new(LeakDetector::new(leak_detection)));
        Self {
            inner: Arc::new(Inner {
                models,
                ledger,
                limits,
                billing,
                admin_token_sha256,
                console_key,
                base_path,
                tasks,
                clock,
                pool,
                backends,
                region,
                residency,
                telemetry,
                started: AtomicBool::new(true),
                alerts,
                leak,
                batch,
                files_dir,
            }),
        }
    }

    pub fn model(&self, id: &str) -> Option<&ServedModel> {
        // ModelId orders by its string; a borrowed lookup avoids validating the input as a slug.
        self.inner.models.values().find(|m| m.id.as_str() == id)
    }

    pub fn models(&self) -> impl Iterator<Item = &ServedModel> {
        self.inner.models.values()
    }

    /// The model pool, when pooled models are served.
    pub fn pool(&self) -> Option<&Arc<PoolRuntime>> {
        self.inner.pool.as_ref()
    }

    /// The remote backends, when any are configured.
    pub(crate) fn backends(&self) -> Option<&Arc<Backends>> {
        self.inner.backends.as_ref()
    }

    /// The regions a request of `tenant`'s `project` may run in (tenant and project pins both
    /// apply); `None`: anywhere.
    pub(crate) fn residency_for(&self, tenant: &str, project: &str) -> Option<Vec<String>> {
        self.inner.residency.regions_for(tenant, project)
    }

    /// `[telemetry]`.
    pub(crate) fn telemetry(&self) -> &TelemetryConfig {
        &self.inner.telemetry
    }

    /// The region local models run in.
    pub(crate) fn region(&self) -> &str {
        &self.inner.region
    }

    /// Whether start-up recovery and the price sync have run (always, unless the server started
    /// with its database schema behind and still waits for it: `start_up_when_current`).
    pub fn is_started(&self) -> bool {
        self.inner.started.load(Ordering::Acquire)
    }

    pub(crate) fn set_started(&self, started: bool) {
        self.inner.started.store(started, Ordering::Release);
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn billing(&self) -> &BillingConfig {
        &self.inner.billing
    }

    /// Whether `token` is the admin token (constant-time over the SHA-256 digests); always
    /// `false` when no admin token is configured.
    pub(crate) fn is_admin_token(&self, token: &str) -> bool {
        use sha2::Digest as _;
        use subtle::ConstantTimeEq as _;
        self.inner.admin_token_sha256.is_some_and(|expected| {
            let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
            bool::from(digest.ct_eq(&expected))
        })
    }

    pub(crate) fn admin_enabled(&self) -> bool {
        self.inner.admin_token_sha256.is_some()
    }

    /// The key console sessions are signed with.
    pub(crate) fn console_key(&self) -> &[u8; 32] {
        &self.inner.console_key
    }

    /// `[server] base_path` ("" or a prefix like "/gw").
    pub fn base_path(&self) -> &str {
        &self.inner.base_path
    }

    /// Every task the gateway spawns goes through this tracker; shutdown closes and waits on it.
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// Webhook alerts: the engine watchdog reports restarts through
    /// [`Alerts::engine_restarted`].
    pub fn alerts(&self) -> &Alerts {
        &self.inner.alerts
    }

    /// Appends an event that changes nothing in the ledger (a model loaded, a request refused by
    /// residency) to the audit log; a failure is logged, and returned.
    pub(crate) async fn audit_event(
        &self,
        audit: &AuditContext,
        action: &str,
        target: &str,
        details: &serde_json::Value,
    ) -> Result<(), tidepool_ledger::LedgerError> {
        let appended = self
            .ledger()
            .append_audit(audit, action, target, details)
            .await;
        if let Err(error) = &appended {
            tracing::error!(%error, action, target, "cannot audit an event");
        }
        appended.map(drop)
    }

    /// `[batch]`.
    pub fn batch_config(&self) -> &BatchConfig {
        &self.inner.batch
    }

    /// Where batch file contents live.
    pub fn files_dir(&self) -> &std::path::Path {
        &self.inner.files_dir
    }

    /// The leaked-key detector, when enabled.
    pub(crate) fn leak(&self) -> Option<&Mutex<LeakDetector>> {
        self.inner.leak.as_ref()
    }

    pub(crate) fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// Unix seconds, for OpenAI `created` fields.
    pub(crate) fn now_s(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

/// Console sessions are signed with a key derived from the admin token, so every replica that
/// shares the token accepts them and changing the token ends them; without a token, a key drawn
/// at start-up (sessions then end with the process).
fn console_key(admin_token_sha256: Option<&[u8; 32]>) -> [u8; 32] {
    use hmac::Mac as _;
    match admin_token_sha256 {
        Some(token_sha256) => hmac::Hmac::<sha2::Sha256>::new_from_slice(token_sha256).map_or_else(
            |_| rand::random(),
            |mut mac| {
                mac.update(b"tidepool console session v1");
                mac.finalize().into_bytes().into()
            },
        ),
        None => rand::random(),
    }
}
