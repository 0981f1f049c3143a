//! The administering commands over a running gateway's HTTP admin API instead of the database:
//! `tidepool keys|tenants|credit|budgets|audit … --url https://gateway`, the admin token from
//! `TIDEPOOL_ADMIN_TOKEN`. Operators then need no database credentials, and every change goes
//! through the same checks and audit log as the console's. Output is the same plain text as the
//! database path where the API returns the same facts.

use std::io::Write as _;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::admin::{
    AuditCommand, BudgetTarget, BudgetsCommand, CreditCommand, KeysCommand, TenantsCommand,
    key_role,
};

/// Limit of one admin request, in milliseconds.
pub(crate) const ADMIN_REQUEST_TIMEOUT_MS: u64 = 30_000;

/// A client of the admin API at `url` (`--url`), the token from `TIDEPOOL_ADMIN_TOKEN`; `None`
/// without `--url` (the command opens the database instead).
pub(crate) fn client(url: Option<&str>) -> anyhow::Result<Option<AdminClient>> {
    let Some(url) = url else {
        return Ok(None);
    };
    let token = std::env::var("TIDEPOOL_ADMIN_TOKEN")
        .context("--url needs the admin token in TIDEPOOL_ADMIN_TOKEN")?;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(ADMIN_REQUEST_TIMEOUT_MS))
        .build()?;
    Ok(Some(AdminClient {
        base: url.trim_end_matches('/').to_owned(),
        token,
        http,
    }))
}

/// A gateway's admin API.
pub(crate) struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading {url}"))?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|body| {
                    let error = &body["error"];
                    Some(format!(
                        "{} ({})",
                        error["message"].as_str()?,
                        error["code"].as_str().unwrap_or("?")
                    ))
                })
                .unwrap_or(text);
            anyhow::bail!("{method} {url}: {status}: {message}");
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("{url} answered non-JSON"))
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `GET path` answered with text (JSON lines).
    async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading {url}"))?;
        anyhow::ensure!(status.is_success(), "GET {url}: {status}: {text}");
        Ok(text)
    }
}

/// `tidepool keys … --url`.
pub(crate) async fn keys(client: &AdminClient, command: KeysCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        KeysCommand::Create {
            tenant,
            create_tenant,
            name,
            project,
            role,
        } => {
            create_key(
                client,
                &mut out,
                &tenant,
                create_tenant,
                &name,
                &project,
                &role,
            )
            .await?;
        }
        KeysCommand::List { tenant } => list_keys(client, &mut out, tenant).await?,
        KeysCommand::Revoke { key_id } => {
            client
                .call(
                    reqwest::Method::DELETE,
                    &format!("/admin/keys/{key_id}"),
                    None,
                )
                .await?;
            writeln!(out, "revoked {key_id}")?;
        }
        KeysCommand::Reinstate { key_id } => {
            let answer = client
                .call(
                    reqwest::Method::POST,
                    &format!("/admin/keys/{key_id}/reinstate"),
                    None,
                )
                .await?;
            if answer["reinstated"].as_bool() == Some(true) {
                writeln!(out, "reinstated {key_id}")?;
            } else {
                writeln!(out, "{key_id} was not suspended")?;
            }
        }
    }
    Ok(())
}

/// `keys list --url`: a tenant's keys.
async fn list_keys(
    client: &AdminClient,
    out: &mut impl std::io::Write,
    tenant: Option<String>,
) -> anyhow::Result<()> {
    let tenant = tenant.context("with --url, `keys list` needs --tenant")?;
    let keys = client.get(&format!("/admin/tenants/{tenant}/keys")).await?;
    writeln!(
        out,
        "{:<14} {:<20} {:<24} {:<12} {:>15} STATUS",
        "KEY_ID", "TENANT", "NAME", "ROLE", "CREATED_MS"
    )?;
    for key in keys["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let status = if !key["revoked_at_ms"].is_null() {
            "revoked"
        } else if !key["suspended_at_ms"].is_null() {
            "suspended"
        } else {
            "active"
        };
        writeln!(
            out,
            "{:<14} {:<20} {:<24} {:<12} {:>15} {status}",
            key["key_id"].as_str().unwrap_or("-"),
            key["tenant"].as_str().unwrap_or("-"),
            key["name"].as_str().unwrap_or("-"),
            key["role"].as_str().unwrap_or("-"),
            key["created_at_ms"].as_i64().unwrap_or(0),
        )?;
    }
    Ok(())
}

