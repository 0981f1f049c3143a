//! `tidepool keys|tenants|projects|credit|budgets|rate-limits|usage|statement|audit` and
//! `tidepool models`: thin commands over the ledger and the config that print plain, aligned text (first
//! column first, so scripts can `split()`), or CSV/JSON where a report is asked for. The JSON is
//! the same as the HTTP API's (`tidepool_gateway::accounts`).

use std::io::Write as _;

use anyhow::Context as _;

use tidepool_core::{Config, Currency, KeyId, ModelId, ModelKind, Nanos, TenantId};
use tidepool_ledger::{
    ApiKeyRecord, AuditAnchor, AuditContext, BudgetScope, KeyRole, Ledger, LedgerError,
    LedgerOptions, Month, ProjectId, RateLimitsChange, RateScope, StatementLine, UsageScope,
};

#[derive(Debug, clap::Args)]
pub(crate) struct KeysArgs {
    #[command(subcommand)]
    pub(crate) command: KeysCommand,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

/// `--url`: administer a running gateway through its HTTP admin API (`remote.rs`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RemoteArgs {
    /// Administer a running gateway through its HTTP admin API (e.g. `http://127.0.0.1:8080`,
    /// with its `[server] base_path` if it has one) instead of opening the database; the admin
    /// token is read from `TIDEPOOL_ADMIN_TOKEN`.
    #[arg(long = "url", env = "TIDEPOOL_ADMIN_URL", global = true)]
    pub(crate) url: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key; it is printed once, alone on the first line, and never stored.
    Create {
        /// Tenant (billing customer) the key belongs to; it must exist (`tidepool tenants
        /// create`) unless `--create-tenant` is given.
        #[arg(long, env = "TIDEPOOL_TENANT")]
        tenant: String,
        /// Create the tenant, with a USD account, if it does not exist.
        #[arg(long)]
        create_tenant: bool,
        /// A label for the key, e.g. the machine it lives on.
        #[arg(long, env = "TIDEPOOL_KEY_NAME")]
        name: String,
        /// The project it bills to (created if new).
        #[arg(long, env = "TIDEPOOL_PROJECT", default_value = "default")]
        project: String,
        /// `inference` (the model endpoints) or `tenant-admin` (also the tenant's keys,
        /// budgets, usage and statement, and the console).
        #[arg(long, default_value = "inference")]
        role: String,
    },
    /// List keys (never their secrets).
    List {
        /// Only this tenant's keys.
        #[arg(long, env = "TIDEPOOL_TENANT")]
        tenant: Option<String>,
    },
    /// Revoke a key by id; it fails authentication on the next request.
    Revoke {
        /// The key id (the part after `tp-`, as `keys list` shows it).
        key_id: String,
    },
    /// Lift a suspension by the leaked-key detector; the key works on its next request.
    Reinstate {
        /// The key id.
        key_id: String,
    },
}

