//! `tidepool.toml`: parsed strictly (`deny_unknown_fields`) into raw structs, then validated into
//! [`Config`] at start-up. Every limit is named with its unit and has a stated default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{CoreError, FieldError, ModelId, Nanos, TokenCount, money::Currency};

mod alerts;
mod audit;
mod sources;

pub use alerts::{ALERT_EVENTS, ALERT_SINKS_MAX, AlertConfig, LeakDetectionConfig};
pub use audit::{AUDIT_CHECKPOINT_KEY_ENV_DEFAULT, AuditConfig};

pub use sources::{
    ENV_PREFIX, ENV_SEPARATOR, Resolved, Source, database_location, is_config_var, redact_url,
};

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub pool: PoolSection,
    #[serde(default)]
    pub billing: BillingConfig,
    #[serde(default, rename = "models")]
    pub models: Vec<ModelConfig>,
    /// Remote backends (`tidepool worker`s and external OpenAI-compatible servers) that serve the
    /// `backend = "remote"` models (docs/regions.md).
    #[serde(default, rename = "backends")]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub residency: ResidencyConfig,
    /// Webhook receivers of operational events (docs/operations.md).
    #[serde(default, rename = "alerts")]
    pub alerts: Vec<AlertConfig>,
    #[serde(default)]
    pub leak_detection: LeakDetectionConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The audit log's signed checkpoints.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The Batch API (`/v1/files`, `/v1/batches`; docs/batch.md).
    #[serde(default)]
    pub batch: BatchConfig,
}

/// `[batch]`: the Batch API's storage, limits and runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Run batches in this process (the runner task). Off, the API still accepts files and
    /// batches, and another replica runs them.
    pub runner_enabled: bool,
    /// Where file contents live. Unset: `batch-files` next to the SQLite database file (or in
    /// the working directory with PostgreSQL, where every replica must share one volume).
    pub files_dir: Option<PathBuf>,
    /// Largest uploaded file, in bytes (OpenAI: 200 MB).
    pub file_bytes_max: u64,
    /// Most lines (requests) in one batch's input file (OpenAI: 50,000).
    pub batch_lines_max: u64,
    /// Longest line of an input file, in bytes (a line is one request body and its envelope).
    pub line_bytes_max: u64,
    /// Lines of one batch running at once.
    pub lines_in_flight_max: u32,
    /// How often an idle runner looks for work, in ms.
    pub poll_interval_ms: u64,
    /// How long a runner's claim on a batch lasts without renewal, in ms; a replica that dies
    /// mid-batch leaves it to another after this.
    pub lease_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            runner_enabled: true,
            files_dir: None,
            file_bytes_max: 200_000_000,
            batch_lines_max: 50_000,
            line_bytes_max: 1_048_576,
            lines_in_flight_max: 4,
            poll_interval_ms: 1_000,
            lease_ms: 60_000,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address `tidepool serve` listens on.
    pub listen: String,
    /// `sqlite://…` (default, embedded) or `postgres://…`.
    pub database_url: String,
    /// Where model files named by relative `file` paths live.
    pub models_dir: Option<PathBuf>,
    /// The region this process runs in: local models serve only tenants whose residency allows
    /// it, and remote backends in this region are preferred.
    pub region: String,
    /// The zone within `region` (a label on `/v1/backends` and metrics).
    pub zone: String,
    /// `serve` and `worker` apply the ledger's missing migrations at start-up (default). Off
    /// (several replicas, migrations run once by `tidepool migrate`), they connect to the schema
    /// as it is: with the schema behind they still start, `GET /readyz` answers 503 and model
    /// requests 503 `unavailable` until it is current, then start-up recovery runs.
    pub migrate_on_start: bool,
    /// A path prefix every route is served under (`"/gw"`: `/gw/v1/chat/completions`,
    /// `/gw/console/`), for a reverse proxy that forwards a sub-path without stripping it.
    /// Empty (default): routes at the root.
    pub base_path: String,
    /// A second listener serving only `GET /metrics`, without authentication, for Prometheus
    /// (e.g. `"0.0.0.0:9464"`). On the public listener `/metrics` needs the admin token either
    /// way.
    pub metrics_listen: Option<String>,
}

/// Longest `server.base_path`, in bytes.
pub const BASE_PATH_BYTES_MAX: usize = 128;

impl ServerConfig {
    fn validate(&self, problems: &mut Problems) {
        let path = &self.base_path;
        if !path.is_empty() {
            let well_formed = path.len() <= BASE_PATH_BYTES_MAX
                && path.starts_with('/')
                && !path.ends_with('/')
                && !path.contains("//")
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
            if !well_formed {
                problems.add(
                    "server.base_path",
                    format!(
                        "must be empty or like \"/gw\": a leading `/`, no trailing `/`, at most \
                         {BASE_PATH_BYTES_MAX} bytes of letters, digits, `-`, `_`, `.` and `/`"
                    ),
                );
            }
        }
        if let Some(address) = &self.metrics_listen
            && address.parse::<std::net::SocketAddr>().is_err()
        {
            problems.add(
                "server.metrics_listen",
                "must be an IP address and port, e.g. \"0.0.0.0:9464\"",
            );
        }
    }
}

/// The database URL's password never reaches a log through `{:?}`.
impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("database_url", &redact_url(&self.database_url))
            .field("models_dir", &self.models_dir)
            .field("region", &self.region)
            .field("zone", &self.zone)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("base_path", &self.base_path)
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            database_url: "sqlite://tidepool.db".to_owned(),
            models_dir: None,
            region: REGION_DEFAULT.to_owned(),
            zone: REGION_DEFAULT.to_owned(),
            migrate_on_start: true,
            base_path: String::new(),
            metrics_listen: None,
        }
    }
}

