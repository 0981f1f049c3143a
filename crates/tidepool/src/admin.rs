//! `tidepool keys …`, `tidepool models` and `tidepool usage`: thin commands over the ledger and
//! the config that print plain, aligned text (first column first, so scripts can `split()`).

use std::io::Write as _;

use anyhow::Context as _;
use tidepool_core::{Config, KeyId, ModelKind, TenantId};
use tidepool_ledger::Ledger;

#[derive(Debug, clap::Args)]
pub(crate) struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Create a key; it is printed once, alone on the first line, and never stored.
    Create {
        /// Tenant (billing customer) the key belongs to; created if new.
        #[arg(long, env = "TIDEPOOL_TENANT")]
        tenant: String,
        /// A label for the key, e.g. the machine it lives on.
        #[arg(long, env = "TIDEPOOL_KEY_NAME")]
        name: String,
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
}

#[derive(Debug, clap::Args)]
pub(crate) struct UsageArgs {
    /// The tenant whose usage to total.
    #[arg(long, env = "TIDEPOOL_TENANT")]
    tenant: String,
}

fn tenant(value: &str) -> anyhow::Result<TenantId> {
    TenantId::new(value).with_context(|| format!("invalid tenant `{value}`"))
}

async fn connect(database_url: &str) -> anyhow::Result<Ledger> {
    Ledger::connect(database_url)
        .await
        .with_context(|| format!("opening the ledger at {database_url}"))
}

pub(crate) async fn keys(database_url: &str, args: KeysArgs) -> anyhow::Result<()> {
    let ledger = connect(database_url).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        KeysCommand::Create {
            tenant: name,
            name: label,
        } => {
            let created = ledger.create_key(&tenant(&name)?, &label).await?;
            writeln!(out, "{}", created.secret)?;
            writeln!(
                out,
                "key_id {}  tenant {}  name {}  (the key above is shown only this once)",
                created.record.key_id, created.record.tenant, created.record.name
            )?;
        }
        KeysCommand::List { tenant: filter } => {
            let filter = filter.as_deref().map(tenant).transpose()?;
            let keys = ledger.list_keys(filter.as_ref()).await?;
            writeln!(
                out,
                "{:<14} {:<20} {:<24} {:>15} STATUS",
                "KEY_ID", "TENANT", "NAME", "CREATED_MS"
            )?;
            for key in keys {
                let status = if key.revoked_at_ms.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                writeln!(
                    out,
                    "{:<14} {:<20} {:<24} {:>15} {status}",
                    key.key_id.to_string(),
                    key.tenant.as_str(),
                    key.name,
                    key.created_at_ms
                )?;
            }
        }
        KeysCommand::Revoke { key_id } => {
            ledger.revoke_key(&KeyId(key_id.clone())).await?;
            writeln!(out, "revoked {key_id}")?;
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
    let totals = ledger.usage_totals(&tenant(&args.tenant)?).await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<28} {:>10} {:>15} {:>17}",
        "MODEL", "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS"
    )?;
    for row in totals {
        writeln!(
            out,
            "{:<28} {:>10} {:>15} {:>17}",
            row.model, row.requests, row.prompt_tokens, row.completion_tokens
        )?;
    }
    Ok(())
}