/// How a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Debug, clap::Args)]
pub(crate) struct UsageArgs {
    /// The tenant whose usage to report.
    #[arg(long, env = "TIDEPOOL_TENANT")]
    tenant: String,
    /// Only this project.
    #[arg(long, conflicts_with = "key_id")]
    project: Option<String>,
    /// Only this key.
    #[arg(long)]
    key_id: Option<String>,
    /// A calendar month (UTC), `YYYY-MM`; all time when absent.
    #[arg(long)]
    month: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

#[derive(Debug, clap::Args)]
pub(crate) struct StatementArgs {
    #[arg(long, env = "TIDEPOOL_TENANT")]
    tenant: String,
    /// `YYYY-MM` (UTC).
    #[arg(long)]
    month: String,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

#[derive(Debug, clap::Args)]
pub(crate) struct TenantsArgs {
    #[command(subcommand)]
    pub(crate) command: TenantsCommand,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TenantsCommand {
    /// Create a tenant (a billing customer) with an empty prepaid account.
    Create {
        tenant: String,
        /// Account currency (ISO 4217).
        #[arg(long, default_value = "USD")]
        currency: String,
    },
    /// Show a tenant's balance, holds and projects.
    Show { tenant: String },
}

#[derive(Debug, clap::Args)]
pub(crate) struct ProjectsArgs {
    #[command(subcommand)]
    command: ProjectsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ProjectsCommand {
    /// Create a project under a tenant.
    Create {
        #[arg(long, env = "TIDEPOOL_TENANT")]
        tenant: String,
        project: String,
    },
    /// List a tenant's projects.
    List {
        #[arg(long, env = "TIDEPOOL_TENANT")]
        tenant: String,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct CreditArgs {
    #[command(subcommand)]
    pub(crate) command: CreditCommand,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum CreditCommand {
    /// Add prepaid credit to a tenant's balance.
    Add {
        #[arg(long, env = "TIDEPOOL_TENANT")]
        tenant: String,
        /// Whole currency units, e.g. `25` or `12.50` (exact, at most 9 decimals).
        amount: String,
        /// Shown on the statement.
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct BudgetsArgs {
    #[command(subcommand)]
    pub(crate) command: BudgetsCommand,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

/// Which budget: `--tenant T --project P` or `--key-id K`.
#[derive(Debug, clap::Args)]
pub(crate) struct BudgetTarget {
    #[arg(long, requires = "project", conflicts_with = "key_id")]
    pub(crate) tenant: Option<String>,
    #[arg(long, requires = "tenant")]
    pub(crate) project: Option<String>,
    #[arg(long)]
    pub(crate) key_id: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BudgetsCommand {
    /// Set a monthly budget (whole currency units per calendar month, UTC).
    Set {
        #[command(flatten)]
        target: BudgetTarget,
        /// e.g. `5` or `0.25`.
        limit: String,
    },
    /// Remove a monthly budget.
    Clear {
        #[command(flatten)]
        target: BudgetTarget,
    },
    /// Show a budget and what this month has used of it.
    Show {
        #[command(flatten)]
        target: BudgetTarget,
    },
}

/// Whose limits: `--key-id K`, `--tenant T --project P` or `--model M`.
#[derive(Debug, clap::Args)]
struct RateTarget {
    /// The limits of one key.
    #[arg(long, conflicts_with_all = ["tenant", "model"])]
    key_id: Option<String>,
    /// The limits of one project (with `--project`).
    #[arg(long, requires = "project", conflicts_with = "model")]
    tenant: Option<String>,
    #[arg(long, requires = "tenant")]
    project: Option<String>,
    /// The limits of one model, across all tenants.
    #[arg(long)]
    model: Option<String>,
}

/// Changes only the limits given: `--tpm` alone keeps the RPM limit; `--clear-rpm` removes it.
#[derive(Debug, clap::Args)]
pub(crate) struct RateLimitsArgs {
    #[command(subcommand)]
    command: Option<RateLimitsCommand>,
    #[command(flatten)]
    target: RateTarget,
    /// Set the requests per minute (the TPM limit stays as it is).
    #[arg(long, conflicts_with = "clear_rpm")]
    rpm: Option<u32>,
    /// Set the tokens (prompt + max completion) per minute (the RPM limit stays as it is).
    #[arg(long, conflicts_with = "clear_tpm")]
    tpm: Option<u32>,
    /// Remove the RPM limit (unlimited).
    #[arg(long)]
    clear_rpm: bool,
    /// Remove the TPM limit (unlimited).
    #[arg(long)]
    clear_tpm: bool,
}

#[derive(Debug, clap::Subcommand)]
enum RateLimitsCommand {
    /// Show the limits of a key, a project or a model.
    Show {
        #[command(flatten)]
        target: RateTarget,
    },
}

pub(crate) fn key_role(value: &str) -> anyhow::Result<KeyRole> {
    KeyRole::parse(value)
        .with_context(|| format!("invalid role `{value}`: `inference` or `tenant-admin`"))
}

fn tenant(value: &str) -> anyhow::Result<TenantId> {
    TenantId::new(value).with_context(|| format!("invalid tenant `{value}`"))
}

fn project(value: &str) -> anyhow::Result<ProjectId> {
    ProjectId::new(value).with_context(|| format!("invalid project `{value}`"))
}

fn amount(value: &str) -> anyhow::Result<Nanos> {
    Ok(Nanos::parse_decimal(value)?)
}

fn month(value: &str) -> anyhow::Result<Month> {
    Month::parse(value).with_context(|| format!("invalid month `{value}` (expected YYYY-MM)"))
}

async fn connect(database_url: &str) -> anyhow::Result<Ledger> {
    Ledger::connect(database_url).await.with_context(|| {
        format!(
            "opening the ledger at {}",
            tidepool_core::config::redact_url(database_url)
        )
    })
}

/// The ledger of `config`, with the audit checkpoint key of its `[audit]` section (changes made
/// here are audited, and checkpointed when due; `audit verify` checks signatures with it).
async fn connect_audited(config: &Config) -> anyhow::Result<Ledger> {
    let database_url = &config.server.database_url;
    let options = LedgerOptions {
        audit_checkpoints: tidepool_gateway::audit::audit_checkpointing(&config.audit)?,
        ..LedgerOptions::default()
    };
    Ledger::connect_with(database_url, options)
        .await
        .with_context(|| {
            format!(
                "opening the ledger at {}",
                tidepool_core::config::redact_url(database_url)
            )
        })
}

/// Changes made from the CLI are the operator's, outside any request.
const AUDIT: &AuditContext = &AuditContext::ADMIN;

pub(crate) async fn keys(config: &Config, args: KeysArgs) -> anyhow::Result<()> {
    let ledger = connect_audited(config).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        KeysCommand::Create {
            tenant: name,
            create_tenant,
            name: label,
            project: project_name,
            role,
        } => {
            let role = key_role(&role)?;
            if !create_tenant {
                match ledger.account(&tenant(&name)?).await {
                    Err(LedgerError::TenantNotFound { .. }) => anyhow::bail!(
                        "unknown tenant `{name}`: create it first (`tidepool tenants create \
                         {name}`), or pass --create-tenant"
                    ),
                    other => drop(other?),
                }
            }
            let created = ledger
                .create_key_with_role(
                    &tenant(&name)?,
                    &project(&project_name)?,
                    &label,
                    role,
                    AUDIT,
                )
                .await?;
            writeln!(out, "{}", created.secret)?;
            writeln!(
                out,
                "key_id {}  tenant {}  project {}  name {}  role {}  (the key above is shown only \
                 this once)",
                created.record.key_id,
                created.record.tenant,
                created.record.project,
                created.record.name,
                created.record.role.as_str()
            )?;
        }
        KeysCommand::List { tenant: filter } => {
            let filter = filter.as_deref().map(tenant).transpose()?;
            let keys = ledger.list_keys(filter.as_ref()).await?;
            print_keys(&mut out, &keys)?;
        }
        KeysCommand::Revoke { key_id } => {
            ledger.revoke_key(&KeyId(key_id.clone()), AUDIT).await?;
            writeln!(out, "revoked {key_id}")?;
        }
        KeysCommand::Reinstate { key_id } => {
            if ledger.reinstate_key(&KeyId(key_id.clone()), AUDIT).await? {
                writeln!(out, "reinstated {key_id}")?;
            } else {
                writeln!(out, "{key_id} was not suspended")?;
            }
        }
    }
    Ok(())
}

pub(crate) fn models(config: &Config) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<28} {:<11} {:>8} {:>5}  FILE",
        "ID", "KIND", "CONTEXT", "SEQS"
    )?;
    for model in &config.models {
        let kind = match model.kind {
            ModelKind::Chat => "chat",
            ModelKind::Completion => "completion",
            ModelKind::Embedding => "embedding",
        };
        writeln!(
            out,
            "{:<28} {:<11} {:>8} {:>5}  {}",
            model.id.as_str(),
            kind,
            model.context_tokens,
            model.seqs_max,
            config.model_path(model).display()
        )?;
    }
    Ok(())
}

pub(crate) async fn usage(database_url: &str, args: &UsageArgs) -> anyhow::Result<()> {
    let ledger = connect(database_url).await?;
    let tenant = tenant(&args.tenant)?;
    let scope = match (&args.project, &args.key_id) {
        (Some(p), _) => UsageScope::Project {
            tenant: tenant.clone(),
            project: project(p)?,
        },
        (None, Some(k)) => UsageScope::Key {
            tenant: tenant.clone(),
            key_id: KeyId(k.clone()),
        },
        (None, None) => UsageScope::Tenant(tenant.clone()),
    };
    let month = args.month.as_deref().map(month).transpose()?;
    let account = ledger.account(&tenant).await?;
    let rows = ledger.usage_summary(&scope, month).await?;
    let mut report =
        tidepool_gateway::accounts::usage_report(&scope, month, account.currency, rows)?;
    let (requests, cost_nanos) = ledger.batch_usage(&scope, month).await?;
    report.batch = tidepool_gateway::accounts::BatchUsageOut {
        requests,
        cost_nanos,
    };
    print_usage(&report, args.format)
}

/// A usage report as JSON, CSV or a table.
fn print_usage(
    report: &tidepool_gateway::accounts::UsageReport,
    format: Format,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(report)?)?,
        Format::Csv => {
            writeln!(
                out,
                "model,requests,prompt_tokens,cached_prompt_tokens,completion_tokens,cost_nanos,currency"
            )?;
            for row in &report.data {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{}",
                    row.model,
                    row.requests,
                    row.prompt_tokens,
                    row.cached_prompt_tokens,
                    row.completion_tokens,
                    row.cost_nanos,
                    report.currency
                )?;
            }
        }
        Format::Table => {
            writeln!(
                out,
                "{:<28} {:>10} {:>15} {:>14} {:>17} {:>22}",
                "MODEL", "REQUESTS", "PROMPT_TOKENS", "CACHED_TOKENS", "COMPLETION_TOKENS", "COST"
            )?;
            for row in &report.data {
                writeln!(
                    out,
                    "{:<28} {:>10} {:>15} {:>14} {:>17} {:>18} {}",
                    row.model,
                    row.requests,
                    row.prompt_tokens,
                    row.cached_prompt_tokens,
                    row.completion_tokens,
                    Nanos(row.cost_nanos),
                    report.currency
                )?;
            }
            writeln!(
                out,
                "{:<28} {:>79} {}",
                "TOTAL",
                Nanos(report.total_cost_nanos),
                report.currency
            )?;
        }
    }
    Ok(())
}

pub(crate) async fn statement(database_url: &str, args: &StatementArgs) -> anyhow::Result<()> {
    let ledger = connect(database_url).await?;
    let statement = ledger
        .statement(&tenant(&args.tenant)?, month(&args.month)?)
        .await?;
    let mut out = std::io::stdout().lock();
    if args.format == Format::Json {
        let json = tidepool_gateway::accounts::statement_out(&statement);
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
        return Ok(());
    }
    let csv = args.format == Format::Csv;
    let currency = statement.currency;
    if csv {
        writeln!(out, "kind,at_ms,description,requests,amount_nanos,currency")?;
        writeln!(out, "opening,,,,{},{currency}", statement.opening_balance.0)?;
    } else {
        writeln!(
            out,
            "statement {} {}  opening balance {} {currency}",
            statement.tenant, statement.month, statement.opening_balance
        )?;
    }
    for line in &statement.lines {
        let (kind, at_ms, description, requests) = describe(line);
        if csv {
            writeln!(
                out,
                "{kind},{at_ms},\"{}\",{requests},{},{currency}",
                description.replace('"', "\"\""),
                line.amount().0
            )?;
        } else {
            writeln!(
                out,
                "{kind:<7} {at_ms:>14} {:>19} {currency}  {requests:>8}  {description}",
                line.amount().to_string()
            )?;
        }
    }
    if csv {
        writeln!(out, "closing,,,,{},{currency}", statement.closing_balance.0)?;
    } else {
        writeln!(
            out,
            "closing balance {} {currency}",
            statement.closing_balance
        )?;
    }
    Ok(())
}

/// A statement line as (kind, time, description, requests) for the table and CSV forms.
fn describe(line: &StatementLine) -> (&'static str, i64, String, String) {
    match line {
        StatementLine::Credit { at_ms, note, .. } => {
            ("credit", *at_ms, note.clone(), String::new())
        }
        StatementLine::Usage {
            price,
            requests,
            prompt_tokens,
            cached_prompt_tokens,
            completion_tokens,
            ..
        } => (
            "usage",
            price.effective_from_ms,
            format!(
                "{} in {} (cached {}) out {} at {}/{}/{} per Mtok",
                price.model,
                prompt_tokens,
                cached_prompt_tokens,
                completion_tokens,
                price.input_per_mtok,
                price.cached_input_per_mtok,
                price.output_per_mtok
            ),
            requests.to_string(),
        ),
    }
}

pub(crate) fn print_account(
    out: &mut impl std::io::Write,
    account: &tidepool_ledger::Account,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<20} balance {} {}  reserved {}  available {}",
        account.tenant.as_str(),
        account.balance,
        account.currency,
        account.reserved,
        account.available()
    )?;
    Ok(())
}

pub(crate) async fn tenants(config: &Config, args: TenantsArgs) -> anyhow::Result<()> {
    let ledger = connect_audited(config).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        TenantsCommand::Create {
            tenant: name,
            currency,
        } => {
            let id = tenant(&name)?;
            ledger
                .create_tenant(&id, Currency::parse(&currency)?, AUDIT)
                .await?;
            print_account(&mut out, &ledger.account(&id).await?)?;
        }
        TenantsCommand::Show { tenant: name } => {
            let id = tenant(&name)?;
            print_account(&mut out, &ledger.account(&id).await?)?;
            for project in ledger.list_projects(&id).await? {
                writeln!(out, "  project {project}")?;
            }
        }
    }
    Ok(())
}

pub(crate) async fn projects(config: &Config, args: ProjectsArgs) -> anyhow::Result<()> {
    let ledger = connect_audited(config).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        ProjectsCommand::Create {
            tenant: name,
            project: project_name,
        } => {
            ledger
                .create_project(&tenant(&name)?, &project(&project_name)?, AUDIT)
                .await?;
            writeln!(out, "{name}/{project_name}")?;
        }
        ProjectsCommand::List { tenant: name } => {
            for project in ledger.list_projects(&tenant(&name)?).await? {
                writeln!(out, "{project}")?;
            }
        }
    }
    Ok(())
}

