//! Roles, operator endpoints, tenant isolation of the admin API, console sessions (cookie, CSRF),
//! `[server] base_path` and the metrics listener: in process, on SQLite and PostgreSQL.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] fns fail loudly"
)]
#[expect(
    dead_code,
    reason = "the harness is shared by every test file; this one uses part of it"
)]
mod common;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use common::{ADMIN_TOKEN, App};
use serde_json::{Value, json};
use tidepool_core::{Limits, TenantId};
use tidepool_gateway::StateOptions;
use tidepool_ledger::testing::{Kind, TestDb};
use tidepool_ledger::{AuditContext, KeyRole, Ledger, ProjectId};
use tower::ServiceExt as _;

/// One request with any credentials; the status, headers and JSON body (`null` if none).
struct Call<'a> {
    method: &'a str,
    path: &'a str,
    bearer: Option<&'a str>,
    cookie: Option<&'a str>,
    headers: Vec<(&'a str, &'a str)>,
    body: Option<Value>,
}

impl<'a> Call<'a> {
    fn new(method: &'a str, path: &'a str) -> Self {
        Self {
            method,
            path,
            bearer: None,
            cookie: None,
            headers: Vec::new(),
            body: None,
        }
    }
    fn bearer(mut self, token: &'a str) -> Self {
        self.bearer = Some(token);
        self
    }
    fn cookie(mut self, cookie: &'a str) -> Self {
        self.cookie = Some(cookie);
        self
    }
    fn header(mut self, name: &'a str, value: &'a str) -> Self {
        self.headers.push((name, value));
        self
    }
    fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }
    async fn send(self, router: &axum::Router) -> (StatusCode, HeaderMap, Value) {
        let mut request = Request::builder().method(self.method).uri(self.path);
        if let Some(token) = self.bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(cookie) = self.cookie {
            request = request.header("cookie", cookie);
        }
        for (name, value) in self.headers {
            request = request.header(name, value);
        }
        let body = match self.body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let response = router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, value)
    }
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// A key of `tenant` with `role`, created straight in the ledger.
async fn key(ledger: &Ledger, tenant: &str, name: &str, role: KeyRole) -> (String, String) {
    let created = ledger
        .create_key_with_role(
            &TenantId::new(tenant).unwrap(),
            &ProjectId::default_project(),
            name,
            role,
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    (created.secret, created.record.key_id.0)
}

/// The operator's endpoints, with a body where one is needed.
fn operator_calls() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GET", "/v1/pool", None),
        ("GET", "/v1/backends", None),
        ("GET", "/metrics", None),
        ("GET", "/admin/audit", None),
        ("GET", "/admin/tenants", None),
        ("POST", "/admin/tenants", Some(json!({"tenant": "evil"}))),
        (
            "POST",
            "/admin/tenants/acme/credits",
            Some(json!({"amount": "5.00"})),
        ),
        (
            "PUT",
            "/admin/rate-limits",
            Some(json!({"scope": "model", "model": "fake-chat", "requests_per_minute": 1})),
        ),
        ("POST", "/admin/keys/abcdefabcdef/reinstate", None),
        ("POST", "/admin/models/fake-chat/load", None),
        ("POST", "/admin/models/fake-chat/unload", None),
    ]
}

#[tokio::test]
async fn every_operator_endpoint_is_404_to_every_api_key() {
    let app = App::new().await;
    let (admin_key, _) = key(&app.ledger, "acme", "admin", KeyRole::TenantAdmin).await;
    for (method, path, body) in operator_calls() {
        for key in [app.key.as_str(), admin_key.as_str()] {
            let mut call = Call::new(method, path).bearer(key);
            if let Some(body) = &body {
                call = call.body(body.clone());
            }
            let (status, _, value) = call.send(&app.router).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {value}");
            assert_eq!(code(&value), "not_found", "{method} {path}");
        }
        // Without credentials: 401, the operator: anything but 401/404 `not_found`.
        let (status, _, _) = Call::new(method, path).send(&app.router).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        let mut call = Call::new(method, path).bearer(ADMIN_TOKEN);
        if let Some(body) = &body {
            call = call.body(body.clone());
        }
        let (status, _, value) = call.send(&app.router).await;
        assert!(
            status != StatusCode::UNAUTHORIZED && code(&value) != "not_found",
            "operator on {method} {path}: {status} {value}"
        );
    }
    // Nothing changed for the keys' attempts: the operator's credit and tenant are the only ones.
    assert!(
        app.ledger
            .account(&TenantId::new("evil").unwrap())
            .await
            .is_ok()
    );
}

