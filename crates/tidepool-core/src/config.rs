//! `tidepool.toml`: parsed strictly (`deny_unknown_fields`) into raw structs, then validated into
//! [`Config`] at start-up. Every limit is named with its unit and has a stated default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{CoreError, ModelId, Nanos, TokenCount, money::Currency};

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
    pub pool: PoolConfig,
    #[serde(default)]
    pub billing: BillingConfig,
    #[serde(default, rename = "models")]
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address `tidepool serve` listens on.
    pub listen: String,
    /// `sqlite://…` (default, embedded) or `postgres://…`.
    pub database_url: String,
    /// Where model files named by relative `file` paths live.
    pub models_dir: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            database_url: "sqlite://tidepool.db".to_owned(),
            models_dir: None,
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
    /// Requests waiting for an engine slot, per model; beyond it a 429 with `Retry-After`.
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            batch_tokens_max: 512,
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
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            enforce: true,
            replica_id: "default".to_owned(),
            checkpoint_tokens: 32,
            stale_reservation_ms: 3_600_000,
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
}

/// Which scheduling policy the model pool uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolPolicy {
    /// Every model always resident.
    Dedicated,
    /// Request-level swapping, least recently used model evicted (Ollama-like).
    SwapLru,
    /// Token-level switching (Aegaeon-like).
    #[default]
    Token,
}

/// The model pool (`[pool]`): every llama.cpp text model runs on one accelerator thread under
/// this policy and budget (docs/pool.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
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
    /// Time-to-first-token SLO the `token` policy plans for, in ms.
    pub ttft_slo_ms: u64,
    /// Time-between-tokens SLO, in ms.
    pub tbt_slo_ms: u64,
    /// Decode steps of one turn when switching is free, and the floor otherwise.
    pub decode_steps_min: u32,
    /// `token`: the longest decode turn the quota formula hands out, in ms (Aegaeon's
    /// `max_batch_quota`).
    pub turn_quota_ms_max: u64,
    /// `token`: a request whose model is not resident waits (behind decode turns and requests
    /// of resident models) until its TTFT is at risk or nothing decodes.
    pub prefill_cold_lazy: bool,
    /// `token`: within a round, turns of resident models run before turns that need a load.
    pub round_resident_first: bool,
}

impl PoolConfig {
    fn validate(&self) -> Result<(), CoreError> {
        let invalid = |field: &str, reason: &str| {
            Err(CoreError::ConfigInvalid {
                field: format!("pool.{field}"),
                reason: reason.to_owned(),
            })
        };
        if self.ttft_slo_ms == 0 || self.tbt_slo_ms == 0 {
            return invalid("tbt_slo_ms", "SLOs must be positive");
        }
        if self.decode_steps_min == 0 {
            return invalid("decode_steps_min", "must be at least 1");
        }
        if self.turn_quota_ms_max == 0 {
            return invalid("turn_quota_ms_max", "must be at least 1");
        }
        Ok(())
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            policy: PoolPolicy::Token,
            memory_bytes_max: None,
            memory_models_max: None,
            kv_saved_bytes_max: 1 << 30,
            ttft_slo_ms: 5_000,
            tbt_slo_ms: 250,
            decode_steps_min: 16,
            turn_quota_ms_max: 4_000,
            prefill_cold_lazy: false,
            round_resident_first: false,
        }
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
    /// Price per million cached prompt tokens, nano-units.
    #[serde(default)]
    pub price_cached_input_per_mtok: Nanos,
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

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, CoreError> {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only for error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, CoreError> {
        let config: Self = toml::from_str(text).map_err(|source| CoreError::ConfigParse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks relations a type cannot express. Runs once at start-up.
    pub fn validate(&self) -> Result<(), CoreError> {
        let invalid = |field: String, reason: &str| {
            Err(CoreError::ConfigInvalid {
                field,
                reason: reason.to_owned(),
            })
        };
        let mut seen = std::collections::BTreeSet::new();
        for (index, model) in self.models.iter().enumerate() {
            let field = |name: &str| format!("models[{index}].{name}");
            if !seen.insert(model.id.clone()) {
                return invalid(field("id"), "duplicate model id");
            }
            if model.context_tokens == 0 || model.context_tokens > CONTEXT_TOKENS_LIMIT {
                return invalid(field("context_tokens"), "must be in 1..=131072");
            }
            if model.seqs_max == 0 || model.seqs_max > SEQS_MAX_LIMIT {
                return invalid(field("seqs_max"), "must be in 1..=256");
            }
            if model.backend == Backend::Fake && model.kind == ModelKind::Embedding {
                return invalid(field("backend"), "the fake backend serves text models only");
            }
            for (name, price) in [
                ("price_input_per_mtok", model.price_input_per_mtok),
                ("price_output_per_mtok", model.price_output_per_mtok),
                (
                    "price_cached_input_per_mtok",
                    model.price_cached_input_per_mtok,
                ),
            ] {
                if price.0 < 0 {
                    return invalid(field(name), "prices are never negative");
                }
            }
        }
        self.pool.validate()?;
        if self.limits.admission_queue_len_max == 0 {
            return invalid(
                "limits.admission_queue_len_max".into(),
                "must be at least 1",
            );
        }
        if self.limits.stream_chunks_buffered_max == 0 {
            return invalid(
                "limits.stream_chunks_buffered_max".into(),
                "must be at least 1",
            );
        }
        if self.limits.request_body_bytes_max < 1024 {
            return invalid(
                "limits.request_body_bytes_max".into(),
                "must be at least 1024",
            );
        }
        if self.billing.replica_id.is_empty() || self.billing.replica_id.len() > 64 {
            return invalid("billing.replica_id".into(), "must be 1 to 64 bytes");
        }
        if self.billing.checkpoint_tokens == 0 {
            return invalid("billing.checkpoint_tokens".into(), "must be at least 1");
        }
        if self.billing.stale_reservation_ms <= self.limits.request_timeout_ms {
            return invalid(
                "billing.stale_reservation_ms".into(),
                "must exceed limits.request_timeout_ms",
            );
        }
        if self.engine.batch_tokens_max == 0 {
            return invalid("engine.batch_tokens_max".into(), "must be at least 1");
        }
        Ok(())
    }

    /// The model directory: config, else `$TIDEPOOL_MODELS_DIR`, else `~/.cache/tidepool/models`.
    pub fn models_dir(&self) -> PathBuf {
        if let Some(dir) = &self.server.models_dir {
            return dir.clone();
        }
        if let Some(dir) = std::env::var_os("TIDEPOOL_MODELS_DIR") {
            return PathBuf::from(dir);
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".cache/tidepool/models")
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
        assert_eq!(config.pool.policy, PoolPolicy::Token);
        assert!(config.pool.enabled);
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
    fn rejects_bad_model_ids_and_negative_prices() {
        let bad_id = SAMPLE.replace("smollm2-135m-instruct", "Bad Id");
        assert!(Config::parse(&bad_id, Path::new("t.toml")).is_err());
        let negative = SAMPLE.replace("600000000", "-1");
        assert!(Config::parse(&negative, Path::new("t.toml")).is_err());
    }
}
