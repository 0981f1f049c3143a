//! Child processes the benchmarks measure: `tidepool serve` / `tidepool worker` started from this
//! binary with a generated configuration and a fresh SQLite ledger (and a key made with
//! `tidepool keys create`), and llama.cpp's `llama-server` as the engine benchmark's peer. Each
//! is killed when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::actions::PoolView;
use crate::client::{End, Target, one_request};
use crate::common::{free_port, prompt_for, wait_healthy};
use crate::workload::{BenchModel, ServerKnobs, server_config};

/// How long to wait for the pool to drain between rates, in seconds.
const DRAIN_TIMEOUT_S: u64 = 300;
/// Interval between two `GET /v1/pool` polls while draining, in milliseconds.
const DRAIN_POLL_MS: u64 = 500;
/// Completion tokens of each warm-up request.
const WARMUP_OUTPUT_TOKENS: u32 = 2;
/// Prompt length of each warm-up request, in tokens.
const WARMUP_PROMPT_TOKENS: u32 = 16;

/// This binary as a child process, without the caller's `TIDEPOOL_<SECTION>__<KEY>` config
/// overrides: a bench's server runs exactly the configuration the bench wrote.
fn tidepool_child() -> anyhow::Result<Command> {
    Ok(tidepool_child_of(&std::env::current_exe()?))
}

/// The admin token of every server a bench starts: the bench reads the operator's endpoints
/// (`/v1/pool`, `/v1/backends`, `/metrics`).
pub(crate) const BENCH_ADMIN_TOKEN: &str = "tidepool-bench-admin-token";

/// [`tidepool_child`] of another `tidepool` binary (a build to compare with).
fn tidepool_child_of(binary: &Path) -> Command {
    let mut command = Command::new(binary);
    command.env("TIDEPOOL_ADMIN_TOKEN", BENCH_ADMIN_TOKEN);
    for (name, _) in std::env::vars_os() {
        if name
            .to_str()
            .is_some_and(tidepool_core::config::is_config_var)
        {
            command.env_remove(name);
        }
    }
    command
}

/// `tidepool keys create` for `tenant` (created if new) in the ledger at `database_url` (read with the server's
/// configuration `config`, if given); the printed key.
pub(crate) async fn create_key(
    config: Option<&Path>,
    database_url: &str,
    tenant: &str,
) -> anyhow::Result<String> {
    let mut command = tidepool_child()?;
    command.args(["keys", "create", "--create-tenant"]);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let created = command
        .args(["--database-url", database_url])
        .args(["--tenant", tenant, "--name", "bench"])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&created.stdout);
    let key = stdout
        .split_whitespace()
        .find(|w| w.starts_with("tp-"))
        .with_context(|| {
            format!(
                "`tidepool keys create` printed no key: {}",
                String::from_utf8_lossy(&created.stderr)
            )
        })?;
    Ok(key.to_owned())
}

/// `tidepool serve` as a child process, with a one-model config and a fresh SQLite ledger.
pub(crate) struct TidepoolServer {
    child: Child,
    pub(crate) base: String,
    pub(crate) key: String,
}

impl TidepoolServer {
    pub(crate) async fn start(
        model: &Path,
        seqs_max: u32,
        prefill_riders: bool,
        work: &Path,
        timeout_s: u64,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let db = work.join("bench.db");
        let database_url = format!("sqlite://{}", db.display());
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndatabase_url = \"{database_url}\"\n\n\
             [pool]\nprefill_riders = {prefill_riders}\n\n\
             [[models]]\nid = \"smollm2\"\nkind = \"chat\"\nfile = \"{}\"\ncontext_tokens = 2048\nseqs_max = {seqs_max}\n",
            model.display()
        );
        let config_path = work.join("bench.toml");
        std::fs::write(&config_path, config)?;
        let key = create_key(None, &database_url, "bench").await?;
        let mut child = tidepool_child()?
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let base = format!("http://127.0.0.1:{port}");
        wait_healthy(&base, "/healthz", &mut child, timeout_s).await?;
        Ok(Self { child, base, key })
    }

    pub(crate) async fn stop(mut self) {
        if let Err(error) = self.child.kill().await {
            tracing::warn!(%error, "could not stop the benchmarked tidepool server");
        }
    }
}

/// llama.cpp's `llama-server` with continuous batching over `seqs_max` slots.
pub(crate) struct LlamaServer {
    child: Child,
    pub(crate) base: String,
}