/// Request-facing limits. Each is enforced at one named place (see docs/architecture.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted HTTP request body; larger gets 413.
    pub request_body_bytes_max: u64,
    /// Largest `max_tokens` a request may ask for.
    pub completion_tokens_max: TokenCount,
    /// Requests waiting for an engine slot, per model outside the pool (unpooled engines,
    /// `[pool] enabled = false`); beyond it a 429 with `Retry-After`. Pooled models share the
    /// pool's own queue, `[pool] admission_queue_len_max`.
    pub admission_queue_len_max: u32,
    /// Token chunks buffered per stream before the engine holds that sequence.
    pub stream_chunks_buffered_max: u32,
    /// Wall-clock limit of one request, from admission to last token.
    pub request_timeout_ms: u64,
    /// A stream whose reader does not drain its buffer for this long is cancelled.
    pub stream_stall_ms_max: u64,
    /// Items in one `/v1/embeddings` input array.
    pub embedding_inputs_max: u32,
    /// Stop sequences per request.
    pub stop_sequences_max: u32,
    /// Bytes per stop sequence.
    pub stop_sequence_bytes_max: u32,
    /// Messages in one chat request.
    pub chat_messages_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_body_bytes_max: 4 * 1024 * 1024,
            completion_tokens_max: 4096,
            admission_queue_len_max: 256,
            stream_chunks_buffered_max: 256,
            request_timeout_ms: 600_000,
            stream_stall_ms_max: 30_000,
            embedding_inputs_max: 256,
            stop_sequences_max: 4,
            stop_sequence_bytes_max: 64,
            chat_messages_max: 256,
        }
    }
}

/// How the llama.cpp engine runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// CPU threads used for decoding (0 = all cores).
    pub threads: u32,
    /// Most prompt tokens processed in one engine step (llama.cpp `n_batch`).
    pub batch_tokens_max: u32,
    /// Wait before the watchdog restarts an engine thread that stopped, in ms; doubled for each
    /// further restart of a streak (docs/operations.md § Watchdog and readiness).
    pub restart_backoff_initial_ms: u64,
    /// Longest wait between restarts, in ms; a thread that ran this long before it stopped
    /// starts a new streak.
    pub restart_backoff_max_ms: u64,
    /// A live engine thread with no heartbeat for this long is reported stuck by `/readyz`, in
    /// ms (it beats between actions and between decode steps, and at least once a second idle).
    pub heartbeat_stale_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            batch_tokens_max: 512,
            restart_backoff_initial_ms: 100,
            restart_backoff_max_ms: 30_000,
            heartbeat_stale_ms: 30_000,
        }
    }
}

/// Metering and billing (see docs/ledger.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// `true` (default): every model request reserves its maximum cost against the tenant's
    /// balance, budgets and RPM/TPM windows before any compute, and settles exactly at the end.
    /// `false`: requests are only recorded (usage entries, no money moves) — for a private
    /// deployment without billing, and for `tidepool bench ledger`'s baseline.
    pub enforce: bool,
    /// Names this gateway among the replicas sharing one database; stable across restarts and
    /// unique among live replicas (start-up recovery resolves the reservations made under it).
    pub replica_id: String,
    /// Completion tokens delivered between two durable progress checkpoints of a stream (the
    /// most a crash can leave unbilled per stream).
    pub checkpoint_tokens: u32,
    /// Open reservations older than this (any replica's) are resolved by the periodic recovery
    /// sweep; must exceed `limits.request_timeout_ms`.
    pub stale_reservation_ms: u64,
    /// How long a settlement that failed because the database was unreachable is retried from
    /// memory (a stream cut by the outage keeps its delivered-token count here and settles when
    /// the store returns); must be below `stale_reservation_ms`, so the owner settles before any
    /// sweep does.
    pub settle_retry_ms_max: u64,
    /// What a batch line costs, in parts per million of the online price (500,000 = half).
    pub batch_discount_ppm: u32,
    /// Per-model overrides of `batch_discount_ppm`, by model id.
    pub batch_discount_ppm_models: std::collections::BTreeMap<String, u32>,
}

impl BillingConfig {
    /// The batch discount of `model`, in parts per million of its online price.
    pub fn batch_discount_ppm_of(&self, model: &str) -> u32 {
        self.batch_discount_ppm_models
            .get(model)
            .copied()
            .unwrap_or(self.batch_discount_ppm)
    }
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            enforce: true,
            replica_id: "default".to_owned(),
            checkpoint_tokens: 32,
            stale_reservation_ms: 3_600_000,
            settle_retry_ms_max: 1_800_000,
            batch_discount_ppm: 500_000,
            batch_discount_ppm_models: std::collections::BTreeMap::new(),
        }
    }
}

/// Which engine runs a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// llama.cpp for `chat`/`completion`, candle for `embedding`.
    #[default]
    Auto,
    /// The deterministic fake text engine (no model file): load tests and benches only.
    Fake,
    /// Served by the `[[backends]]` that list it (workers or upstream OpenAI-compatible
    /// servers); no model file here.
    Remote,
}

/// The region of a server that names none.
pub const REGION_DEFAULT: &str = "local";
/// Most `[[backends]]`.
pub const BACKENDS_MAX: usize = 64;

/// What sits behind a `[[backends]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// A `tidepool worker` (or `tidepool serve`): health-checked on `/healthz`.
    Worker,
    /// Any OpenAI-compatible server: health-checked on `/v1/models`.
    Upstream,
}

/// One remote backend (`[[backends]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique among backends; a label on metrics and `/v1/backends`.
    pub id: String,
    pub kind: BackendKind,
    /// Base URL up to and including `/v1`'s parent, e.g. `http://10.0.0.7:8080`.
    pub url: String,
    pub region: String,
    #[serde(default = "default_zone")]
    pub zone: String,
    /// Environment variable holding the bearer token sent to the backend (never logged).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the bearer token (trailing whitespace ignored; never logged).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The `backend = "remote"` models this backend serves.
    pub models: Vec<ModelId>,
    /// The backend's own name of a model, where it differs (`{ "local-id" = "upstream-name" }`).
    #[serde(default)]
    pub aliases: std::collections::BTreeMap<String, String>,
    /// Limit of one attempt on this backend, from sending to the last byte.
    #[serde(default = "default_backend_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests in flight to this backend at once; beyond it the router tries another backend
    /// or answers 429 `overloaded`.
    #[serde(default = "default_backend_concurrency_max")]
    pub concurrency_max: u32,
}

fn default_zone() -> String {
    REGION_DEFAULT.to_owned()
}
fn default_backend_timeout_ms() -> u64 {
    60_000
}
fn default_backend_concurrency_max() -> u32 {
    64
}