#[expect(clippy::too_many_lines, reason = "one walk over every tenant endpoint")]
/// Tenant A's `tenant-admin` key sees and touches nothing of tenant B's, on every tenant
/// endpoint; its own tenant works. Run on both stores.
async fn tenants_are_isolated(ledger: Ledger) {
    let app = App::on(
        ledger.clone(),
        None,
        StateOptions::new(Limits::default()),
        |c| c,
    )
    .await;
    let (acme_admin, _) = key(&ledger, "acme", "acme-admin", KeyRole::TenantAdmin).await;
    let (_, globex_key_id) = key(&ledger, "globex", "globex-app", KeyRole::Inference).await;
    let (globex_admin, _) = key(&ledger, "globex", "globex-admin", KeyRole::TenantAdmin).await;
    let month = "2026-01".to_owned();

    let reads = [
        "/admin/tenants/{t}",
        "/admin/tenants/{t}/keys",
        "/admin/tenants/{t}/usage",
        "/admin/tenants/{t}/statement?month={m}",
        "/admin/budgets?tenant={t}",
        "/admin/tenants/{t}/usage/daily?days=30",
    ];
    for template in reads {
        let own = template.replace("{t}", "acme").replace("{m}", &month);
        let other = template.replace("{t}", "globex").replace("{m}", &month);
        let (status, _, value) = Call::new("GET", &own)
            .bearer(&acme_admin)
            .send(&app.router)
            .await;
        assert_eq!(status, StatusCode::OK, "own {own}: {value}");
        let (status, _, value) = Call::new("GET", &other)
            .bearer(&acme_admin)
            .send(&app.router)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "other {other}: {value}");
        assert_eq!(code(&value), "not_found", "other {other}");
        // An inference key administers nothing, not even its own tenant.
        let (status, _, _) = Call::new("GET", &own)
            .bearer(&app.key)
            .send(&app.router)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "inference key on {own}");
    }
    let writes: Vec<(&str, String, Value)> = vec![
        (
            "POST",
            "/admin/keys".into(),
            json!({"tenant": "globex", "name": "x"}),
        ),
        (
            "DELETE",
            format!("/admin/keys/{globex_key_id}"),
            Value::Null,
        ),
        (
            "PUT",
            "/admin/budgets".into(),
            json!({"scope": "project", "tenant": "globex", "project": "default", "limit": "1.00"}),
        ),
        (
            "PUT",
            "/admin/budgets".into(),
            json!({"scope": "key", "key_id": globex_key_id, "limit": "1.00"}),
        ),
        (
            "POST",
            "/admin/tenants/globex/projects".into(),
            json!({"project": "p2"}),
        ),
    ];
    for (method, path, body) in &writes {
        let mut call = Call::new(method, path).bearer(&acme_admin);
        if !body.is_null() {
            call = call.body(body.clone());
        }
        let (status, _, value) = call.send(&app.router).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {value}");
        assert_eq!(code(&value), "not_found", "{method} {path}");
    }
    // None of it happened: globex's key works, has no budget, globex has one project.
    let globex = TenantId::new("globex").unwrap();
    let keys = ledger.list_keys(Some(&globex)).await.unwrap();
    assert_eq!(keys.len(), 2, "no key was created in globex");
    assert!(
        keys.iter().all(|k| k.revoked_at_ms.is_none()),
        "no globex key was revoked"
    );
    assert!(
        ledger.tenant_budgets(&globex).await.unwrap().is_empty(),
        "no globex budget was set"
    );
    assert_eq!(
        ledger.list_projects(&globex).await.unwrap().len(),
        1,
        "no globex project was created"
    );

    // The same writes on its own tenant succeed, as globex's own admin.
    for (method, path, body) in &writes {
        let mut call = Call::new(method, path).bearer(&globex_admin);
        if !body.is_null() {
            call = call.body(body.clone());
        }
        let (status, _, value) = call.send(&app.router).await;
        assert!(status.is_success(), "globex admin {method} {path}: {value}");
    }
    // A tenant admin's key creation names it in the audit log.
    let audit = ledger.list_audit(0, 1000).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.action == "key.create" && e.actor.as_str() != "admin"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn tenant_admin_keys_see_only_their_own_tenant_on_sqlite() {
    let db = TestDb::new(Kind::Sqlite).await;
    tenants_are_isolated(db.ledger().await).await;
}

#[tokio::test]
async fn tenant_admin_keys_see_only_their_own_tenant_on_postgres() {
    tidepool_ledger::testing::run(Kind::Postgres, |db| async move {
        tenants_are_isolated(db.ledger().await).await;
    })
    .await;
}