impl LlamaServer {
    pub(crate) async fn start(
        binary: &Path,
        model: &Path,
        seqs_max: u32,
        timeout_s: u64,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let ctx = (2048 * seqs_max).to_string();
        let lib_dir = binary.parent().map(Path::to_path_buf).unwrap_or_default();
        let log_path = std::env::temp_dir().join("tidepool-bench-llama-server.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut child = Command::new(binary)
            .arg("-m")
            .arg(model)
            .args([
                "-np",
                &seqs_max.to_string(),
                "-c",
                &ctx,
                "--port",
                &port.to_string(),
            ])
            .args(["--host", "127.0.0.1", "-a", "model"])
            .env("LD_LIBRARY_PATH", lib_dir)
            // Its log goes to a file: with both streams on /dev/null the peer died mid-run
            // twice on this machine kind (connection closed), and a log says why.
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let base = format!("http://127.0.0.1:{port}");
        wait_healthy(&base, "/health", &mut child, timeout_s).await?;
        Ok(Self { child, base })
    }

    pub(crate) async fn stop(mut self) {
        if let Err(error) = self.child.kill().await {
            tracing::warn!(%error, "could not stop llama-server");
        }
    }
}

/// `tidepool serve` as a child process with the 8-model pool config of one policy.
#[derive(Debug)]
pub(crate) struct PoolServer {
    child: Child,
    pub(crate) base: String,
    pub(crate) key: String,
    pub(crate) client: reqwest::Client,
}

impl PoolServer {
    pub(crate) async fn start(
        policy: &str,
        models: &[BenchModel],
        models_dir: &Path,
        dir: &Path,
        knobs: &ServerKnobs,
        timeout_s: u64,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let database_url = format!("sqlite://{}", dir.join("bench.db").display());
        let listen = format!("127.0.0.1:{port}");
        let config = server_config(policy, port, &database_url, models_dir, models, knobs)?;
        let config_path = dir.join("bench.toml");
        tidepool_core::Config::parse(&config, &config_path)
            .context("the bench's server configuration")?;
        std::fs::write(&config_path, config)?;
        let key = create_key(Some(&config_path), &database_url, "bench").await?;
        let log_path = dir.join("serve.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        // Everything explicit; `tidepool_child` drops the caller's config overrides.
        let mut child = tidepool_child()?
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--database-url", &database_url, "--listen", &listen])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        let base = format!("http://127.0.0.1:{port}");
        wait_healthy(&base, "/healthz", &mut child, timeout_s)
            .await
            .with_context(|| format!("{policy} server; its log: {}", log_path.display()))?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Self {
            child,
            base,
            key,
            client,
        })
    }

    /// One short unscored request per model, least popular first, one at a time.
    pub(crate) async fn warm_up(&self, models: &[BenchModel], timeout_s: u64) {
        let target = Target {
            client: self.client.clone(),
            url: format!("{}/v1/completions", self.base).into(),
            key: self.key.clone().into(),
        };
        for (model, number) in models.iter().rev().zip(0_u32..) {
            let body = serde_json::json!({
                "model": model.id,
                "prompt": prompt_for(u32::MAX - number, WARMUP_PROMPT_TOKENS),
                "max_tokens": WARMUP_OUTPUT_TOKENS,
                "temperature": 0,
                "stream": true,
            });
            let now = Instant::now();
            let deadline = now + Duration::from_secs(timeout_s);
            let outcome =
                one_request(target.clone(), body, WARMUP_OUTPUT_TOKENS, now, deadline).await;
            if outcome.end != End::Completed {
                tracing::warn!(model = %model.id, status = ?outcome.status, end = ?outcome.end,
                    "warm-up request did not complete");
            }
        }
    }

    pub(crate) async fn pool_view(&self) -> anyhow::Result<PoolView> {
        let response = self
            .client
            .get(format!("{}/v1/pool", self.base))
            .bearer_auth(BENCH_ADMIN_TOKEN)
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "GET /v1/pool: HTTP {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(response.json().await?)
    }

    /// Waits until nothing is queued or in flight (at most [`DRAIN_TIMEOUT_S`] s; then warns).
    pub(crate) async fn wait_drained(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(DRAIN_TIMEOUT_S);
        loop {
            let view = self.pool_view().await?;
            if view.queued == 0 && view.models.iter().all(|m| m.in_flight == 0) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    queued = view.queued,
                    "the pool did not drain within {DRAIN_TIMEOUT_S} s; going on"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Err(error) = self.child.kill().await {
            tracing::warn!(%error, "could not stop the benchmarked tidepool server");
        }
    }
}

/// One child `tidepool` process with its directory.
#[derive(Debug)]
pub(crate) struct ChildServer {
    dir: PathBuf,
    port: u16,
    database_url: String,
    /// Another `tidepool` binary to run instead of this one.
    binary: Option<PathBuf>,
    child: Option<Child>,
}

impl ChildServer {
    pub(crate) fn new(root: &Path, name: &str) -> anyhow::Result<Self> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let database_url = format!("sqlite://{}", dir.join("tidepool.db").display());
        Ok(Self {
            dir,
            port: free_port()?,
            database_url,
            binary: None,
            child: None,
        })
    }

    /// A child whose ledger is `database_url` (PostgreSQL, say) rather than the SQLite file in
    /// its directory.
    pub(crate) fn with_database_url(
        root: &Path,
        name: &str,
        database_url: String,
    ) -> anyhow::Result<Self> {
        let mut child = Self::new(root, name)?;
        child.database_url = database_url;
        Ok(child)
    }

    /// Runs `binary` (another build of `tidepool`) rather than this one.
    pub(crate) fn set_binary(&mut self, binary: PathBuf) {
        self.binary = Some(binary);
    }

    pub(crate) fn database_url(&self) -> &str {
        &self.database_url
    }

    pub(crate) fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn write_config(&self, body: &str) -> anyhow::Result<()> {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\ndatabase_url = \"{}\"\n{body}",
            self.port, self.database_url
        );
        std::fs::write(self.dir.join("tidepool.toml"), text)?;
        Ok(())
    }

    pub(crate) async fn key(&self, tenant: &str) -> anyhow::Result<String> {
        create_key(None, &self.database_url, tenant).await
    }

    pub(crate) async fn start(&mut self, args: &[&str], timeout_s: u64) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("server.log"))?;
        let mut command = match &self.binary {
            Some(binary) => tidepool_child_of(binary),
            None => tidepool_child()?,
        };
        let mut child = command
            .args(args)
            .arg("--config")
            .arg(self.dir.join("tidepool.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        wait_healthy(&self.base(), "/healthz", &mut child, timeout_s).await?;
        self.child = Some(child);
        Ok(())
    }

    pub(crate) async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}