/// How the gateway routes to and fails over between backends (`[routing]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Backends one request tries before it fails (first attempt included).
    pub retry_attempts_max: u32,
    /// Consecutive failures that open a backend's circuit breaker.
    pub breaker_failures_max: u32,
    /// How long an open breaker stays open before one trial request (half-open), in ms.
    pub breaker_open_ms: u64,
    /// Interval between health probes of each backend, in ms.
    pub health_interval_ms: u64,
    /// Limit of one health probe, in ms; a probe that takes longer is a failure.
    pub health_timeout_ms: u64,
    /// Limit of connecting to a backend, in ms (a dead host fails fast, not at `timeout_ms`).
    pub connect_timeout_ms: u64,
    /// `true` (default): every backend must answer its health probe at start-up, or the
    /// gateway does not start.
    pub probe_at_start: bool,
}

impl RoutingConfig {
    fn validate(&self, problems: &mut Problems) {
        let mut at_least_one = |name: &str, value: u64| {
            if value == 0 {
                problems.add(format!("routing.{name}"), "must be at least 1");
            }
        };
        at_least_one("retry_attempts_max", self.retry_attempts_max.into());
        at_least_one("breaker_failures_max", self.breaker_failures_max.into());
        at_least_one("health_interval_ms", self.health_interval_ms);
        at_least_one("health_timeout_ms", self.health_timeout_ms);
        at_least_one("connect_timeout_ms", self.connect_timeout_ms);
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            retry_attempts_max: 3,
            breaker_failures_max: 3,
            breaker_open_ms: 2_000,
            health_interval_ms: 250,
            health_timeout_ms: 200,
            connect_timeout_ms: 200,
            probe_at_start: true,
        }
    }
}

/// The OTLP encodings the trace exporter speaks.
pub const OTLP_PROTOCOLS: &[&str] = &["http/protobuf"];

/// How the server writes its log lines to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, with the request's id, trace id, tenant and model.
    Json,
}

/// Traces and logs (`[telemetry]`). Tracing is off unless an OTLP endpoint is set, here or by
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; the standard `OTEL_*` variables win over these keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of the OTLP/HTTP collector (`/v1/traces` is appended); empty: tracing off.
    pub otlp_endpoint: String,
    /// The OTLP encoding; only `http/protobuf` ([`OTLP_PROTOCOLS`]).
    pub otlp_protocol: String,
    /// The `service.name` resource attribute of every span.
    pub service_name: String,
    /// Share of new traces sampled, 0.0 to 1.0; a caller's sampled flag is followed.
    pub sample_ratio: f64,
    /// Finished spans waiting for export; beyond it spans are dropped and counted
    /// (`tidepool_telemetry_spans_dropped_total`), never waited for.
    pub export_queue_spans_max: u32,
    /// Spans in one export request.
    pub export_batch_spans_max: u32,
    /// Longest a finished span waits before its batch is sent, in ms.
    pub export_interval_ms: u64,
    /// Limit of one export request, in ms; a batch that fails is dropped and counted.
    pub export_timeout_ms: u64,
    /// `text` (default) or `json`.
    pub log_format: LogFormat,
    /// `"tenant/project"` whose prompt and completion text may be exported on their spans;
    /// no other request's text ever is.
    pub content_projects: Vec<String>,
}

impl TelemetryConfig {
    fn validate(&self, problems: &mut Problems) {
        if !OTLP_PROTOCOLS.contains(&self.otlp_protocol.as_str()) {
            problems.add(
                "telemetry.otlp_protocol",
                format!("must be one of {OTLP_PROTOCOLS:?}"),
            );
        }
        if self.service_name.is_empty() {
            problems.add("telemetry.service_name", "must not be empty");
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            problems.add("telemetry.sample_ratio", "must be between 0.0 and 1.0");
        }
        let mut at_least_one = |name: &str, value: u64| {
            if value == 0 {
                problems.add(format!("telemetry.{name}"), "must be at least 1");
            }
        };
        at_least_one("export_queue_spans_max", self.export_queue_spans_max.into());
        at_least_one("export_batch_spans_max", self.export_batch_spans_max.into());
        at_least_one("export_interval_ms", self.export_interval_ms);
        at_least_one("export_timeout_ms", self.export_timeout_ms);
        if self.export_batch_spans_max > self.export_queue_spans_max {
            problems.add(
                "telemetry.export_batch_spans_max",
                "must not exceed telemetry.export_queue_spans_max",
            );
        }
        for (index, project) in self.content_projects.iter().enumerate() {
            let parts: Vec<&str> = project.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|part| part.is_empty()) {
                problems.add(
                    format!("telemetry.content_projects[{index}]"),
                    "must be `tenant/project`",
                );
            }
        }
    }

    /// Whether a request of `tenant`'s `project` may have its text exported.
    pub fn exports_content_of(&self, tenant: &str, project: &str) -> bool {
        self.content_projects.iter().any(|entry| {
            entry
                .split_once('/')
                .is_some_and(|(t, p)| t == tenant && p == project)
        })
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            otlp_protocol: "http/protobuf".to_owned(),
            service_name: "tidepool".to_owned(),
            sample_ratio: 1.0,
            export_queue_spans_max: 2048,
            export_batch_spans_max: 512,
            export_interval_ms: 1_000,
            export_timeout_ms: 2_000,
            log_format: LogFormat::Text,
            content_projects: Vec::new(),
        }
    }
}

/// Data residency (`[residency]`): which regions a tenant's or a project's requests may run in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResidencyConfig {
    /// Tenant id → the only regions its requests may be sent to. Unlisted tenants may run
    /// anywhere (and fail over across regions).
    pub tenants: std::collections::BTreeMap<String, Vec<String>>,
    /// `"tenant/project"` → the only regions that project's requests may be sent to. With a
    /// tenant pin too, both apply (the intersection).
    pub projects: std::collections::BTreeMap<String, Vec<String>>,
}

impl ResidencyConfig {
    /// The regions a request of `tenant`'s `project` may run in; `None`: anywhere. An empty
    /// list (tenant and project pins that do not overlap) allows nowhere.
    pub fn regions_for(&self, tenant: &str, project: &str) -> Option<Vec<String>> {
        let by_tenant = self.tenants.get(tenant);
        let by_project = self.projects.get(&format!("{tenant}/{project}"));
        match (by_tenant, by_project) {
            (None, None) => None,
            (Some(only), None) | (None, Some(only)) => Some(only.clone()),
            (Some(tenant_pin), Some(project_pin)) => Some(
                project_pin
                    .iter()
                    .filter(|r| tenant_pin.contains(r))
                    .cloned()
                    .collect(),
            ),
        }
    }
}

