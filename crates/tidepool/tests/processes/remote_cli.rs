//! The administering CLI over a running server's HTTP admin API (`--url`, the admin token from
//! `TIDEPOOL_ADMIN_TOKEN`): no database credentials, the same checks and audit log as the
//! console.

use serde_json::json;

use crate::harness::{ADMIN_TOKEN, Server, TempDir, chat, fake_worker_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_administers_a_running_server_over_http() {
    let root = TempDir::new();
    let mut server = Server::new(root.path(), "gateway");
    server.write_config(fake_worker_config());
    server.spawn(&["serve"]);
    server.ready().await;
    let url = server.base();
    let admin = [("TIDEPOOL_ADMIN_TOKEN", ADMIN_TOKEN)];
    let remote = |args: &[&str]| server.run_with_env(&[args, &["--url", &url]].concat(), &admin);

    remote(&["tenants", "create", "acme"]);
    let created = remote(&[
        "keys",
        "create",
        "--tenant",
        "acme",
        "--name",
        "ops",
        "--role",
        "tenant-admin",
    ]);
    let secret = created.lines().next().unwrap().trim().to_owned();
    assert!(secret.starts_with("tp-"), "{created}");
    assert!(created.contains("role tenant-admin"), "{created}");
    remote(&["credit", "add", "--tenant", "acme", "7.5"]);
    let shown = remote(&["tenants", "show", "acme"]);
    assert!(shown.contains("balance 7.5"), "{shown}");
    let listed = remote(&["keys", "list", "--tenant", "acme"]);
    assert!(
        listed.contains("ops") && listed.contains("tenant-admin"),
        "{listed}"
    );

    // The key serves requests; revoked over HTTP, it is refused at once.
    let client = reqwest::Client::new();
    let body =
        json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, value, _) = chat(&client, &url, &secret, &body).await;
    assert_eq!(status, 200, "{value}");
    let key_id = listed
        .lines()
        .find(|l| l.contains("ops"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    remote(&["keys", "revoke", &key_id]);
    let (status, _, _) = chat(&client, &url, &secret, &body).await;
    assert_eq!(status, 401);

    // Every change is in the audit log, and the chain verifies.
    let audit = remote(&["audit", "list"]);
    for action in ["tenant.create", "key.create", "tenant.credit", "key.revoke"] {
        assert!(audit.contains(action), "{action} missing:\n{audit}");
    }
    assert!(remote(&["audit", "verify"]).contains("audit chain ok"));

    // Without the token, or with a wrong one, nothing happens.
    let refused = !server.succeeds_with_env(
        &["tenants", "create", "evil", "--url", &url],
        &[("TIDEPOOL_ADMIN_TOKEN", "wrong")],
    );
    assert!(refused, "a wrong admin token is refused");
}
