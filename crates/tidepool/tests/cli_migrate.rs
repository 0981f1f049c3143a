//! `tidepool migrate` and `[server] migrate_on_start = false` through the real binary. On a
//! fresh SQLite ledger: `migrate --check` fails naming every missing migration; a server started
//! without migrations listens anyway, `/readyz` is 503 naming the schema and model requests get
//! 503 `unavailable` with `Retry-After`; `tidepool migrate` applies and prints the migrations;
//! the running server notices, turns ready and serves; `--check` then passes and a second
//! `migrate` applies nothing. On one fresh PostgreSQL database: four `tidepool migrate`
//! processes at once all succeed and leave the schema current (sqlx's advisory lock).

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns fail loudly"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tidepool_core::RequestId;
use tidepool_ledger::testing::Kind;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
/// Between two looks at a server that is starting or turning ready.
const POLL: Duration = Duration::from_millis(50);
/// `tidepool migrate` processes started at once on one database.
const MIGRATORS: usize = 4;

/// What `migrate` prints once every migration of this build is applied (counted from the
/// ledger's migration files, so a new migration needs no edit here).
fn schema_current() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tidepool-ledger/migrations/sqlite");
    let migrations = std::fs::read_dir(dir)
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|ext| ext == "sql")
        })
        .count();
    format!("schema current ({migrations} migrations)")
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tidepool-migrate-{}", RequestId::new()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
}

/// The binary with only the `TIDEPOOL_*` variables the test gives.
fn tidepool(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TIDEPOOL_") {
            command.env_remove(name);
        }
    }
    command.args(args).current_dir(dir).env("RUST_LOG", "warn");
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn succeeded(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A `tidepool serve` child, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
async fn a_server_without_migrations_waits_for_tidepool_migrate() {
    let dir = TempDir::new();
    let port = free_port();
    let config = dir.0.join("tidepool.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndatabase_url = \"sqlite://{}\"\n\
             migrate_on_start = false\n\n[[models]]\nid = \"chat\"\nkind = \"chat\"\n\
             backend = \"fake\"\n",
            dir.0.join("ledger.db").display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let check = tidepool(&dir.0, &["migrate", "--check", "--config", config])
        .output()
        .unwrap();
    assert!(!check.status.success(), "the fresh schema is behind");
    let error = text(&check.stderr);
    assert!(error.contains("behind: missing 20261123000001"), "{error}");
    assert!(error.contains("20261123000002"), "{error}");
    assert!(error.contains("run `tidepool migrate`"), "{error}");

    let log = std::fs::File::create(dir.0.join("server.log")).unwrap();
    let mut server = Server(
        tidepool(&dir.0, &["serve", "--config", config])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    // Up (healthz) although the schema is behind.
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.0.join("server.log")).unwrap_or_default();
            panic!("serve exited with {status}:\n{log}");
        }
        if client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "not_ready");
    assert!(
        body["checks"]["schema"]
            .as_str()
            .unwrap()
            .starts_with("behind: missing"),
        "{body}"
    );
    let chat =
        serde_json::json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]});
    let refused = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("tp-unknown")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");

    let migrated = tidepool(&dir.0, &["migrate", "--config", config])
        .output()
        .unwrap();
    let out = succeeded(&migrated, "tidepool migrate");
    assert!(out.contains("applied 20261123000001 (keys usage)"), "{out}");
    assert!(out.contains("applied 20261123000002 (billing)"), "{out}");
    assert!(out.contains(&schema_current()), "{out}");

    // The server notices on its own.
    loop {
        let response = client.get(format!("{base}/readyz")).send().await.unwrap();
        if response.status() == 200 {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["checks"]["startup"], "ok", "{body}");
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let created = tidepool(
        &dir.0,
        &[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--create-tenant",
            "--name",
            "k",
            "--config",
            config,
        ],
    )
    .output()
    .unwrap();
    let out = succeeded(&created, "keys create");
    let key = out
        .split_whitespace()
        .find(|w| w.starts_with("tp-"))
        .unwrap()
        .to_owned();
    let credit = tidepool(
        &dir.0,
        &[
            "credit", "add", "--tenant", "acme", "10", "--config", config,
        ],
    )
    .output()
    .unwrap();
    succeeded(&credit, "credit add");
    let served = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);

    let check = tidepool(&dir.0, &["migrate", "--check", "--config", config])
        .output()
        .unwrap();
    assert!(
        succeeded(&check, "migrate --check").contains(&schema_current()),
        "{}",
        text(&check.stdout)
    );
    let again = tidepool(&dir.0, &["migrate", "--config", config])
        .output()
        .unwrap();
    let out = succeeded(&again, "second migrate");
    assert!(!out.contains("applied"), "nothing left to apply: {out}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrate_processes_on_one_postgres_database_all_succeed() {
    tidepool_ledger::testing::run(Kind::Postgres, |db| async move {
        let dir = TempDir::new();
        let migrators: Vec<Child> = (0..MIGRATORS)
            .map(|_| {
                tidepool(&dir.0, &["migrate", "--database-url", &db.url])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut applied = 0;
        for child in migrators {
            let output = child.wait_with_output().unwrap();
            let out = succeeded(&output, "concurrent tidepool migrate");
            assert!(out.contains(&schema_current()), "{out}");
            applied += out.matches("applied ").count();
        }
        // Each reports what was missing when it looked; at least one saw both missing.
        assert!(applied >= 2, "{applied}");
        let status = tidepool_ledger::schema_status(&db.url).await.unwrap();
        assert!(status.is_current(), "{status}");
        let check = tidepool(&dir.0, &["migrate", "--check", "--database-url", &db.url])
            .output()
            .unwrap();
        succeeded(&check, "migrate --check");
    })
    .await;
}