pub(crate) async fn credit(config: &Config, args: CreditArgs) -> anyhow::Result<()> {
    let ledger = connect_audited(config).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        CreditCommand::Add {
            tenant: name,
            amount: value,
            note,
        } => {
            let account = ledger
                .credit(&tenant(&name)?, amount(&value)?, &note, AUDIT)
                .await?;
            print_account(&mut out, &account)?;
        }
    }
    Ok(())
}

fn budget_scope(target: &BudgetTarget) -> anyhow::Result<BudgetScope> {
    match (&target.tenant, &target.project, &target.key_id) {
        (Some(t), Some(p), None) => Ok(BudgetScope::Project {
            tenant: tenant(t)?,
            project: project(p)?,
        }),
        (None, None, Some(k)) => Ok(BudgetScope::Key {
            key_id: KeyId(k.clone()),
        }),
        _ => anyhow::bail!("name a budget with --tenant T --project P, or --key-id K"),
    }
}

pub(crate) async fn budgets(config: &Config, args: BudgetsArgs) -> anyhow::Result<()> {
    let ledger = connect_audited(config).await?;
    let mut out = std::io::stdout().lock();
    let target = match args.command {
        BudgetsCommand::Set { target, limit } => {
            ledger
                .set_budget(&budget_scope(&target)?, Some(amount(&limit)?), AUDIT)
                .await?;
            target
        }
        BudgetsCommand::Clear { target } => {
            ledger
                .set_budget(&budget_scope(&target)?, None, AUDIT)
                .await?;
            target
        }
        BudgetsCommand::Show { target } => target,
    };
    let status = ledger.budget(&budget_scope(&target)?).await?;
    print_budget(&mut out, &status)
}