/// `keys create --url`: the tenant is checked (or created) first, as on the database path.
async fn create_key(
    client: &AdminClient,
    out: &mut impl std::io::Write,
    tenant: &str,
    create_tenant: bool,
    name: &str,
    project: &str,
    role: &str,
) -> anyhow::Result<()> {
    let role = key_role(role)?;
    let exists = client
        .get(&format!("/admin/tenants/{tenant}"))
        .await
        .is_ok();
    if !exists {
        anyhow::ensure!(
            create_tenant,
            "unknown tenant `{tenant}`: create it first (`tidepool tenants create \
             {tenant}`), or pass --create-tenant"
        );
        client
            .call(
                reqwest::Method::POST,
                "/admin/tenants",
                Some(json!({ "tenant": tenant })),
            )
            .await?;
    }
    let created = client
        .call(
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({
                "tenant": tenant, "project": project, "name": name, "role": role.as_str(),
            })),
        )
        .await?;
    let text = |key: &str| created[key].as_str().unwrap_or("-").to_owned();
    writeln!(out, "{}", text("key"))?;
    writeln!(
        out,
        "key_id {}  tenant {}  project {}  name {}  role {}  (the key above is shown only this \
         once)",
        text("key_id"),
        text("tenant"),
        text("project"),
        text("name"),
        text("role")
    )?;
    Ok(())
}

fn print_account(out: &mut impl std::io::Write, account: &Value) -> anyhow::Result<()> {
    let nanos = |key: &str| account[key].as_i64().unwrap_or(0);
    writeln!(
        out,
        "{:<20} balance {} {}  reserved {}  available {}",
        account["tenant"].as_str().unwrap_or("-"),
        tidepool_core::Nanos(nanos("balance_nanos")),
        account["currency"].as_str().unwrap_or("-"),
        tidepool_core::Nanos(nanos("reserved_nanos")),
        tidepool_core::Nanos(nanos("available_nanos")),
    )?;
    Ok(())
}

/// `tidepool tenants … --url`.
pub(crate) async fn tenants(client: &AdminClient, command: TenantsCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let account = match command {
        TenantsCommand::Create { tenant, currency } => {
            client
                .call(
                    reqwest::Method::POST,
                    "/admin/tenants",
                    Some(json!({ "tenant": tenant, "currency": currency })),
                )
                .await?
        }
        TenantsCommand::Show { tenant } => client.get(&format!("/admin/tenants/{tenant}")).await?,
    };
    print_account(&mut out, &account)
}

/// `tidepool credit add … --url`.
pub(crate) async fn credit(client: &AdminClient, command: CreditCommand) -> anyhow::Result<()> {
    let CreditCommand::Add {
        tenant,
        amount,
        note,
    } = command;
    let account = client
        .call(
            reqwest::Method::POST,
            &format!("/admin/tenants/{tenant}/credits"),
            Some(json!({ "amount": amount, "note": note })),
        )
        .await?;
    print_account(&mut std::io::stdout().lock(), &account)
}

fn budget_body(target: &BudgetTarget, limit: Option<&str>) -> anyhow::Result<Value> {
    Ok(match (&target.tenant, &target.project, &target.key_id) {
        (Some(tenant), Some(project), None) => json!({
            "scope": "project", "tenant": tenant, "project": project, "limit": limit,
        }),
        (None, None, Some(key_id)) => json!({ "scope": "key", "key_id": key_id, "limit": limit }),
        _ => anyhow::bail!("give --tenant and --project, or --key-id"),
    })
}

fn print_budget(out: &mut impl std::io::Write, budget: &Value) -> anyhow::Result<()> {
    let limit = budget["limit_nanos"].as_i64().map_or_else(
        || "none".to_owned(),
        |l| tidepool_core::Nanos(l).to_string(),
    );
    writeln!(
        out,
        "month {}  limit {limit}  reserved {}  spent {}",
        budget["month"].as_str().unwrap_or("-"),
        tidepool_core::Nanos(budget["reserved_nanos"].as_i64().unwrap_or(0)),
        tidepool_core::Nanos(budget["spent_nanos"].as_i64().unwrap_or(0)),
    )?;
    Ok(())
}

