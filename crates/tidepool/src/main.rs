//! `tidepool`, the thin command-line binary: it parses flags, sets up tracing and calls into the
//! library crates (`serve` → `tidepool-gateway`, `migrate`/`keys`/`usage` → `tidepool-ledger`,
//! `bench`, `sim` and `plan` → `tidepool-bench`). No domain logic lives here.

mod admin;
mod remote;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tidepool_core::Config;
use tidepool_core::config::{Resolved, database_location};
use tracing_subscriber::EnvFilter;

/// The configuration used when `--config` is not given and `./tidepool.toml` does not exist.
const EMBEDDED_CONFIG: &str = include_str!("../../../tidepool.toml");
/// How the built-in configuration is named in logs and `tidepool config check`.
const EMBEDDED_LABEL: &str = "<built-in tidepool.toml>";
/// Where `--config` points by default.
const CONFIG_PATH_DEFAULT: &str = "tidepool.toml";

/// Tidepool: a self-hostable, OpenAI-compatible AI cloud.
#[derive(Debug, Parser)]
#[command(name = "tidepool", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config`: on the commands that read the configuration.
#[derive(Debug, clap::Args)]
struct ConfigArgs {
    /// Configuration file (default: ./tidepool.toml, else the built-in default). Any key can be
    /// overridden by a `TIDEPOOL_<SECTION>__<KEY>` variable, e.g. `TIDEPOOL_POOL__POLICY`.
    #[arg(long, global = true, env = "TIDEPOOL_CONFIG")]
    config: Option<PathBuf>,
}

/// `--config` and `--database-url`: on the commands that use the ledger.
#[derive(Debug, clap::Args)]
struct DbArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Ledger database, `sqlite://path` or `postgres://…` (default: the config's
    /// `[server].database_url`).
    #[arg(
        long,
        global = true,
        env = "TIDEPOOL_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
}

/// A command's own arguments, and `--config` and `--database-url`.
#[derive(Debug, clap::Args)]
struct WithDb<T: clap::Args> {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    args: T,
}

#[derive(Debug, clap::Args)]
struct ConfigCommandArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (the file, then `TIDEPOOL_<SECTION>__<KEY>` variables,
    /// then defaults) with the source of each value, secrets redacted; exit non-zero listing
    /// every error if it is invalid.
    Check(DbArgs),
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API until SIGINT or SIGTERM.
    Serve(WithDb<ServeArgs>),
    /// Serve this machine's models as a worker of a gateway in another process (`tidepool serve`
    /// labelled with a region and zone; the gateway lists it under `[[backends]]`).
    Worker(WithDb<WorkerArgs>),
    /// Apply the ledger's database migrations and exit (safe when several processes run it at
    /// once); with `--check`, change nothing and exit non-zero if the schema is behind.
    Migrate(WithDb<MigrateArgs>),
    /// List a running gateway's remote backends: region, zone, health, breaker, latency.
    Backends(BackendsArgs),
    /// Probe a running server: exit 0 if `--path` (default `/healthz`) answers 2xx within
    /// `--timeout-ms`, 1 otherwise (container health checks need no curl).
    Health(HealthArgs),
    /// Create, list and revoke API keys.
    Keys(WithDb<admin::KeysArgs>),
    /// List the configured models.
    Models(ConfigArgs),
    /// Check the configuration and show where each value comes from.
    Config(ConfigCommandArgs),
    /// Tenants (billing customers) and their prepaid accounts.
    Tenants(WithDb<admin::TenantsArgs>),
    /// Projects within a tenant.
    Projects(WithDb<admin::ProjectsArgs>),
    /// Prepaid credit.
    Credit(WithDb<admin::CreditArgs>),
    /// Monthly budgets of projects and keys.
    Budgets(WithDb<admin::BudgetsArgs>),
    /// Change the RPM/TPM limits of a key, a project or a model (only those given), or `show`
    /// them.
    RateLimits(WithDb<admin::RateLimitsArgs>),
    /// Usage and cost per model of a tenant, project or key.
    Usage(WithDb<admin::UsageArgs>),
    /// A tenant's monthly statement (line items sum to the balance movement).
    Statement(WithDb<admin::StatementArgs>),
    /// The tamper-evident audit log: `verify` walks the hash chain and its signed checkpoints
    /// (exit 1 naming the first bad entry), `list` prints entries, `export` writes JSON lines.
    Audit(WithDb<admin::AuditArgs>),
    /// Benchmarks (ratios against baselines measured in the same run).
    Bench(tidepool_bench::BenchArgs),
    /// Run the discrete-event simulator.
    Sim(tidepool_bench::SimArgs),
    /// Capacity planning on top of the simulator.
    Plan(tidepool_bench::PlanArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on (default: the config's `[server].listen`).
    #[arg(long, env = "TIDEPOOL_LISTEN")]
    listen: Option<String>,
    /// Bearer token of the admin API (`/admin/*`); without it the admin API is off.
    #[arg(long, env = "TIDEPOOL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// This gateway's replica id among those sharing one database (default: the config's
    /// `[billing].replica_id`); stable across restarts.
    #[arg(long, env = "TIDEPOOL_REPLICA_ID")]
    replica_id: Option<String>,
    /// A placement file written by `tidepool plan` (or `tidepool sim`): this process serves
    /// the models it places on `--accelerator` (plus the models it does not place at all, such
    /// as embedding models); a model alone on its accelerator is pinned. An unknown model or
    /// accelerator is refused at start-up with the placement's error code.
    #[arg(long, env = "TIDEPOOL_PLACEMENT")]
    placement: Option<PathBuf>,
    /// With `--placement`: which of the plan's accelerators this process is (one process per
    /// accelerator).
    #[arg(
        long,
        env = "TIDEPOOL_ACCELERATOR",
        default_value_t = 0,
        requires = "placement"
    )]
    accelerator: u32,
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// The region this worker runs in (overrides `[server] region`).
    #[arg(long, env = "TIDEPOOL_REGION")]
    region: String,
    /// The zone within the region (overrides `[server] zone`).
    #[arg(long, env = "TIDEPOOL_ZONE")]
    zone: String,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// Only check: exit non-zero, listing the missing migrations, if the schema is behind.
    #[arg(long, env = "TIDEPOOL_MIGRATE_CHECK")]
    check: bool,
}