/// A budget's line: `month … limit … spent … reserved …`.
pub(crate) fn print_budget(
    out: &mut impl std::io::Write,
    status: &tidepool_ledger::BudgetStatus,
) -> anyhow::Result<()> {
    let limit = status
        .limit
        .map_or_else(|| "none".to_owned(), |l| l.to_string());
    writeln!(
        out,
        "month {}  limit {limit}  spent {}  reserved {}",
        status.month, status.spent, status.reserved
    )?;
    Ok(())
}

impl RateTarget {
    fn is_empty(&self) -> bool {
        self.key_id.is_none()
            && self.tenant.is_none()
            && self.project.is_none()
            && self.model.is_none()
    }
}

fn rate_scope(target: &RateTarget) -> anyhow::Result<RateScope> {
    match (
        &target.key_id,
        &target.tenant,
        &target.project,
        &target.model,
    ) {
        (Some(k), None, None, None) => Ok(RateScope::Key {
            key_id: KeyId(k.clone()),
        }),
        (None, Some(t), Some(p), None) => Ok(RateScope::Project {
            tenant: tenant(t)?,
            project: project(p)?,
        }),
        (None, None, None, Some(m)) => Ok(RateScope::Model {
            model: ModelId::new(m.as_str()).with_context(|| format!("invalid model `{m}`"))?,
        }),
        _ => anyhow::bail!("name one scope: --key-id K, --tenant T --project P, or --model M"),
    }
}