/// The `tidepool_console=…` pair of a `Set-Cookie` header.
fn session_cookie(headers: &HeaderMap) -> String {
    let set = headers
        .get(header::SET_COOKIE)
        .expect("a Set-Cookie")
        .to_str()
        .unwrap();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    set.split(';').next().unwrap().to_owned()
}

#[tokio::test]
#[expect(clippy::too_many_lines, reason = "one session's life, start to end")]
async fn console_sessions_ride_on_a_signed_cookie_and_refuse_cross_site_changes() {
    let app = App::new().await;
    let (admin_key, admin_key_id) = key(&app.ledger, "acme", "console", KeyRole::TenantAdmin).await;
    let sign_in = |body: Value| {
        Call::new("POST", "/console/api/session")
            .header("x-tidepool-console", "1")
            .body(body)
    };

    // An inference key cannot sign in; a wrong key or token neither.
    let (status, _, value) = sign_in(json!({"api_key": app.key})).send(&app.router).await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::FORBIDDEN, "console_role_required")
    );
    let (status, _, _) = sign_in(json!({"api_key": "tp-nope"}))
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = sign_in(json!({"admin_token": "wrong"}))
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A sign-in without the console's header is a cross-site form: refused.
    let (status, _, value) = Call::new("POST", "/console/api/session")
        .body(json!({"api_key": admin_key}))
        .send(&app.router)
        .await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::FORBIDDEN, "csrf_rejected")
    );

    let (status, headers, session) = sign_in(json!({"api_key": admin_key}))
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK, "{session}");
    assert_eq!(session["role"], "tenant-admin");
    assert_eq!(session["tenant"], "acme");
    let cookie = session_cookie(&headers);
    let (status, _, value) = Call::new("GET", "/console/api/session")
        .cookie(&cookie)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(value["key_id"], admin_key_id.as_str());

    // Reads ride on the cookie; operator endpoints stay 404.
    let (status, _, keys) = Call::new("GET", "/admin/tenants/acme/keys")
        .cookie(&cookie)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    let (status, _, _) = Call::new("GET", "/v1/pool")
        .cookie(&cookie)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Changes need the header and a same-origin Origin.
    let create = json!({"tenant": "acme", "name": "from-console"});
    let (status, _, value) = Call::new("POST", "/admin/keys")
        .cookie(&cookie)
        .body(create.clone())
        .send(&app.router)
        .await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::FORBIDDEN, "csrf_rejected")
    );
    let (status, _, value) = Call::new("POST", "/admin/keys")
        .cookie(&cookie)
        .header("x-tidepool-console", "1")
        .header("origin", "https://evil.example")
        .header("host", "tidepool.example")
        .body(create.clone())
        .send(&app.router)
        .await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::FORBIDDEN, "csrf_rejected")
    );
    let (status, _, created) = Call::new("POST", "/admin/keys")
        .cookie(&cookie)
        .header("x-tidepool-console", "1")
        .header("origin", "https://tidepool.example")
        .header("host", "tidepool.example")
        .body(create)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(created["key"].as_str().unwrap().starts_with("tp-"));
    assert_eq!(created["role"], "inference");

    // A forged or altered cookie is no session.
    let (prefix, tag) = cookie.rsplit_once('.').unwrap();
    let forged = format!("{prefix}.{}", tag.chars().rev().collect::<String>());
    let (status, _, value) = Call::new("GET", "/console/api/session")
        .cookie(&forged)
        .send(&app.router)
        .await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::UNAUTHORIZED, "console_signed_out")
    );

    // Revoking the session's key ends the session at once.
    app.ledger
        .revoke_key(&tidepool_core::KeyId(admin_key_id), &AuditContext::ADMIN)
        .await
        .unwrap();
    let (status, _, _) = Call::new("GET", "/admin/tenants/acme/keys")
        .cookie(&cookie)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The operator signs in with the admin token and reaches operator endpoints; signing out
    // clears the cookie.
    let (status, headers, session) = sign_in(json!({"admin_token": ADMIN_TOKEN}))
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(session["role"], "operator");
    let operator = session_cookie(&headers);
    let (status, _, audit) = Call::new("GET", "/admin/audit")
        .cookie(&operator)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        audit["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "console.sign_in"),
        "sign-ins are audited: {audit}"
    );
    let (status, headers, _) = Call::new("DELETE", "/console/api/session")
        .cookie(&operator)
        .header("x-tidepool-console", "1")
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let cleared = headers.get(header::SET_COOKIE).unwrap().to_str().unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
}

