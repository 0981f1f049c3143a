//! Webhook alerts, the audit log and the leaked-key detector through the whole gateway, in
//! process: a real axum receiver on 127.0.0.1:0 checks every delivery's HMAC; a receiver that
//! answers 500 first gets the event again later (same delivery id); two replicas on one
//! PostgreSQL deliver every outbox row exactly once; a key with a steady history that bursts is
//! suspended (429 `key_suspended` on every later request, an alert, an audit entry) until an
//! operator reinstates it; admin actions are audited and the chain verifies over HTTP;
//! `database_lost` reaches the receiver from memory while the database is down; a budget
//! refused three times sends one `budget_reached`.
//!
//! Method: events are emitted through the public `Alerts` handle or by real traffic; the test
//! waits on what the receiver got (a channel), never on time. The detector's clock is a
//! `ManualClock` the test moves interval by interval (the fake engine serves the load).

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers outside #[test] fns fail loudly"
)]
#[expect(
    dead_code,
    reason = "the shared harness serves several test binaries; this one uses part of it"
)]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use common::*;
use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;
use tidepool_core::{AlertConfig, LeakDetectionConfig, Limits};
use tidepool_gateway::StateOptions;
use tidepool_gateway::alerts::{AlertEvent, AlertSink};
use tidepool_ledger::testing::{Kind, ManualClock, TestDb, ThrowawayPostgres};
use tidepool_ledger::{AuditContext, Ledger, LedgerOptions};
use tokio::sync::mpsc;

const SECRET: &str = "whsec-test-secret";
/// Long enough never to be hit by a working test; only a hang guard.
const WAIT_MAX: Duration = Duration::from_mins(1);

/// One delivery the receiver accepted.
#[derive(Debug, Clone)]
struct Received {
    event: String,
    delivery: String,
    body: Value,
}

/// A webhook receiver: answers 500 to the first `failures` requests, then 200; checks every
/// request's signature (a bad one is a test failure, answered 400 and reported).
struct Receiver {
    url: String,
    accepted: mpsc::Receiver<Received>,
    attempts: Arc<AtomicU32>,
    bad_signatures: Arc<AtomicU32>,
}

fn signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(given) = headers
        .get("x-tidepool-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
    else {
        return false;
    };
    let Ok(given) = hex::decode(given) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    // Constant-time comparison, as a real receiver must do.
    mac.verify_slice(&given).is_ok() && headers.contains_key("x-tidepool-timestamp")
}