/// `rate-limits [--rpm N|--clear-rpm] [--tpm N|--clear-tpm]` and `rate-limits show`: both print
/// the limits in force afterwards.
pub(crate) async fn rate_limits(config: &Config, args: RateLimitsArgs) -> anyhow::Result<()> {
    let edit = |value: Option<u32>, clear: bool| if clear { Some(None) } else { value.map(Some) };
    let change = RateLimitsChange {
        requests_per_minute: edit(args.rpm, args.clear_rpm),
        tokens_per_minute: edit(args.tpm, args.clear_tpm),
    };
    let ledger = connect_audited(config).await?;
    let limits = match &args.command {
        Some(RateLimitsCommand::Show { target }) => {
            anyhow::ensure!(
                change == RateLimitsChange::default() && args.target.is_empty(),
                "`rate-limits show` takes only the scope: --key-id K, --tenant T --project P, or --model M"
            );
            ledger.rate_limits(&rate_scope(target)?).await?
        }
        None => {
            anyhow::ensure!(
                change != RateLimitsChange::default(),
                "nothing to change: give --rpm, --tpm, --clear-rpm or --clear-tpm (or use `rate-limits show`)"
            );
            ledger
                .change_rate_limits(&rate_scope(&args.target)?, change, AUDIT)
                .await?
        }
    };
    let show = |v: Option<u32>| v.map_or_else(|| "unlimited".to_owned(), |v| v.to_string());
    writeln!(
        std::io::stdout().lock(),
        "rpm {}  tpm {}",
        show(limits.requests_per_minute),
        show(limits.tokens_per_minute)
    )?;
    Ok(())
}