#[tokio::test]
async fn base_path_serves_every_route_under_its_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let ledger = Ledger::connect(&url).await.unwrap();
    let mut options = StateOptions::new(Limits::default());
    options.base_path = "/gw".to_owned();
    let app = App::on(ledger, Some(dir), options, |c| c).await;

    let (status, _, models) = Call::new("GET", "/gw/v1/models")
        .bearer(&app.key)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK, "{models}");
    let (status, _, value) = Call::new("GET", "/v1/models")
        .bearer(&app.key)
        .send(&app.router)
        .await;
    assert_eq!((status, code(&value)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, headers, _) = Call::new("GET", "/gw/console").send(&app.router).await;
    assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(headers[header::LOCATION], "console/");
    let (status, headers, _) = Call::new("GET", "/gw/console/").send(&app.router).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(headers.contains_key(header::CONTENT_SECURITY_POLICY));
    for asset in ["/gw/console/app.js", "/gw/console/app.css"] {
        let (status, _, _) = Call::new("GET", asset).send(&app.router).await;
        assert_eq!(status, StatusCode::OK, "{asset}");
    }
    let (status, headers, _) = Call::new("POST", "/gw/console/api/session")
        .header("x-tidepool-console", "1")
        .body(json!({"admin_token": ADMIN_TOKEN}))
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK);
    let set = headers[header::SET_COOKIE].to_str().unwrap();
    assert!(set.contains("Path=/gw/"), "{set}");
}

#[tokio::test]
async fn metrics_need_the_admin_token_on_the_public_listener_and_nothing_on_their_own() {
    let app = App::new().await;
    let (status, _, _) = Call::new("GET", "/metrics").send(&app.router).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = Call::new("GET", "/metrics")
        .bearer(&app.key)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = Call::new("GET", "/metrics")
        .bearer(ADMIN_TOKEN)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK);
    let metrics = tidepool_gateway::metrics_router();
    let response = metrics
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(common::body_bytes(response).await).unwrap();
    assert!(text.contains("tidepool_"), "{text}");
}

#[tokio::test]
#[expect(clippy::too_many_lines, reason = "seed, then compare two views of it")]
async fn the_daily_usage_chart_and_every_tenants_spend_add_up_to_the_ledger() {
    let app = App::new().await;
    let (admin_key, _) = key(&app.ledger, "acme", "console", KeyRole::TenantAdmin).await;
    for (model, tokens) in [("fake-chat", 3), ("fake-chat", 5), ("fake-base", 4)] {
        let path = if model == "fake-base" {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        let body = if model == "fake-base" {
            json!({"model": model, "prompt": "one two three", "max_tokens": tokens})
        } else {
            json!({"model": model, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": tokens})
        };
        let response = app.post(path, &body).await;
        assert_eq!(response.status(), StatusCode::OK, "{model}");
    }
    app.settle().await;
    let (status, _, usage) = Call::new("GET", "/v1/usage?scope=tenant")
        .bearer(&app.key)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    let (status, _, daily) = Call::new("GET", "/admin/tenants/acme/usage/daily?days=30")
        .bearer(&admin_key)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK, "{daily}");
    let sum = |rows: &Value, field: &str| -> i64 {
        rows.as_array()
            .unwrap()
            .iter()
            .map(|row| row[field].as_i64().unwrap())
            .sum()
    };
    assert_eq!(
        sum(&daily["data"], "cost_nanos"),
        usage["total_cost_nanos"].as_i64().unwrap()
    );
    assert!(sum(&daily["data"], "cost_nanos") > 0, "{daily}");
    // Model requests: the rollup also counts calls that named no model (`GET /v1/usage`
    // itself, requests refused before a model was resolved), at no cost.
    let model_rows: Value = daily["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| !row["model"].is_null())
        .cloned()
        .collect();
    for field in ["requests", "prompt_tokens", "completion_tokens"] {
        assert_eq!(
            sum(&model_rows, field),
            sum(&usage["data"], field),
            "{field}: {daily} against {usage}"
        );
    }
    let (status, _, value) = Call::new("GET", "/admin/tenants/acme/usage/daily?days=0")
        .bearer(&admin_key)
        .send(&app.router)
        .await;
    assert_eq!(
        (status, value["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("days"))
    );

    let (status, _, tenants) = Call::new("GET", "/admin/tenants")
        .bearer(ADMIN_TOKEN)
        .send(&app.router)
        .await;
    assert_eq!(status, StatusCode::OK, "{tenants}");
    let acme = tenants["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "acme")
        .expect("acme is listed");
    assert_eq!(
        acme["month_cost_nanos"], usage["total_cost_nanos"],
        "{tenants}"
    );
}