/// `tidepool migrate [--check]`.
async fn migrate(database_url: &str, args: &MigrateArgs) -> anyhow::Result<()> {
    let location = tidepool_core::config::redact_url(database_url);
    let mut out = std::io::stdout().lock();
    if args.check {
        let status = tidepool_ledger::schema_status(database_url)
            .await
            .with_context(|| format!("reading the schema version of {location}"))?;
        anyhow::ensure!(
            status.is_current(),
            "the schema of {location} is not current: {status}; run `tidepool migrate`"
        );
        writeln!(out, "schema {status}: {location}")?;
        return Ok(());
    }
    let report = tidepool_ledger::migrate(database_url)
        .await
        .with_context(|| format!("migrating {location}"))?;
    for migration in &report.applied {
        writeln!(out, "applied {migration}")?;
    }
    anyhow::ensure!(
        report.status.is_current(),
        "the schema of {location} is not current after migrating: {}",
        report.status
    );
    writeln!(out, "schema {}: {location}", report.status)?;
    Ok(())
}

#[derive(Debug, clap::Args)]
struct BackendsArgs {
    /// The gateway's base URL.
    #[arg(long, env = "TIDEPOOL_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The gateway's admin token (`/v1/backends` is the operator's).
    #[arg(long, env = "TIDEPOOL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Limit of the request, in ms.
    #[arg(long, env = "TIDEPOOL_TIMEOUT_MS", default_value_t = 5_000)]
    timeout_ms: u64,
}

#[derive(Debug, clap::Args)]
struct HealthArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The server's base URL (default: the address `tidepool serve` listens on with the same
    /// configuration and `TIDEPOOL_LISTEN`, a wildcard address probed on 127.0.0.1).
    #[arg(long, env = "TIDEPOOL_URL")]
    url: Option<String>,
    /// The address the server listens on (as `tidepool serve --listen`).
    #[arg(long, env = "TIDEPOOL_LISTEN")]
    listen: Option<String>,
    /// The path probed: `/healthz` (the process is alive) or `/readyz` (ready to serve).
    #[arg(long, env = "TIDEPOOL_HEALTH_PATH", default_value = "/healthz")]
    path: String,
    /// Limit of the probe, in ms.
    #[arg(long, env = "TIDEPOOL_TIMEOUT_MS", default_value_t = 2_000)]
    timeout_ms: u64,
}

/// `tidepool health`: GET one health path; an error (and exit code 1) unless it answers 2xx.
async fn health(args: &HealthArgs) -> anyhow::Result<()> {
    let base = if let Some(url) = &args.url {
        url.trim_end_matches('/').to_owned()
    } else {
        let listen = match &args.listen {
            Some(listen) => listen.clone(),
            None => args.config.load()?.server.listen,
        };
        let address: std::net::SocketAddr = listen
            .parse()
            .with_context(|| format!("listen address `{listen}` is not ip:port"))?;
        let host = match address.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
            ip if ip.is_unspecified() => "[::1]".to_owned(),
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        format!("http://{host}:{}", address.port())
    };
    let url = format!("{base}{}", args.path);
    let response = reqwest::Client::new()
        .get(&url)
        .timeout(std::time::Duration::from_millis(args.timeout_ms))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "GET {url}: {status}: {body}");
    writeln!(std::io::stdout().lock(), "{status} {body}")?;
    Ok(())
}

