//! The administering commands over a running gateway's HTTP admin API instead of the database:
//! `tidepool keys|tenants|credit|budgets|audit … --url https://gateway`, the admin token from
//! `TIDEPOOL_ADMIN_TOKEN`. Operators then need no database credentials, and every change goes
//! through the same checks and audit log as the console's. Output is the same plain text as the
//! database path where the API returns the same facts.

use std::io::Write as _;

use anyhow::Context as _;
use serde_json::{Value, json};
use tidepool_core::{Currency, KeyId, Nanos, TenantId};
use tidepool_ledger::{Account, ApiKeyRecord, BudgetStatus, Month, ProjectId};

use crate::admin::{
    AuditCommand, AuditRow, BudgetTarget, BudgetsCommand, CreditCommand, KeysCommand,
    TenantsCommand, key_role, print_account, print_audit_table, print_budget, print_keys,
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
    /// The answer's body; an error status becomes an error quoting the API's message and code.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<String> {
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
        Ok(text)
    }

    /// The answer's JSON (`null` for an empty body).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let text = self.send(method, path, body).await?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("{path} answered non-JSON"))
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `GET path` answered with text (JSON lines).
    async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        self.send(reqwest::Method::GET, path, None).await
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
    let keys = items(&keys)
        .iter()
        .map(key_record)
        .collect::<anyhow::Result<Vec<_>>>()?;
    print_keys(out, &keys)
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

/// The `data` array of a list answer (empty when absent).
fn items(list: &Value) -> &[Value] {
    list["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A string field of an answer.
fn field<'a>(value: &'a Value, key: &str) -> anyhow::Result<&'a str> {
    value[key]
        .as_str()
        .with_context(|| format!("the gateway's answer has no `{key}`"))
}

/// An integer field of nano-units (0 when absent).
fn nanos(value: &Value, key: &str) -> Nanos {
    Nanos(value[key].as_i64().unwrap_or(0))
}

/// A key as `GET /admin/tenants/{tenant}/keys` lists it.
fn key_record(key: &Value) -> anyhow::Result<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        key_id: KeyId(field(key, "key_id")?.to_owned()),
        tenant: TenantId::new(field(key, "tenant")?)?,
        project: ProjectId::new(field(key, "project")?)?,
        name: field(key, "name")?.to_owned(),
        created_at_ms: key["created_at_ms"].as_i64().unwrap_or(0),
        revoked_at_ms: key["revoked_at_ms"].as_i64(),
        suspended_at_ms: key["suspended_at_ms"].as_i64(),
        suspended_reason: key["suspended_reason"].as_str().map(ToOwned::to_owned),
        role: key_role(field(key, "role")?)?,
    })
}

/// An account as `GET /admin/tenants/{tenant}` answers it.
fn account(account: &Value) -> anyhow::Result<Account> {
    Ok(Account {
        tenant: TenantId::new(field(account, "tenant")?)?,
        currency: Currency::parse(field(account, "currency")?)?,
        balance: nanos(account, "balance_nanos"),
        reserved: nanos(account, "reserved_nanos"),
    })
}

/// A budget as `PUT /admin/budgets` and `GET /admin/budgets` answer it.
fn budget_status(budget: &Value) -> anyhow::Result<BudgetStatus> {
    Ok(BudgetStatus {
        limit: budget["limit_nanos"].as_i64().map(Nanos),
        month: Month::parse(field(budget, "month")?)?,
        reserved: nanos(budget, "reserved_nanos"),
        spent: nanos(budget, "spent_nanos"),
    })
}

/// `tidepool tenants … --url`.
pub(crate) async fn tenants(client: &AdminClient, command: TenantsCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let answer = match command {
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
    print_account(&mut out, &account(&answer)?)
}

/// `tidepool credit add … --url`.
pub(crate) async fn credit(client: &AdminClient, command: CreditCommand) -> anyhow::Result<()> {
    let CreditCommand::Add {
        tenant,
        amount,
        note,
    } = command;
    let answer = client
        .call(
            reqwest::Method::POST,
            &format!("/admin/tenants/{tenant}/credits"),
            Some(json!({ "amount": amount, "note": note })),
        )
        .await?;
    print_account(&mut std::io::stdout().lock(), &account(&answer)?)
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
            print_budget(&mut out, &budget_status(&budget)?)
        }
        BudgetsCommand::Clear { target } => {
            let budget = client
                .call(
                    reqwest::Method::PUT,
                    "/admin/budgets",
                    Some(budget_body(&target, None)?),
                )
                .await?;
            print_budget(&mut out, &budget_status(&budget)?)
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
                print_budget(&mut out, &budget_status(&budget)?)
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
            let rows = items(&page).iter().map(|entry| AuditRow {
                seq: entry["seq"].as_i64().unwrap_or(0),
                at_ms: entry["at_ms"].as_i64().unwrap_or(0),
                actor: entry["actor"].as_str().unwrap_or("-"),
                action: entry["action"].as_str().unwrap_or("-"),
                target: entry["target"].as_str().unwrap_or("-"),
                request_id: entry["request_id"].as_str(),
                details: &entry["details"],
            });
            print_audit_table(&mut out, rows)?;
        }
    }
    Ok(())
}