/// `tidepool budgets … --url`.
pub(crate) async fn budgets(client: &AdminClient, command: BudgetsCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        BudgetsCommand::Set { target, limit } => {
            let budget = client
                .call(
                    reqwest::Method::PUT,
                    "/admin/budgets",
                    Some(budget_body(&target, Some(&limit))?),
                )
                .await?;
            print_budget(&mut out, &budget)
        }
        BudgetsCommand::Clear { target } => {
            let budget = client
                .call(
                    reqwest::Method::PUT,
                    "/admin/budgets",
                    Some(budget_body(&target, None)?),
                )
                .await?;
            print_budget(&mut out, &budget)
        }
        BudgetsCommand::Show { target } => {
            let (Some(tenant), Some(project)) = (&target.tenant, &target.project) else {
                anyhow::bail!("with --url, `budgets show` takes --tenant and --project");
            };
            let list = client
                .get(&format!("/admin/budgets?tenant={tenant}"))
                .await?;
            let found = list["data"]
                .as_array()
                .and_then(|budgets| {
                    budgets
                        .iter()
                        .find(|b| b["project"].as_str() == Some(project.as_str()))
                })
                .cloned();
            if let Some(budget) = found {
                print_budget(&mut out, &budget)
            } else {
                writeln!(out, "no budget on {tenant}/{project}")?;
                Ok(())
            }
        }
    }
}

/// `audit verify --url`: the gateway verifies the chain (`chain_ok` of `GET /admin/audit`).
async fn verify(
    client: &AdminClient,
    out: &mut impl std::io::Write,
    expect_head: Option<&str>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        expect_head.is_none(),
        "--expect-head checks the database itself: run `audit verify` without --url"
    );
    let page = client.get("/admin/audit?limit=1").await?;
    if page["chain_ok"].as_bool() == Some(true) {
        writeln!(
            out,
            "audit chain ok: {} entries",
            page["chain_entries"].as_u64().unwrap_or(0)
        )?;
    } else {
        writeln!(
            out,
            "audit chain BROKEN at entry {}: {}",
            page["first_broken_seq"].as_i64().unwrap_or(-1),
            page["first_broken_reason"].as_str().unwrap_or("?")
        )?;
        anyhow::bail!("the audit chain does not verify");
    }
    Ok(())
}

/// `tidepool audit … --url`: the chain is verified by the gateway.
pub(crate) async fn audit(client: &AdminClient, command: &AuditCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        AuditCommand::Verify { expect_head } => {
            verify(client, &mut out, expect_head.as_deref()).await?;
        }
        AuditCommand::Export { after } => {
            let text = client
                .get_text(&format!("/admin/audit?format=jsonl&after={after}"))
                .await?;
            out.write_all(text.as_bytes())?;
        }
        AuditCommand::List {
            after,
            limit,
            jsonl: true,
        } => {
            let text = client
                .get_text(&format!(
                    "/admin/audit?format=jsonl&after={after}&limit={limit}"
                ))
                .await?;
            out.write_all(text.as_bytes())?;
        }
        AuditCommand::List {
            after,
            limit,
            jsonl: false,
        } => {
            let page = client
                .get(&format!("/admin/audit?after={after}&limit={limit}"))
                .await?;
            writeln!(
                out,
                "{:>8} {:>15} {:<14} {:<18} {:<32} DETAILS",
                "SEQ", "AT_MS", "ACTOR", "ACTION", "TARGET"
            )?;
            for entry in page["data"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                writeln!(
                    out,
                    "{:>8} {:>15} {:<14} {:<18} {:<32} {}",
                    entry["seq"].as_i64().unwrap_or(0),
                    entry["at_ms"].as_i64().unwrap_or(0),
                    entry["actor"].as_str().unwrap_or("-"),
                    entry["action"].as_str().unwrap_or("-"),
                    entry["target"].as_str().unwrap_or("-"),
                    entry["details"]
                )?;
            }
        }
    }
    Ok(())
}