/// The pool scheduler's knobs (owned by `tidepool-pool`), the bulk of `[pool]`.
pub use tidepool_pool::PoolKnobs;
/// Which scheduling policy the model pool uses (owned by `tidepool-pool`).
pub use tidepool_pool::PoolPolicy;

/// The model pool (`[pool]`): every llama.cpp text model runs on one accelerator thread under
/// this policy and budget (docs/pool.md). The scheduler's knobs are the pool's own
/// [`PoolKnobs`], flattened into the section (`ttft_slo_ms`, `decode_steps_min`, …), so the
/// server, `tidepool sim` and `tidepool plan` read one struct with one set of defaults. Unknown
/// keys are refused by name, as everywhere else in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PoolSectionKeys")]
pub struct PoolSection {
    /// `false`: each text model gets its own continuous-batching engine, all always loaded
    /// (the skeleton's engine, kept for `tidepool bench engine`).
    pub enabled: bool,
    pub policy: PoolPolicy,
    /// Cap on weights + contexts + saved sequence states, in bytes; `None`: see below.
    pub memory_bytes_max: Option<u64>,
    /// Without `memory_bytes_max`: a budget that fits this many of the largest models at once
    /// (plus `kv_saved_bytes_max`), sizes as measured at start-up; neither: everything fits.
    pub memory_models_max: Option<u32>,
    /// Cap on saved sequence states, in bytes (inside `memory_bytes_max`).
    pub kv_saved_bytes_max: u64,
    /// The scheduler's knobs; their keys sit directly in `[pool]`.
    #[serde(flatten)]
    pub knobs: PoolKnobs,
}

impl PoolSection {
    fn validate(&self, problems: &mut Problems) {
        for problem in self.knobs.problems() {
            problems.add(format!("pool.{}", problem.field), problem.reason);
        }
        if self.memory_models_max == Some(0) {
            problems.add("pool.memory_models_max", "must be at least 1");
        }
    }

    /// Every key the section takes, in serialization order (the knobs' included).
    fn keys() -> Vec<String> {
        match toml::Value::try_from(Self::default()) {
            Ok(toml::Value::Table(table)) => table.keys().cloned().collect(),
            _ => Vec::new(),
        }
        .into_iter()
        .chain([
            "memory_bytes_max".to_owned(),
            "memory_models_max".to_owned(),
        ])
        .collect()
    }
}

impl Default for PoolSection {
    fn default() -> Self {
        Self {
            enabled: true,
            policy: PoolPolicy::SwapLru,
            memory_bytes_max: None,
            memory_models_max: None,
            kv_saved_bytes_max: 1 << 30,
            knobs: PoolKnobs::default(),
        }
    }
}

/// `[pool]` as written: the section's own keys, the knobs (which take theirs out), and whatever
/// is left, which must be nothing. (serde's `deny_unknown_fields` does not combine with
/// `flatten`; this does the same check, naming the key.)
#[derive(Deserialize)]
#[serde(default)]
#[expect(
    clippy::zero_sized_map_values,
    reason = "only the names of the keys left over matter, never their values"
)]
struct PoolSectionKeys {
    enabled: bool,
    policy: PoolPolicy,
    memory_bytes_max: Option<u64>,
    memory_models_max: Option<u32>,
    kv_saved_bytes_max: u64,
    #[serde(flatten)]
    knobs: PoolKnobs,
    #[serde(flatten)]
    unknown: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
}

impl Default for PoolSectionKeys {
    fn default() -> Self {
        let section = PoolSection::default();
        Self {
            enabled: section.enabled,
            policy: section.policy,
            memory_bytes_max: section.memory_bytes_max,
            memory_models_max: section.memory_models_max,
            kv_saved_bytes_max: section.kv_saved_bytes_max,
            knobs: section.knobs,
            unknown: std::collections::BTreeMap::new(),
        }
    }
}

impl TryFrom<PoolSectionKeys> for PoolSection {
    type Error = String;

    fn try_from(keys: PoolSectionKeys) -> Result<Self, String> {
        if let Some(unknown) = keys.unknown.keys().next() {
            let mut expected = Self::keys();
            expected.sort();
            return Err(format!(
                "unknown field `{unknown}`, expected one of {}",
                expected
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(Self {
            enabled: keys.enabled,
            policy: keys.policy,
            memory_bytes_max: keys.memory_bytes_max,
            memory_models_max: keys.memory_models_max,
            kv_saved_bytes_max: keys.kv_saved_bytes_max,
            knobs: keys.knobs,
        })
    }
}

/// What a model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Instruction-tuned: `/v1/chat/completions` and `/v1/completions`.
    Chat,
    /// Base model: `/v1/completions` only.
    Completion,
    /// `/v1/embeddings` only.
    Embedding,
}

/// One served model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub id: ModelId,
    pub kind: ModelKind,
    /// GGUF file (chat/completion) or model directory (embedding); relative to `models_dir`.
    /// Not used by `backend = "remote"` models.
    #[serde(default)]
    pub file: PathBuf,
    /// Longest sequence (prompt + completion) one request may use.
    #[serde(default = "default_context_tokens")]
    pub context_tokens: TokenCount,
    /// Sequences decoded together (continuous-batching slots).
    #[serde(default = "default_seqs_max")]
    pub seqs_max: u32,
    /// Currency of the prices below.
    #[serde(default = "default_currency")]
    pub currency: Currency,
    /// Price per million prompt tokens, nano-units.
    #[serde(default)]
    pub price_input_per_mtok: Nanos,
    /// Price per million completion tokens, nano-units.
    #[serde(default)]
    pub price_output_per_mtok: Nanos,
    /// Price per million cached prompt tokens (a prefix served from the prompt cache),
    /// nano-units; unset = `price_input_per_mtok` (cached tokens are never free by accident).
    #[serde(default)]
    pub price_cached_input_per_mtok: Option<Nanos>,
    /// Pooled llama.cpp models: prompt tokens whose KV the model's idle slots keep for prefix
    /// reuse, over all its slots (least recently used cleared first); 0 turns reuse off.
    #[serde(default = "default_prefix_cache_tokens_max")]
    pub prefix_cache_tokens_max: TokenCount,
    /// Which engine runs it.
    #[serde(default)]
    pub backend: Backend,
    /// `backend = "fake"` only: simulated time of one decode step, in microseconds.
    #[serde(default)]
    pub fake_decode_step_us: u64,
    /// Pool: never evicted once loaded.
    #[serde(default)]
    pub pin: bool,
    /// Pool: unloaded after this long without work (scale to zero), in ms; unset = kept until
    /// memory is needed.
    #[serde(default)]
    pub keep_alive_ms: Option<u64>,
}

fn default_prefix_cache_tokens_max() -> TokenCount {
    16_384
}

impl ModelConfig {
    /// The price of a cached prompt token: the configured one, else the input price.
    pub fn cached_input_price(&self) -> Nanos {
        self.price_cached_input_per_mtok
            .unwrap_or(self.price_input_per_mtok)
    }
}

fn default_context_tokens() -> TokenCount {
    2048
}
fn default_seqs_max() -> u32 {
    16
}
fn default_currency() -> Currency {
    Currency::USD
}

/// Upper bound on `seqs_max`: llama.cpp sequence ids and our batch arrays are sized from it.
pub const SEQS_MAX_LIMIT: u32 = 256;
/// Upper bound on `context_tokens`.
pub const CONTEXT_TOKENS_LIMIT: TokenCount = 131_072;

/// Every problem [`Config::validate`] finds, in the order found.
#[derive(Debug, Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn into_result(self) -> Result<(), CoreError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(CoreError::ConfigInvalid { errors: self.0 })
        }
    }
}