/// The `keys list` table.
pub(crate) fn print_keys(
    out: &mut impl std::io::Write,
    keys: &[ApiKeyRecord],
) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<14} {:<20} {:<24} {:<12} {:>15} STATUS",
        "KEY_ID", "TENANT", "NAME", "ROLE", "CREATED_MS"
    )?;
    for key in keys {
        let status = if key.revoked_at_ms.is_some() {
            "revoked"
        } else if key.suspended_at_ms.is_some() {
            "suspended"
        } else {
            "active"
        };
        writeln!(
            out,
            "{:<14} {:<20} {:<24} {:<12} {:>15} {status}",
            key.key_id.to_string(),
            key.tenant.as_str(),
            key.name,
            key.role.as_str(),
            key.created_at_ms
        )?;
    }
    Ok(())
}

/// One line of the `audit list` table.
pub(crate) struct AuditRow<'a> {
    pub(crate) seq: i64,
    pub(crate) at_ms: i64,
    pub(crate) actor: &'a str,
    pub(crate) action: &'a str,
    pub(crate) target: &'a str,
    pub(crate) request_id: Option<&'a str>,
    pub(crate) details: &'a dyn std::fmt::Display,
}

/// The `audit list` table: a header, then one line per entry.
pub(crate) fn print_audit_table<'a>(
    out: &mut impl std::io::Write,
    rows: impl IntoIterator<Item = AuditRow<'a>>,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:>8} {:>15} {:<14} {:<18} {:<32} {:<36} DETAILS",
        "SEQ", "AT_MS", "ACTOR", "ACTION", "TARGET", "REQUEST_ID"
    )?;
    for row in rows {
        writeln!(
            out,
            "{:>8} {:>15} {:<14} {:<18} {:<32} {:<36} {}",
            row.seq,
            row.at_ms,
            row.actor,
            row.action,
            row.target,
            row.request_id.unwrap_or("-"),
            row.details
        )?;
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(crate) struct AuditArgs {
    #[command(subcommand)]
    pub(crate) command: AuditCommand,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum AuditCommand {
    /// Recompute every entry's hash and link and check every checkpoint (its signature too when
    /// the checkpoint key is set); print the verdict, exit 1 naming the first bad entry.
    Verify {
        /// `SEQ:HASH` of an entry kept outside the database (a checkpoint `verify` printed
        /// before): the log must still hold that entry with that hash.
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Option<String>,
    },
    /// Print entries, oldest first.
    List {
        /// Entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Entries to print (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON object per line (the export's form) instead of the table.
        #[arg(long)]
        jsonl: bool,
    },
    /// Write every entry after `--after`, oldest first, as JSON lines (the same objects as
    /// `GET /admin/audit`).
    Export {
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
}

pub(crate) async fn audit(config: &Config, args: &AuditArgs) -> anyhow::Result<()> {
    let ledger = connect_audited(config).await?;
    let mut out = std::io::stdout().lock();
    match &args.command {
        AuditCommand::Verify { expect_head } => {
            verify_audit(&ledger, config, expect_head.as_deref(), &mut out).await
        }
        AuditCommand::List {
            after,
            limit,
            jsonl,
        } => {
            let entries = ledger.list_audit(*after, *limit).await?;
            if *jsonl {
                write!(out, "{}", tidepool_gateway::audit::jsonl(entries)?)?;
                return Ok(());
            }
            let rows = entries.iter().map(|entry| AuditRow {
                seq: entry.seq,
                at_ms: entry.at_ms,
                actor: entry.actor.as_str(),
                action: &entry.action,
                target: &entry.target,
                request_id: entry.request_id.as_deref(),
                details: &entry.details,
            });
            print_audit_table(&mut out, rows)
        }
        AuditCommand::Export { after } => {
            let mut after = *after;
            loop {
                let entries = ledger
                    .list_audit(after, tidepool_ledger::AUDIT_PAGE_LEN_MAX)
                    .await?;
                let Some(last) = entries.last().map(|e| e.seq) else {
                    return Ok(());
                };
                write!(out, "{}", tidepool_gateway::audit::jsonl(entries)?)?;
                after = last;
            }
        }
    }
}

/// `audit verify [--expect-head SEQ:HASH]`: the verdict, the latest checkpoint to keep, and an
/// error naming the first bad entry.
async fn verify_audit(
    ledger: &Ledger,
    config: &Config,
    expect_head: Option<&str>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let anchor = expect_head
        .map(str::parse::<AuditAnchor>)
        .transpose()
        .context("--expect-head takes SEQ:HASH (a sequence number and 64 hex digits)")?;
    let verdict = ledger.verify_audit_chain(anchor.as_ref()).await?;
    let signatures = if verdict.signatures_checked {
        "signatures checked".to_owned()
    } else {
        format!(
            "signatures NOT checked: no checkpoint key (set {})",
            config.audit.checkpoint_key_env
        )
    };
    if let Some(broken) = &verdict.first_broken {
        writeln!(
            out,
            "audit chain BROKEN at entry {}: {}",
            broken.seq, broken.reason
        )?;
        writeln!(
            out,
            "read {} entries and {} checkpoints before it ({signatures})",
            verdict.entries, verdict.checkpoints
        )?;
        anyhow::bail!("the audit chain does not verify (entry {})", broken.seq);
    }
    writeln!(
        out,
        "audit chain ok: {} entries, {} checkpoints ({signatures})",
        verdict.entries, verdict.checkpoints
    )?;
    if let Some(checkpoint) = &verdict.latest_checkpoint {
        writeln!(
            out,
            "latest checkpoint: {}:{} (keep a copy elsewhere; pass it as --expect-head)",
            checkpoint.seq, checkpoint.hash
        )?;
    }
    if let Some(last) = &verdict.last {
        writeln!(out, "last entry: {last}")?;
    }
    Ok(())
}