async fn receiver(failures: u32) -> Receiver {
    let (tx, accepted) = mpsc::channel(1024);
    let attempts = Arc::new(AtomicU32::new(0));
    let bad_signatures = Arc::new(AtomicU32::new(0));
    let (count, bad) = (attempts.clone(), bad_signatures.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (tx, count, bad) = (tx.clone(), count.clone(), bad.clone());
            async move {
                if !signature_ok(&headers, &body) {
                    bad.fetch_add(1, Ordering::SeqCst);
                    return StatusCode::BAD_REQUEST;
                }
                let attempt = count.fetch_add(1, Ordering::SeqCst);
                if attempt < failures {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                tx.send(Received {
                    event: header("x-tidepool-event"),
                    delivery: header("x-tidepool-delivery"),
                    body: serde_json::from_slice(&body).unwrap(),
                })
                .await
                .unwrap();
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver {
        url,
        accepted,
        attempts,
        bad_signatures,
    }
}

impl Receiver {
    async fn next(&mut self) -> Received {
        tokio::time::timeout(WAIT_MAX, self.accepted.recv())
            .await
            .expect("the receiver got an event")
            .expect("the receiver is alive")
    }
}

fn sink(url: &str) -> AlertSink {
    AlertSink::new(&AlertConfig {
        id: "ops".to_owned(),
        url: url.to_owned(),
        events: tidepool_core::ALERT_EVENTS
            .iter()
            .map(|e| (*e).to_owned())
            .collect(),
        secret: Some(SECRET.to_owned()),
        secret_env: None,
        timeout_ms: 5_000,
        attempts_max: 5,
        backoff_initial_ms: 20,
        backoff_max_ms: 200,
    })
    .unwrap()
}

fn options_with(url: &str) -> StateOptions {
    let mut options = StateOptions::new(Limits::default());
    options.alert_sinks = vec![sink(url)];
    options
}

async fn sqlite_app(options: StateOptions) -> App {
    sqlite_app_at(options).await.0
}

/// An app on a fresh SQLite ledger, and that ledger's URL.
async fn sqlite_app_at(options: StateOptions) -> (App, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let ledger = Ledger::connect(&url).await.unwrap();
    (
        App::on(ledger, Some(dir), options, |config| config).await,
        url,
    )
}

/// Waits until the outbox has `delivered` delivered rows and none pending.
async fn outbox_settles(ledger: &Ledger, delivered: u64) {
    tokio::time::timeout(WAIT_MAX, async {
        loop {
            let counts = ledger.outbox_counts().await.unwrap();
            if counts.delivered == delivered && counts.pending == 0 {
                return counts;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the outbox settles");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_the_signed_event_later_and_once() {
    let mut hook = receiver(2).await;
    let app = sqlite_app(options_with(&hook.url)).await;
    app.state
        .alerts()
        .engine_restarted("fake-chat", "the watchdog restarted it");
    let got = hook.next().await;
    assert_eq!(got.event, "engine_restarted");
    assert_eq!(got.body["event"], "engine_restarted");
    assert_eq!(got.body["data"]["model"], "fake-chat");
    assert_eq!(
        got.body["id"],
        got.delivery.as_str(),
        "the delivery id is the event id"
    );
    assert_eq!(
        hook.attempts.load(Ordering::SeqCst),
        3,
        "two 500s, then the accepted attempt"
    );
    assert_eq!(hook.bad_signatures.load(Ordering::SeqCst), 0);
    outbox_settles(&app.ledger, 1).await;

    // A second event goes through; the first is not sent again.
    app.state.alerts().engine_restarted("fake-base", "again");
    let second = hook.next().await;
    assert_eq!(second.body["data"]["model"], "fake-base");
    assert_ne!(second.delivery, got.delivery);
    outbox_settles(&app.ledger, 2).await;
    assert!(hook.accepted.try_recv().is_err(), "nothing delivered twice");
    assert_eq!(hook.attempts.load(Ordering::SeqCst), 4);
    app.state.alerts().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgresql_deliver_every_row_once() {
    tidepool_ledger::testing::run(Kind::Postgres, two_replicas_deliver_every_row_once).await;
}

async fn two_replicas_deliver_every_row_once(db: Arc<TestDb>) {
    let mut hook = receiver(0).await;
    let replica = |name: &str| {
        let url = db.url.clone();
        let name = name.to_owned();
        async move {
            Ledger::connect_with(
                &url,
                LedgerOptions {
                    replica_id: name,
                    ..LedgerOptions::default()
                },
            )
            .await
            .unwrap()
        }
    };
    let app_a = App::on(replica("a").await, None, options_with(&hook.url), |c| c).await;
    let app_b = App::on(replica("b").await, None, options_with(&hook.url), |c| c).await;
    let events = 40;
    for index in 0..events {
        let app = if index % 2 == 0 { &app_a } else { &app_b };
        app.state
            .alerts()
            .engine_restarted(&format!("model-{index}"), "load test");
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..events {
        let got = hook.next().await;
        assert!(seen.insert(got.delivery.clone()), "{} twice", got.delivery);
    }
    outbox_settles(&app_a.ledger, u64::try_from(events).unwrap()).await;
    // Nothing else arrives: every row was sent exactly once.
    app_a.state.alerts().engine_restarted("sentinel", "last");
    let last = hook.next().await;
    assert_eq!(
        last.body["data"]["model"], "sentinel",
        "the sentinel comes last"
    );
    assert!(hook.accepted.try_recv().is_err(), "nothing delivered twice");
    assert_eq!(
        hook.bad_signatures.load(Ordering::SeqCst),
        0,
        "every signature verifies"
    );
    app_a.state.alerts().stop();
    app_b.state.alerts().stop();
}

async fn chat(app: &App, key: &str) -> axum::http::Response<Body> {
    let body = json!({
        "model": FAKE_CHAT, "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}],
    });
    app.send(post("/v1/chat/completions", key, body.to_string()))
        .await
}

fn admin(method: &str, path: &str, body: Option<Value>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap()
}

/// Six minutes of a steady 12 requests a minute, then 20× that (240) in the seventh; returns
/// the burst's request that was refused `key_suspended`.
async fn steady_then_burst(app: &App, clock: &ManualClock) -> usize {
    for _ in 0..6 {
        for _ in 0..12 {
            let status = chat(app, &app.key).await.status();
            assert_eq!(status, StatusCode::OK, "steady traffic is served");
        }
        clock.advance(60_000);
    }
    for index in 1..=240 {
        let response = chat(app, &app.key).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let error =
                expect_error(response, StatusCode::TOO_MANY_REQUESTS, "key_suspended").await;
            let message = error["message"].as_str().unwrap();
            assert!(message.contains("reinstate"), "{error}");
            return index;
        }
        assert_eq!(response.status(), StatusCode::OK, "served until suspended");
    }
    panic!("the burst did not suspend the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursting_key_is_suspended_alerted_audited_and_reinstated() {
    let mut hook = receiver(0).await;
    let clock = ManualClock::new(tidepool_ledger::testing::T0_MS);
    let mut options = options_with(&hook.url);
    let state_clock: Arc<dyn tidepool_ledger::Clock> = clock.clone();
    options.clock = state_clock;
    options.leak_detection = LeakDetectionConfig {
        enabled: true,
        interval_ms: 60_000,
        ewma_alpha: 0.2,
        z_threshold: 6.0,
        min_history_intervals: 5,
        min_requests_per_interval: 10,
        keys_tracked_max: 1_000,
    };
    let app = sqlite_app(options).await;
    let setup = last_audit_seq(&app.ledger).await;

    let suspended_at = steady_then_burst(&app, &clock).await;
    assert!(suspended_at < 240, "within the burst's minute");

    // Every later request is refused, on any replica (the suspension is in the database).
    let response = chat(&app, &app.key).await;
    assert_eq!(response.headers()["x-should-retry"], "false");
    expect_error(response, StatusCode::TOO_MANY_REQUESTS, "key_suspended").await;
    let stored = app
        .ledger
        .key(&tidepool_core::KeyId(app.key_id.clone()))
        .await
        .unwrap();
    assert!(stored.suspended_at_ms.is_some());

    // The alert, signed.
    let got = hook.next().await;
    assert_eq!(got.event, "key_suspended");
    assert_eq!(got.body["data"]["key_id"], app.key_id.as_str());
    assert_eq!(got.body["data"]["tenant"], "acme");
    assert_eq!(hook.bad_signatures.load(Ordering::SeqCst), 0);

    // The audit entry, and a chain that verifies.
    let path = format!("/admin/audit?after={setup}&limit=10");
    let page = json(app.send(admin("GET", &path, None)).await).await;
    assert_eq!(page["chain_ok"], true, "{page}");
    let entries = page["data"].as_array().unwrap();
    let suspension = entries
        .iter()
        .find(|e| e["action"] == "key.suspend")
        .expect("an audit entry");
    assert_eq!(suspension["actor"], "system");
    assert_eq!(suspension["target"], format!("key:{}", app.key_id));
    assert!(
        suspension["request_id"].is_string(),
        "the request that tripped the detector: {suspension}"
    );
    assert_eq!(
        suspension["details"]["before"]["suspended_at_ms"],
        Value::Null
    );
    assert!(suspension["details"]["after"]["suspended_at_ms"].is_i64());

    // An operator reinstates it; the key works again and the reinstatement is audited.
    let path = format!("/admin/keys/{}/reinstate", app.key_id);
    let response = app.send(admin("POST", &path, None)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json(response).await["reinstated"], true);
    assert_eq!(chat(&app, &app.key).await.status(), StatusCode::OK);
    let page = json(
        app.send(admin("GET", &format!("/admin/audit?after={setup}"), None))
            .await,
    )
    .await;
    let actions: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["key.suspend", "key.reinstate"]);
    assert_eq!(page["chain_ok"], true);
    app.state.alerts().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_are_audited_and_tampering_shows_over_http() {
    let (app, url) = sqlite_app_at(StateOptions::new(Limits::default())).await;
    // The fixture's own key, credit and prices are audited too.
    let setup = last_audit_seq(&app.ledger).await;
    let response = app
        .send(admin(
            "POST",
            "/admin/keys",
            Some(json!({"tenant": "globex", "name": "ci"})),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let key_id = json(response).await["key_id"].as_str().unwrap().to_owned();
    let response = app
        .send(admin(
            "POST",
            "/admin/tenants/globex/credits",
            Some(json!({"amount": "5.00", "note": "trial"})),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = app
        .send(admin(
            "PUT",
            "/admin/budgets",
            Some(json!({"scope": "key", "key_id": key_id, "limit": "1.00"})),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = app
        .send(admin("DELETE", &format!("/admin/keys/{key_id}"), None))
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let path = format!("/admin/audit?after={setup}&limit=2");
    let page = json(app.send(admin("GET", &path, None)).await).await;
    assert_eq!(page["chain_ok"], true, "{page}");
    assert_eq!(page["next_after"], setup + 2);
    let path = format!("/admin/audit?after={}", setup + 2);
    let rest = json(app.send(admin("GET", &path, None)).await).await;
    let actions: Vec<String> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["data"].as_array().unwrap())
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        actions,
        vec!["key.create", "tenant.credit", "budget.set", "key.revoke"]
    );
    expect_before_and_after(&rest["data"]);
    expect_jsonl_export(&app, setup, &rest["data"][0]).await;
    let bad = app
        .send(admin("GET", "/admin/audit?format=csv", None))
        .await;
    expect_error(bad, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    let bad = app
        .send(admin("GET", "/admin/audit?limit=100000", None))
        .await;
    expect_error(bad, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    // A tenant's key is nobody here: the operator's endpoints do not exist for it.
    let tenant = app.get("/admin/audit").await;
    expect_error(tenant, StatusCode::NOT_FOUND, "not_found").await;

    // A direct edit of a stored entry breaks the chain, and the API says where.
    let verdict = app.ledger.verify_audit_chain(None).await.unwrap();
    assert!(verdict.is_ok());
    tamper_sqlite(&url, setup + 2).await;
    let page = json(app.send(admin("GET", "/admin/audit", None)).await).await;
    assert_eq!(page["chain_ok"], false);
    assert_eq!(page["first_broken_seq"], setup + 2);
}

/// The budget and revocation entries name the request that made them, and what they replaced.
fn expect_before_and_after(data: &Value) {
    let budget = &data[0];
    assert!(budget["request_id"].is_string(), "{budget}");
    assert_eq!(
        budget["details"]["before"]["limit_nanos"],
        Value::Null,
        "{budget}"
    );
    assert_eq!(
        budget["details"]["after"]["limit_nanos"], 1_000_000_000,
        "{budget}"
    );
    let revoke = &data[1];
    assert_eq!(
        revoke["details"]["before"]["revoked_at_ms"],
        Value::Null,
        "{revoke}"
    );
    assert!(
        revoke["details"]["after"]["revoked_at_ms"].is_i64(),
        "{revoke}"
    );
}

/// `GET /admin/audit?format=jsonl` after the fixture: the four admin entries as JSON lines, the
/// third (`budget`) the same object as in the JSON page.
async fn expect_jsonl_export(app: &App, setup: i64, budget: &Value) {
    let path = format!("/admin/audit?after={setup}&format=jsonl");
    let response = app.send(admin("GET", &path, None)).await;
    assert_eq!(response.status(), StatusCode::OK, "an export");
    assert_eq!(
        response.headers()["content-type"],
        "application/x-ndjson",
        "JSON lines"
    );
    let body = body_bytes(response).await;
    let lines: Vec<Value> = std::str::from_utf8(&body)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let seqs: Vec<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(
        seqs,
        (setup + 1..=setup + 4).collect::<Vec<_>>(),
        "the four admin entries, in order"
    );
    assert_eq!(lines[2], *budget, "the same object as the JSON page");
}

/// The sequence number of the newest audit entry (0: none).
async fn last_audit_seq(ledger: &Ledger) -> i64 {
    let entries = ledger
        .list_audit(0, tidepool_ledger::AUDIT_PAGE_LEN_MAX)
        .await
        .unwrap();
    entries.last().map_or(0, |e| e.seq)
}

/// Rewrites audit entry `seq`'s details through a connection of its own.
async fn tamper_sqlite(url: &str, seq: i64) {
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::query("UPDATE audit_log SET details = '{\"amount_nanos\":1}' WHERE seq = $1")
        .bind(seq)
        .execute(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_lost_is_sent_from_memory_while_the_database_is_down() {
    let mut hook = receiver(0).await;
    let cluster = ThrowawayPostgres::spawn().await;
    let db = TestDb::postgres_on(cluster.url()).await;
    let options = LedgerOptions {
        // Short, so each outbox write on the stopped database gives up quickly.
        acquire_timeout: Some(Duration::from_secs(1)),
        ..LedgerOptions::default()
    };
    let ledger = Ledger::connect_with(&db.url, options).await.unwrap();
    let app = App::on(ledger, None, options_with(&hook.url), |c| c).await;

    // The database goes away; the watch (`DatabaseWatch`, unit-tested) would emit this.
    let cluster = cluster.set_running(false).await;
    app.state.alerts().emit(AlertEvent::DatabaseLost {
        reason: "i/o error: connection refused".to_owned(),
    });
    let lost = hook.next().await;
    assert_eq!(lost.event, "database_lost", "sent while the outbox is down");
    assert!(
        app.ledger.outbox_counts().await.is_err(),
        "the database really is down"
    );

    // It comes back: later events go through the outbox again; nothing is sent twice.
    let _cluster = cluster.set_running(true).await;
    app.state
        .alerts()
        .emit(AlertEvent::DatabaseRecovered { down_ms: 1_000 });
    let recovered = hook.next().await;
    assert_eq!(recovered.event, "database_recovered");
    app.state.alerts().engine_restarted("sentinel", "last");
    let last = hook.next().await;
    assert_eq!(last.body["data"]["model"], "sentinel");
    assert!(hook.accepted.try_recv().is_err(), "nothing delivered twice");
    assert_eq!(hook.bad_signatures.load(Ordering::SeqCst), 0);
    app.state.alerts().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_reached_is_sent_once_per_budget_and_month() {
    let mut hook = receiver(0).await;
    let app = sqlite_app(options_with(&hook.url)).await;
    let key_id = tidepool_core::KeyId(app.key_id.clone());
    app.ledger
        .set_budget(
            &tidepool_ledger::BudgetScope::Key { key_id },
            Some(tidepool_core::Nanos(1)),
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let response = chat(&app, &app.key).await;
        expect_error(
            response,
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
        )
        .await;
    }
    let got = hook.next().await;
    assert_eq!(got.event, "budget_reached");
    assert_eq!(got.body["data"]["scope"], "key_budget");
    assert_eq!(got.body["data"]["key_id"], app.key_id.as_str());
    // Three refusals, one alert: the next thing the receiver gets is the sentinel.
    app.state.alerts().engine_restarted("sentinel", "last");
    let last = hook.next().await;
    assert_eq!(last.event, "engine_restarted");
    outbox_settles(&app.ledger, 2).await;
    assert!(
        hook.accepted.try_recv().is_err(),
        "no second budget_reached"
    );
    app.state.alerts().stop();
}