impl Config {
    /// Parses and validates config text; `path` is only for error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, CoreError> {
        let config: Self =
            toml::from_str(text).map_err(|error| CoreError::config_parse(path, text, &error))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and relations a type cannot express, and reports every problem found (each
    /// named by its key), not just the first. Runs once at start-up.
    pub fn validate(&self) -> Result<(), CoreError> {
        let mut problems = Problems::default();
        self.server.validate(&mut problems);
        self.validate_models(&mut problems);
        self.pool.validate(&mut problems);
        self.validate_backends(&mut problems);
        self.routing.validate(&mut problems);
        self.telemetry.validate(&mut problems);
        let limits = &self.limits;
        if limits.admission_queue_len_max == 0 {
            problems.add("limits.admission_queue_len_max", "must be at least 1");
        }
        if limits.stream_chunks_buffered_max == 0 {
            problems.add("limits.stream_chunks_buffered_max", "must be at least 1");
        }
        if limits.request_body_bytes_max < 1024 {
            problems.add("limits.request_body_bytes_max", "must be at least 1024");
        }
        if self.billing.replica_id.is_empty() || self.billing.replica_id.len() > 64 {
            problems.add("billing.replica_id", "must be 1 to 64 bytes");
        }
        if self.billing.checkpoint_tokens == 0 {
            problems.add("billing.checkpoint_tokens", "must be at least 1");
        }
        if self.billing.stale_reservation_ms <= limits.request_timeout_ms {
            problems.add(
                "billing.stale_reservation_ms",
                "must exceed limits.request_timeout_ms",
            );
        }
        if self.billing.settle_retry_ms_max >= self.billing.stale_reservation_ms {
            problems.add(
                "billing.settle_retry_ms_max",
                "must be below billing.stale_reservation_ms",
            );
        }
        self.validate_batch(&mut problems);
        if self.engine.batch_tokens_max == 0 {
            problems.add("engine.batch_tokens_max", "must be at least 1");
        }
        self.validate_alerts(&mut problems);
        if self.engine.restart_backoff_max_ms < self.engine.restart_backoff_initial_ms {
            problems.add(
                "engine.restart_backoff_max_ms",
                "must be at least engine.restart_backoff_initial_ms",
            );
        }
        if self.engine.heartbeat_stale_ms < 2_000 {
            // An idle engine thread beats once a second: a tighter bound would flap.
            problems.add("engine.heartbeat_stale_ms", "must be at least 2000");
        }
        problems.into_result()
    }

    /// `[batch]` and the batch discounts of `[billing]`.
    fn validate_batch(&self, problems: &mut Problems) {
        for (model, ppm) in std::iter::once((&String::new(), &self.billing.batch_discount_ppm))
            .chain(&self.billing.batch_discount_ppm_models)
        {
            if *ppm > 1_000_000 {
                let field = if model.is_empty() {
                    "billing.batch_discount_ppm".to_owned()
                } else {
                    format!("billing.batch_discount_ppm_models.{model}")
                };
                problems.add(field, "must be at most 1000000 (the online price)");
            }
        }
        let batch = &self.batch;
        if batch.file_bytes_max == 0 {
            problems.add("batch.file_bytes_max", "must be at least 1");
        }
        if batch.batch_lines_max == 0 {
            problems.add("batch.batch_lines_max", "must be at least 1");
        }
        if batch.line_bytes_max < 1024 {
            problems.add("batch.line_bytes_max", "must be at least 1024");
        }
        if batch.lines_in_flight_max == 0 || batch.lines_in_flight_max > 1024 {
            problems.add("batch.lines_in_flight_max", "must be 1 to 1024");
        }
        if batch.poll_interval_ms == 0 {
            problems.add("batch.poll_interval_ms", "must be at least 1");
        }
        if batch.lease_ms < 1_000 {
            problems.add("batch.lease_ms", "must be at least 1000");
        }
    }

    /// `[[alerts]]`, `[leak_detection]` and `[audit]`.
    fn validate_alerts(&self, problems: &mut Problems) {
        let mut errors = Vec::new();
        if self.alerts.len() > ALERT_SINKS_MAX {
            errors.push(("alerts".to_owned(), format!("at most {ALERT_SINKS_MAX}")));
        }
        let mut ids = std::collections::BTreeSet::new();
        for (index, alert) in self.alerts.iter().enumerate() {
            if !ids.insert(alert.id.as_str()) {
                errors.push((
                    format!("alerts[{index}].id"),
                    format!("duplicate alert receiver id `{}`", alert.id),
                ));
            }
            alert.validate(index, &mut errors);
        }
        self.leak_detection.validate(&mut errors);
        self.audit.validate(&mut errors);
        for (field, reason) in errors {
            problems.add(field, reason);
        }
    }

    /// `[[models]]`: unique ids, sizes in range, prices never negative.
    fn validate_models(&self, problems: &mut Problems) {
        let mut seen = std::collections::BTreeSet::new();
        for (index, model) in self.models.iter().enumerate() {
            let field = |name: &str| format!("models[{index}].{name}");
            if !seen.insert(model.id.clone()) {
                problems.add(field("id"), format!("duplicate model id `{}`", model.id));
            }
            if model.context_tokens == 0 || model.context_tokens > CONTEXT_TOKENS_LIMIT {
                problems.add(
                    field("context_tokens"),
                    format!("must be in 1..={CONTEXT_TOKENS_LIMIT}"),
                );
            }
            if model.seqs_max == 0 || model.seqs_max > SEQS_MAX_LIMIT {
                problems.add(
                    field("seqs_max"),
                    format!("must be in 1..={SEQS_MAX_LIMIT}"),
                );
            }
            if model.backend == Backend::Fake && model.kind == ModelKind::Embedding {
                problems.add(field("backend"), "the fake backend serves text models only");
            }
            for (name, price) in [
                ("price_input_per_mtok", model.price_input_per_mtok),
                ("price_output_per_mtok", model.price_output_per_mtok),
                ("price_cached_input_per_mtok", model.cached_input_price()),
            ] {
                if price.0 < 0 {
                    problems.add(field(name), "prices are never negative");
                }
            }
        }
    }

    /// The backends and residency pins: unique ids, known models and regions.
    fn validate_backends(&self, problems: &mut Problems) {
        if self.server.region.is_empty() {
            problems.add("server.region", "must not be empty");
        }
        if self.server.zone.is_empty() {
            problems.add("server.zone", "must not be empty");
        }
        if self.backends.len() > BACKENDS_MAX {
            problems.add("backends", format!("at most {BACKENDS_MAX}"));
        }
        let mut regions = std::collections::BTreeSet::from([self.server.region.as_str()]);
        let mut ids = std::collections::BTreeSet::new();
        for (index, backend) in self.backends.iter().enumerate() {
            if !ids.insert(backend.id.as_str()) {
                problems.add(
                    format!("backends[{index}].id"),
                    format!("duplicate backend id `{}`", backend.id),
                );
            }
            self.validate_backend(index, backend, problems);
            regions.insert(backend.region.as_str());
        }
        for (index, model) in self.models.iter().enumerate() {
            if model.backend != Backend::Remote {
                continue;
            }
            if model.kind == ModelKind::Embedding {
                problems.add(
                    format!("models[{index}].backend"),
                    "remote backends serve text models only",
                );
            }
            if !self.backends.iter().any(|b| b.models.contains(&model.id)) {
                problems.add(
                    format!("models[{index}].backend"),
                    format!(
                        "no [[backends]] entry serves the remote model `{}`",
                        model.id
                    ),
                );
            }
        }
        self.validate_residency(&regions, problems);
    }

    /// Residency pins: `tenant/project` keys, at least one region each, every region known.
    fn validate_residency(
        &self,
        regions: &std::collections::BTreeSet<&str>,
        problems: &mut Problems,
    ) {
        let pins = self
            .residency
            .tenants
            .iter()
            .map(|(tenant, pinned)| (format!("residency.tenants.{tenant}"), pinned))
            .chain(
                self.residency
                    .projects
                    .iter()
                    .map(|(key, pinned)| (format!("residency.projects.{key}"), pinned)),
            );
        for key in self.residency.projects.keys() {
            let parts: Vec<&str> = key.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                problems.add(
                    format!("residency.projects.{key}"),
                    "keys are \"tenant/project\"",
                );
            }
        }
        for (field, pinned) in pins {
            if pinned.is_empty() {
                problems.add(field.clone(), "pin at least one region");
            }
            for unknown in pinned.iter().filter(|r| !regions.contains(r.as_str())) {
                problems.add(
                    field.clone(),
                    format!(
                        "unknown region `{unknown}` (known: {})",
                        regions.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
    }

    /// One `[[backends]]` entry on its own.
    fn validate_backend(&self, index: usize, backend: &BackendConfig, problems: &mut Problems) {
        let mut invalid =
            |name: &str, reason: String| problems.add(format!("backends[{index}].{name}"), reason);
        if backend.id.is_empty() || backend.id.len() > 64 {
            invalid("id", "must be 1 to 64 bytes".into());
        }
        if !(backend.url.starts_with("http://") || backend.url.starts_with("https://")) {
            invalid("url", "must start with http:// or https://".into());
        }
        if backend.region.is_empty() {
            invalid("region", "must not be empty".into());
        }
        if backend.zone.is_empty() {
            invalid("zone", "must not be empty".into());
        }
        if backend.api_key_env.is_some() && backend.api_key_file.is_some() {
            invalid(
                "api_key_file",
                "give api_key_env or api_key_file, not both".into(),
            );
        }
        if backend.timeout_ms == 0 {
            invalid("timeout_ms", "must be at least 1".into());
        }
        if backend.concurrency_max == 0 {
            invalid("concurrency_max", "must be at least 1".into());
        }
        if backend.models.is_empty() {
            invalid("models", "a backend serves at least one model".into());
        }
        for model in &backend.models {
            match self.model(model.as_str()) {
                Some(m) if m.backend == Backend::Remote => {}
                Some(_) => invalid(
                    "models",
                    format!("model `{model}` is not a `backend = \"remote\"` model"),
                ),
                None => invalid("models", format!("unknown model `{model}`")),
            }
        }
        for alias in backend
            .aliases
            .keys()
            .filter(|a| !backend.models.iter().any(|m| m.as_str() == a.as_str()))
        {
            invalid(
                "aliases",
                format!("`{alias}` is not one of this backend's models"),
            );
        }
    }

    /// The model directory: config, else `$TIDEPOOL_MODELS_DIR`, else `~/.cache/tidepool/models`.
    pub fn models_dir(&self) -> PathBuf {
        self.server
            .models_dir
            .clone()
            .unwrap_or_else(default_models_dir)
    }

    /// A model's file, resolved against [`Self::models_dir`].
    pub fn model_path(&self, model: &ModelConfig) -> PathBuf {
        if model.file.is_absolute() {
            model.file.clone()
        } else {
            self.models_dir().join(&model.file)
        }
    }

    pub fn model(&self, id: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.id.as_str() == id)
    }
}

/// Where `make models` puts the models: `$TIDEPOOL_MODELS_DIR`, else `~/.cache/tidepool/models`
/// (the default of `[server] models_dir`; tests and benches find the models here too).
pub fn default_models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TIDEPOOL_MODELS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/tidepool/models")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[server]
listen = "127.0.0.1:9000"

[[models]]
id = "smollm2-135m-instruct"
kind = "chat"
file = "SmolLM2-135M-Instruct.Q4_1.gguf"
price_output_per_mtok = 600000000
"#;

    #[test]
    fn parses_sample() {
        let config = Config::parse(SAMPLE, Path::new("t.toml")).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:9000");
        assert_eq!(config.models.len(), 1);
        assert_eq!(config.models[0].context_tokens, 2048);
        assert_eq!(config.models[0].price_output_per_mtok, Nanos(600_000_000));
        assert_eq!(config.pool.policy, PoolPolicy::SwapLru);
        assert!(config.pool.enabled);
    }

    #[test]
    fn an_unset_cached_input_price_is_the_input_price_never_zero() {
        let unset = format!("{SAMPLE}price_input_per_mtok = 50000000\n");
        let model = &Config::parse(&unset, Path::new("t.toml")).unwrap().models[0];
        assert_eq!(model.price_cached_input_per_mtok, None);
        assert_eq!(model.cached_input_price(), Nanos(50_000_000));
        assert_eq!(model.prefix_cache_tokens_max, 16_384);
        let set = format!("{unset}price_cached_input_per_mtok = 25000000\n");
        let model = &Config::parse(&set, Path::new("t.toml")).unwrap().models[0];
        assert_eq!(model.cached_input_price(), Nanos(25_000_000));
        // An explicit zero is a choice, and stays zero.
        let free = format!("{unset}price_cached_input_per_mtok = 0\n");
        let model = &Config::parse(&free, Path::new("t.toml")).unwrap().models[0];
        assert_eq!(model.cached_input_price(), Nanos(0));
        let negative = format!("{unset}price_cached_input_per_mtok = -1\n");
        assert!(matches!(
            Config::parse(&negative, Path::new("t.toml")),
            Err(CoreError::ConfigInvalid { .. })
        ));
    }

    #[test]
    fn rejects_unknown_fields_and_duplicates() {
        let unknown = format!("{SAMPLE}\nbogus = 1\n");
        assert!(matches!(
            Config::parse(&unknown, Path::new("t.toml")),
            Err(CoreError::ConfigParse { .. })
        ));
        let dup = format!(
            "{SAMPLE}\n[[models]]\nid = \"smollm2-135m-instruct\"\nkind = \"chat\"\nfile = \"x\"\n"
        );
        assert!(matches!(
            Config::parse(&dup, Path::new("t.toml")),
            Err(CoreError::ConfigInvalid { .. })
        ));
    }

    #[test]
    fn the_pool_section_holds_the_pools_knobs_and_refuses_unknown_keys() {
        let knobs = format!(
            "{SAMPLE}\n[pool]\npolicy = \"swap-lru\"\nmemory_models_max = 2\n\
             decode_steps_min = 32\nhol_blocking = true\nadmission_queue_len_max = 64\n"
        );
        let config = Config::parse(&knobs, Path::new("t.toml")).unwrap();
        assert_eq!(config.pool.policy, PoolPolicy::SwapLru);
        assert_eq!(config.pool.memory_models_max, Some(2));
        assert_eq!(
            config.pool.knobs,
            PoolKnobs {
                decode_steps_min: 32,
                hol_blocking: true,
                admission_queue_len_max: 64,
                ..PoolKnobs::default()
            }
        );
        assert_eq!(
            Config::parse(SAMPLE, Path::new("t.toml")).unwrap().pool,
            PoolSection::default()
        );
        let unknown = format!("{SAMPLE}\n[pool]\ndecode_steps_min = 32\ndecode_step_min = 8\n");
        let error = Config::parse(&unknown, Path::new("t.toml")).unwrap_err();
        let printed = error.to_string();
        assert!(
            matches!(error, CoreError::ConfigParse { .. })
                && printed.contains("unknown field `decode_step_min`")
                && printed.contains("`decode_steps_min`"),
            "{printed}"
        );
        let wrong_type = format!("{SAMPLE}\n[pool]\nturn_quota_ms_max = \"soon\"\n");
        assert!(Config::parse(&wrong_type, Path::new("t.toml")).is_err());
        let inverted = format!("{SAMPLE}\n[pool]\ndecode_steps_min = 64\ndecode_steps_max = 32\n");
        assert!(
            config_error(&inverted)
                .contains("pool.decode_steps_min: must be at most decode_steps_max")
        );
    }

    #[test]
    fn the_telemetry_section_is_off_by_default_and_validated() {
        let config = Config::parse(SAMPLE, Path::new("t.toml")).unwrap();
        assert_eq!(config.telemetry, TelemetryConfig::default());
        assert!(config.telemetry.otlp_endpoint.is_empty());
        assert_eq!(config.telemetry.log_format, LogFormat::Text);
        let on = format!(
            "{SAMPLE}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\n\
             log_format = \"json\"\ncontent_projects = [\"acme/chat\"]\n"
        );
        let config = Config::parse(&on, Path::new("t.toml")).unwrap();
        assert_eq!(config.telemetry.log_format, LogFormat::Json);
        assert!(config.telemetry.exports_content_of("acme", "chat"));
        assert!(!config.telemetry.exports_content_of("acme", "other"));
        assert!(!config.telemetry.exports_content_of("other", "chat"));
        let bad = format!(
            "{SAMPLE}\n[telemetry]\notlp_protocol = \"grpc\"\nsample_ratio = 1.5\n\
             export_queue_spans_max = 0\ncontent_projects = [\"acme\"]\n"
        );
        let printed = config_error(&bad);
        for field in [
            "telemetry.otlp_protocol",
            "telemetry.sample_ratio",
            "telemetry.export_queue_spans_max",
            "telemetry.content_projects[0]",
        ] {
            assert!(printed.contains(field), "{field}: {printed}");
        }
        let unknown = format!("{SAMPLE}\n[telemetry]\nendpoint = \"x\"\n");
        assert!(Config::parse(&unknown, Path::new("t.toml")).is_err());
    }

    #[test]
    fn a_parse_error_names_the_place_without_quoting_the_line() {
        let text =
            "[server]\nlisten = \"127.0.0.1:8080\"\ndatabase_url = \"postgres://u:hunter2@db/tp\n";
        let error = Config::parse(text, Path::new("t.toml")).unwrap_err();
        let printed = error.to_string();
        assert!(
            matches!(error, CoreError::ConfigParse { line: 3, .. }),
            "{printed}"
        );
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("t.toml") && printed.contains("line 3"),
            "{printed}"
        );
    }

    const REMOTE: &str = r#"
[server]
region = "eu"

[[models]]
id = "smol"
kind = "chat"
backend = "remote"

[[backends]]
id = "w1"
kind = "worker"
url = "http://127.0.0.1:9001"
region = "eu"
models = ["smol"]

[[backends]]
id = "u1"
kind = "upstream"
url = "http://127.0.0.1:9002"
region = "us"
zone = "us-1"
api_key_env = "UPSTREAM_KEY"
models = ["smol"]
aliases = { smol = "smollm2-135m-instruct" }

[residency.tenants]
acme = ["eu"]
"#;

    fn config_error(text: &str) -> String {
        match Config::parse(text, Path::new("t.toml")) {
            Err(error @ CoreError::ConfigInvalid { .. }) => error.to_string(),
            other => panic!("expected ConfigInvalid, got {other:?}"),
        }
    }

    #[test]
    fn parses_backends_and_residency() {
        let config = Config::parse(REMOTE, Path::new("t.toml")).unwrap();
        assert_eq!(config.backends.len(), 2);
        assert_eq!(config.backends[0].zone, REGION_DEFAULT);
        assert_eq!(config.backends[1].aliases["smol"], "smollm2-135m-instruct");
        assert_eq!(
            config.residency.regions_for("acme", "default"),
            Some(vec!["eu".to_owned()])
        );
        assert_eq!(config.residency.regions_for("other", "default"), None);
        let pins = ResidencyConfig {
            tenants: [("t".to_owned(), vec!["eu".to_owned(), "us".to_owned()])].into(),
            projects: [
                ("t/p".to_owned(), vec!["us".to_owned(), "apac".to_owned()]),
                ("u/q".to_owned(), vec!["eu".to_owned()]),
            ]
            .into(),
        };
        assert_eq!(pins.regions_for("t", "p"), Some(vec!["us".to_owned()]));
        assert_eq!(
            pins.regions_for("t", "other"),
            Some(vec!["eu".to_owned(), "us".to_owned()])
        );
        assert_eq!(pins.regions_for("u", "q"), Some(vec!["eu".to_owned()]));
        assert_eq!(pins.regions_for("u", "r"), None);
        assert_eq!(config.routing.retry_attempts_max, 3);
    }

    #[test]
    fn rejects_bad_backend_config() {
        let unknown_region = REMOTE.replace(r#"acme = ["eu"]"#, r#"acme = ["mars"]"#);
        assert!(config_error(&unknown_region).contains("unknown region `mars`"));
        let project_pin = format!("{REMOTE}\n[residency.projects]\n\"acme/prod\" = [\"mars\"]\n");
        assert!(config_error(&project_pin).contains("residency.projects.acme/prod"));
        let bad_key = format!("{REMOTE}\n[residency.projects]\nprod = [\"eu\"]\n");
        assert!(config_error(&bad_key).contains("tenant/project"));
        let good = format!("{REMOTE}\n[residency.projects]\n\"acme/prod\" = [\"eu\"]\n");
        assert!(Config::parse(&good, Path::new("t.toml")).is_ok());
        let duplicate = REMOTE.replace(r#"id = "u1""#, r#"id = "w1""#);
        assert!(config_error(&duplicate).contains("duplicate backend id `w1`"));
        let unknown_model = REMOTE.replace(r#"models = ["smol"]"#, r#"models = ["nope"]"#);
        assert!(config_error(&unknown_model).contains("unknown model `nope`"));
        let orphan = format!(
            "{REMOTE}\n[[models]]\nid = \"lonely\"\nkind = \"chat\"\nbackend = \"remote\"\n"
        );
        assert!(config_error(&orphan).contains("no [[backends]] entry serves"));
        let both_keys = REMOTE.replace(
            r#"api_key_env = "UPSTREAM_KEY""#,
            "api_key_env = \"K\"\napi_key_file = \"/k\"",
        );
        assert!(config_error(&both_keys).contains("not both"));
        let bad_url = REMOTE.replace("http://127.0.0.1:9001", "127.0.0.1:9001");
        assert!(config_error(&bad_url).contains("http://"));
    }

    #[test]
    fn reports_every_error_with_its_own_field() {
        let text = format!(
            "{REMOTE}\n[pool]\nttft_slo_ms = 0\n\n[routing]\nbreaker_failures_max = 0\n\
             health_timeout_ms = 0\nconnect_timeout_ms = 0\n\n[limits]\n\
             admission_queue_len_max = 0\n"
        )
        .replace(r#"zone = "us-1""#, "zone = \"\"\ntimeout_ms = 0");
        let error = config_error(&text);
        let fields: Vec<&str> = error
            .lines()
            .skip(1)
            .filter_map(|line| line.trim().split(':').next())
            .collect();
        assert_eq!(
            fields,
            [
                "pool.ttft_slo_ms",
                "backends[1].zone",
                "backends[1].timeout_ms",
                "routing.breaker_failures_max",
                "routing.health_timeout_ms",
                "routing.connect_timeout_ms",
                "limits.admission_queue_len_max",
            ],
            "{error}"
        );
        assert!(
            error.starts_with(
                "invalid config (7 errors):\n  pool.ttft_slo_ms: must be at least 1\n"
            )
        );
    }

    #[test]
    fn debug_output_hides_the_database_password() {
        let server = ServerConfig {
            database_url: "postgres://tidepool:hunter2@db/tp".to_owned(),
            ..ServerConfig::default()
        };
        let debug = format!("{server:?}");
        assert!(debug.contains("postgres://tidepool:***@db/tp") && !debug.contains("hunter2"));
    }

    #[test]
    fn rejects_bad_model_ids_and_negative_prices() {
        let bad_id = SAMPLE.replace("smollm2-135m-instruct", "Bad Id");
        assert!(Config::parse(&bad_id, Path::new("t.toml")).is_err());
        let negative = SAMPLE.replace("600000000", "-1");
        assert!(Config::parse(&negative, Path::new("t.toml")).is_err());
    }
}