/// `tidepool backends`: one line per backend of a running gateway.
async fn backends(args: &BackendsArgs) -> anyhow::Result<()> {
    let url = format!("{}/v1/backends", args.url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&args.admin_token)
        .timeout(std::time::Duration::from_millis(args.timeout_ms))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("reading /v1/backends")?;
    anyhow::ensure!(status.is_success(), "GET {url}: {status}: {body}");
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<16} {:<9} {:<10} {:<10} {:<8} {:<10} {:>10} {:>9}  url",
        "id", "kind", "region", "zone", "healthy", "breaker", "latency_ms", "in_flight"
    )?;
    let empty = Vec::new();
    for backend in body["data"].as_array().unwrap_or(&empty) {
        let text = |key: &str| backend[key].as_str().unwrap_or("-").to_owned();
        writeln!(
            out,
            "{:<16} {:<9} {:<10} {:<10} {:<8} {:<10} {:>10} {:>9}  {}",
            text("id"),
            text("kind"),
            text("region"),
            text("zone"),
            backend["healthy"].as_bool().unwrap_or(false),
            text("breaker"),
            backend["latency_ms_ewma"].as_u64().unwrap_or(0),
            backend["in_flight"].as_u64().unwrap_or(0),
            text("url"),
        )?;
    }
    Ok(())
}

impl ConfigArgs {
    /// The file (`--config`, else ./tidepool.toml, else the built-in one) with the
    /// `TIDEPOOL_<SECTION>__<KEY>` variables applied; not validated.
    fn resolve(&self) -> anyhow::Result<Resolved> {
        let env = std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        });
        let default = PathBuf::from(CONFIG_PATH_DEFAULT);
        match self
            .config
            .as_ref()
            .or(default.exists().then_some(&default))
        {
            Some(path) => {
                Resolved::load(path, env).with_context(|| format!("loading {}", path.display()))
            }
            None => Resolved::new(EMBEDDED_CONFIG, Path::new(EMBEDDED_LABEL), env)
                .context("loading the built-in configuration"),
        }
    }

    fn load(&self) -> anyhow::Result<Config> {
        let resolved = self.resolve()?;
        warn_if_built_in(&resolved);
        resolved.config.validate()?;
        Ok(resolved.config)
    }
}

impl DbArgs {
    /// As [`ConfigArgs::resolve`], with `--database-url` applied.
    fn resolve(&self) -> anyhow::Result<Resolved> {
        let mut resolved = self.config.resolve()?;
        if let Some(url) = &self.database_url {
            resolved.set_flag("server.database_url", url, "--database-url")?;
        }
        warn_if_built_in(&resolved);
        Ok(resolved)
    }

    /// The validated configuration; its `server.database_url` is the ledger's.
    fn load(&self) -> anyhow::Result<Config> {
        let resolved = self.resolve()?;
        resolved.config.validate()?;
        Ok(resolved.config)
    }

    fn database_url(&self) -> anyhow::Result<String> {
        Ok(self.load()?.server.database_url)
    }
}

/// Running on the built-in configuration is said in the log, with where its database is.
fn warn_if_built_in(resolved: &Resolved) {
    if resolved.origin == Path::new(EMBEDDED_LABEL) {
        let cwd = std::env::current_dir().unwrap_or_default();
        tracing::warn!(
            "no configuration file (./{CONFIG_PATH_DEFAULT} does not exist and neither --config \
             nor TIDEPOOL_CONFIG is given): using the built-in {EMBEDDED_LABEL}, with its \
             database at {}",
            database_location(&resolved.config.server.database_url, &cwd)
        );
    }
}

/// `tidepool config check`: the effective configuration with sources, then its errors.
fn config_check(args: &DbArgs) -> anyhow::Result<()> {
    let resolved = args.resolve()?;
    write!(std::io::stdout().lock(), "{}", resolved.render())?;
    resolved.config.validate()?;
    Ok(())
}

/// Text logs to stderr (stdout carries command output, a new key, tables, for scripts): the
/// whole life of every command but `serve` and `worker`, and their configuration loading.
fn text_logs() -> impl tracing::Subscriber + Send + Sync {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .finish()
}

