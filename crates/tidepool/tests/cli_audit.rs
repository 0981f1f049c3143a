//! `tidepool audit` through the real binary, on a fresh SQLite ledger with a checkpoint key in
//! the environment: the admin commands audit their changes (checkpointed every two entries
//! here); `audit verify` passes and prints the latest checkpoint to keep; `audit export` and
//! `audit list --jsonl` write JSON lines; after an entry is edited in the database, `audit
//! verify` exits non-zero naming that entry; without the key it says the signatures went
//! unchecked; `--expect-head` with a hash the log no longer has fails.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns fail loudly"
)]
#![expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::Connection as _;
use tidepool_core::RequestId;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
/// 32 bytes: the shortest key accepted.
const KEY: &str = "0123456789abcdef0123456789abcdef";

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tidepool-audit-{}", RequestId::new()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
}

/// The binary on `url`, with the checkpoint key when `key` and only the `TIDEPOOL_*` variables
/// the test gives.
fn tidepool(dir: &Path, url: &str, key: bool, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TIDEPOOL_") {
            command.env_remove(name);
        }
    }
    if key {
        command.env("TIDEPOOL_AUDIT_KEY", KEY);
    }
    command
        .args(args)
        .args(["--database-url", url])
        .current_dir(dir)
        .env("RUST_LOG", "error")
        .env("TIDEPOOL_AUDIT__CHECKPOINT_EVERY_ENTRIES", "2")
        .output()
        .unwrap()
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

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_first_bad_entry_and_export_writes_json_lines() {
    let dir = TempDir::new();
    let url = format!("sqlite://{}", dir.0.join("ledger.db").display());
    let run = |key: bool, args: &[&str]| tidepool(&dir.0, &url, key, args);

    succeeded(&run(true, &["tenants", "create", "acme"]), "tenants create");
    succeeded(
        &run(true, &["credit", "add", "--tenant", "acme", "10"]),
        "credit add",
    );
    let out = succeeded(
        &run(true, &["keys", "create", "--tenant", "acme", "--name", "k"]),
        "keys create",
    );
    let key_id = out
        .lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap()
        .to_owned();
    succeeded(
        &run(true, &["budgets", "set", "--key-id", &key_id, "5"]),
        "budgets set",
    );
    succeeded(&run(true, &["keys", "revoke", &key_id]), "keys revoke");

    let out = succeeded(&run(true, &["audit", "verify"]), "audit verify");
    assert!(
        out.contains("audit chain ok: 5 entries, 2 checkpoints (signatures checked)"),
        "{out}"
    );
    let latest = out
        .lines()
        .find_map(|line| line.strip_prefix("latest checkpoint: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert!(latest.starts_with("4:"), "{latest}");

    let export = json_lines(&succeeded(&run(true, &["audit", "export"]), "audit export"));
    let actions: Vec<&str> = export
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "tenant.create",
            "tenant.credit",
            "key.create",
            "budget.set",
            "key.revoke"
        ]
    );
    assert!(export.iter().all(|e| e["actor"] == "admin"));
    assert_eq!(
        export[1]["details"]["after"]["balance_nanos"],
        10_000_000_000_i64
    );
    let page = json_lines(&succeeded(
        &run(
            true,
            &["audit", "list", "--jsonl", "--after", "2", "--limit", "2"],
        ),
        "audit list --jsonl",
    ));
    assert_eq!(page, export[2..4].to_vec());
    let expect_head = ["audit", "verify", "--expect-head", latest.as_str()];
    succeeded(&run(true, &expect_head), "verify --expect-head");

    // Without the key the chain still verifies, and the output says what was not checked.
    let out = succeeded(&run(false, &["audit", "verify"]), "audit verify, no key");
    assert!(
        out.contains("signatures NOT checked: no checkpoint key (set TIDEPOOL_AUDIT_KEY)"),
        "{out}"
    );

    // Entry 3 edited in the database.
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("UPDATE audit_log SET details = '{\"name\":\"other\"}' WHERE seq = 3")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let broken = run(true, &["audit", "verify"]);
    assert!(!broken.status.success(), "exits non-zero");
    let out = text(&broken.stdout);
    assert!(out.starts_with("audit chain BROKEN at entry 3: "), "{out}");
    assert!(
        text(&broken.stderr).contains("entry 3"),
        "{}",
        text(&broken.stderr)
    );
    let bad_anchor = ["audit", "verify", "--expect-head", "4:xyz"];
    assert!(
        !run(true, &bad_anchor).status.success(),
        "a malformed anchor"
    );
}
