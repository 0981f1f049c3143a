//! `tidepool`, the thin command-line binary: it parses flags, sets up tracing and calls into the
//! library crates (`serve` → `tidepool-gateway`, `keys`/`usage` → `tidepool-ledger`, `bench`,
//! `sim` and `plan` → `tidepool-bench`). No domain logic lives here.

mod admin;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tidepool_core::Config;
use tracing_subscriber::EnvFilter;

/// The configuration used when `--config` is not given and `./tidepool.toml` does not exist.
const EMBEDDED_CONFIG: &str = include_str!("../../../tidepool.toml");
/// Where `--config` points by default.
const CONFIG_PATH_DEFAULT: &str = "tidepool.toml";

/// Tidepool: a self-hostable, OpenAI-compatible AI cloud.
#[derive(Debug, Parser)]
#[command(name = "tidepool", version, about)]
struct Cli {
    /// Configuration file (default: ./tidepool.toml, else the built-in default).
    #[arg(long, global = true, env = "TIDEPOOL_CONFIG")]
    config: Option<PathBuf>,
    /// Ledger database, `sqlite://path` or `postgres://…` (default: the config's
    /// `[server].database_url`).
    #[arg(long, global = true, env = "TIDEPOOL_DATABASE_URL")]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Serve this machine's models as a worker of a gateway in another process (`tidepool serve`
    /// labelled with a region and zone; the gateway lists it under `[[backends]]`).
    Worker(WorkerArgs),
    /// List a running gateway's remote backends: region, zone, health, breaker, latency.
    Backends(BackendsArgs),
    /// Create, list and revoke API keys.
    Keys(admin::KeysArgs),
    /// List the configured models.
    Models,
    /// Tenants (billing customers) and their prepaid accounts.
    Tenants(admin::TenantsArgs),
    /// Projects within a tenant.
    Projects(admin::ProjectsArgs),
    /// Prepaid credit.
    Credit(admin::CreditArgs),
    /// Monthly budgets of projects and keys.
    Budgets(admin::BudgetsArgs),
    /// Set the RPM/TPM limits of a key, a project or a model.
    RateLimits(admin::RateLimitsArgs),
    /// Usage and cost per model of a tenant, project or key.
    Usage(admin::UsageArgs),
    /// A tenant's monthly statement (line items sum to the balance movement).
    Statement(admin::StatementArgs),
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
struct BackendsArgs {
    /// The gateway's base URL.
    #[arg(long, env = "TIDEPOOL_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An API key of the gateway.
    #[arg(long, env = "TIDEPOOL_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Limit of the request, in ms.
    #[arg(long, env = "TIDEPOOL_TIMEOUT_MS", default_value_t = 5_000)]
    timeout_ms: u64,
}

/// `tidepool backends`: one line per backend of a running gateway.
async fn backends(args: &BackendsArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let url = format!("{}/v1/backends", args.url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&args.api_key)
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

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    if let Some(path) = path {
        return Config::load(path).with_context(|| format!("loading {}", path.display()));
    }
    let default = PathBuf::from(CONFIG_PATH_DEFAULT);
    if default.exists() {
        Config::load(&default).context("loading ./tidepool.toml")
    } else {
        Config::parse(EMBEDDED_CONFIG, &PathBuf::from("<built-in tidepool.toml>"))
            .context("parsing the built-in configuration")
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout carries command output (a new key, tables) for scripts.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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

async fn serve(config: &Config, database_url: String, args: ServeArgs) -> anyhow::Result<()> {
    let mut config = config.clone();
    if let Some(replica_id) = args.replica_id {
        config.billing.replica_id = replica_id;
        config.validate()?;
    }
    let options = tidepool_gateway::ServeOptions {
        listen: args.listen.unwrap_or_else(|| config.server.listen.clone()),
        database_url,
        admin_token: args.admin_token.filter(|token| !token.is_empty()),
    };
    tidepool_gateway::serve(&config, &options, shutdown_signal()).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let config = || load_config(cli.config.as_ref());
    let database_url = |config: &Config| {
        cli.database_url
            .clone()
            .unwrap_or_else(|| config.server.database_url.clone())
    };
    // A reader that goes away (`tidepool usage … | head`) ends a command's output; a server's
    // errors are never hidden.
    let output_command = !matches!(cli.command, Command::Serve(_) | Command::Worker(_));
    let result = match cli.command {
        Command::Serve(args) => {
            let config = config()?;
            let url = database_url(&config);
            serve(&config, url, args).await
        }
        Command::Worker(args) => {
            let mut config = config()?;
            config.server.region = args.region;
            config.server.zone = args.zone;
            config.validate()?;
            let url = database_url(&config);
            serve(&config, url, args.serve).await
        }
        Command::Backends(args) => backends(&args).await,
        Command::Keys(args) => admin::keys(&database_url(&config()?), args).await,
        Command::Models => admin::models(&config()?),
        Command::Tenants(args) => admin::tenants(&database_url(&config()?), args).await,
        Command::Projects(args) => admin::projects(&database_url(&config()?), args).await,
        Command::Credit(args) => admin::credit(&database_url(&config()?), args).await,
        Command::Budgets(args) => admin::budgets(&database_url(&config()?), args).await,
        Command::RateLimits(args) => admin::rate_limits(&database_url(&config()?), args).await,
        Command::Usage(args) => admin::usage(&database_url(&config()?), &args).await,
        Command::Statement(args) => admin::statement(&database_url(&config()?), &args).await,
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