/// The configuration of `serve` and `worker`, loaded before their subscriber exists (its
/// `[telemetry]` section decides the subscriber): what loading logs goes out as text.
fn load_for_serving(db: &DbArgs) -> anyhow::Result<Config> {
    tracing::subscriber::with_default(text_logs(), || db.load())
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}

/// Serves with the `[telemetry]` subscriber (JSON or text logs, traces when an OTLP endpoint is
/// set); exports the spans still queued once the server has stopped.
async fn serve(mut config: Config, args: ServeArgs) -> anyhow::Result<()> {
    // Engine threads that panic are restarted by their watchdog; a panic anywhere else aborts.
    tidepool_gateway::install_panic_policy();
    if let Some(replica_id) = args.replica_id.clone() {
        config.billing.replica_id = replica_id;
        config.validate()?;
    }
    let placed = match &args.placement {
        Some(path) => {
            let placement = tidepool_core::PlacementFile::load(path)
                .with_context(|| format!("placement {}", path.display()))?;
            Some((
                path.clone(),
                placement.apply(&mut config, args.accelerator)?,
            ))
        }
        None => None,
    };
    let telemetry = tidepool_telemetry::init_stderr(&config.telemetry)?;
    if let Some((path, served)) = placed {
        tracing::info!(
            placement = %path.display(),
            accelerator = args.accelerator,
            models = ?served,
            "serving the placement's models for this accelerator"
        );
    }
    let served = serve_with(&config, args).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    served
}

async fn serve_with(config: &Config, args: ServeArgs) -> anyhow::Result<()> {
    let options = tidepool_gateway::ServeOptions {
        listen: args.listen.unwrap_or_else(|| config.server.listen.clone()),
        database_url: config.server.database_url.clone(),
        admin_token: args.admin_token.filter(|token| !token.is_empty()),
    };
    tidepool_gateway::serve(config, &options, shutdown_signal()).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_) | Command::Worker(_)) {
        tracing::subscriber::set_global_default(text_logs())?;
    }
    // A reader that goes away (`tidepool usage … | head`) ends a command's output; a server's
    // errors are never hidden.
    let output_command = !matches!(cli.command, Command::Serve(_) | Command::Worker(_));
    let result = match cli.command {
        Command::Serve(WithDb { db, args }) => serve(load_for_serving(&db)?, args).await,
        Command::Worker(WithDb { db, args }) => {
            let mut config = load_for_serving(&db)?;
            config.server.region = args.region;
            config.server.zone = args.zone;
            config.validate()?;
            serve(config, args.serve).await
        }
        Command::Migrate(c) => migrate(&c.db.database_url()?, &c.args).await,
        Command::Backends(args) => backends(&args).await,
        Command::Health(args) => health(&args).await,
        Command::Keys(c) => match remote::client(c.args.remote.url.as_deref())? {
            Some(client) => remote::keys(&client, c.args.command).await,
            None => admin::keys(&c.db.load()?, c.args).await,
        },
        Command::Models(args) => admin::models(&args.load()?),
        Command::Config(ConfigCommandArgs {
            command: ConfigCommand::Check(args),
        }) => config_check(&args),
        Command::Tenants(c) => match remote::client(c.args.remote.url.as_deref())? {
            Some(client) => remote::tenants(&client, c.args.command).await,
            None => admin::tenants(&c.db.load()?, c.args).await,
        },
        Command::Projects(c) => admin::projects(&c.db.load()?, c.args).await,
        Command::Credit(c) => match remote::client(c.args.remote.url.as_deref())? {
            Some(client) => remote::credit(&client, c.args.command).await,
            None => admin::credit(&c.db.load()?, c.args).await,
        },
        Command::Budgets(c) => match remote::client(c.args.remote.url.as_deref())? {
            Some(client) => remote::budgets(&client, c.args.command).await,
            None => admin::budgets(&c.db.load()?, c.args).await,
        },
        Command::RateLimits(c) => admin::rate_limits(&c.db.load()?, c.args).await,
        Command::Usage(c) => admin::usage(&c.db.database_url()?, &c.args).await,
        Command::Statement(c) => admin::statement(&c.db.database_url()?, &c.args).await,
        Command::Audit(c) => match remote::client(c.args.remote.url.as_deref())? {
            Some(client) => remote::audit(&client, &c.args.command).await,
            None => admin::audit(&c.db.load()?, &c.args).await,
        },
        Command::Bench(args) => tidepool_bench::run(args).await,
        Command::Sim(args) => tidepool_bench::run_sim(&args),
        Command::Plan(args) => tidepool_bench::run_plan(&args),
    };
    match result {
        Err(error) if output_command && is_broken_pipe(&error) => Ok(()),
        other => other,
    }
}

/// Whether the error comes from writing to a pipe whose reader has closed it.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
