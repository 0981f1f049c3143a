//! The process harness: a `tidepool` binary started in its own directory with its own config,
//! on loopback or on a host of a [`crate::multihost`] network (a network namespace).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tidepool_core::RequestId;
use tidepool_ledger::{Ledger, LedgerOptions, UsageEntry};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// A fresh directory under the system temp dir, removed on drop (the crate has no `tempfile`).
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tidepool-processes-{}", RequestId::new()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
}

/// The admin token every server these tests start is given (`/metrics`, `/v1/backends` and
/// `/admin/*` are the operator's).
pub(crate) const ADMIN_TOKEN: &str = "process-tests-admin-token";

pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub(crate) fn models_dir() -> PathBuf {
    tidepool_core::config::default_models_dir()
}

/// One `tidepool` process with its own directory and config: by default on loopback with its
/// own SQLite ledger; [`Server::on_host`] puts it on a network namespace's address.
pub(crate) struct Server {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) database_url: String,
    /// The network namespace the process runs in (`ip netns exec`), if any.
    pub(crate) netns: Option<String>,
    child: Option<Child>,
    pub(crate) env: Vec<(String, String)>,
}

impl Server {
    pub(crate) fn new(root: &Path, name: &str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let database_url = format!("sqlite://{}", dir.join("tidepool.db").display());
        Self {
            name: name.to_owned(),
            dir,
            host: "127.0.0.1".to_owned(),
            port: free_port(),
            database_url,
            netns: None,
            child: None,
            env: Vec::new(),
        }
    }

    /// A server listening on `ip:8080` inside network namespace `netns` (each namespace has
    /// its own ports), on the ledger at `database_url`.
    pub(crate) fn on_host(
        root: &Path,
        name: &str,
        netns: &str,
        ip: &str,
        database_url: &str,
    ) -> Self {
        let mut server = Self::new(root, name);
        ip.clone_into(&mut server.host);
        server.port = 8080;
        server.netns = Some(netns.to_owned());
        database_url.clone_into(&mut server.database_url);
        server
    }

    pub(crate) fn base(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// `tidepool args… --database-url <this server's ledger>`.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        self.run(&[args, &["--database-url", &self.database_url]].concat())
    }

    /// Whether `tidepool args…` exits 0.
    pub(crate) fn succeeds(&self, args: &[&str]) -> bool {
        self.succeeds_with_env(args, &[])
    }

    /// Whether `tidepool args…` with extra environment variables exits 0.
    pub(crate) fn succeeds_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> bool {
        Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(&self.dir)
            .output()
            .unwrap()
            .status
            .success()
    }

    pub(crate) fn run(&self, args: &[&str]) -> String {
        self.run_with_env(args, &[])
    }

    /// `tidepool args…` with extra environment variables; its stdout (it must succeed).
    pub(crate) fn run_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(&self.dir)
            .env("TIDEPOOL_MODELS_DIR", models_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tidepool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A new API key of `tenant` on this server's ledger, with 100 units of credit.
    pub(crate) fn key(&self, tenant: &str) -> String {
        let out = self.cli(&[
            "keys",
            "create",
            "--tenant",
            tenant,
            "--create-tenant",
            "--name",
            "t",
        ]);
        let key = out
            .split_whitespace()
            .find(|w| w.starts_with("tp-"))
            .unwrap()
            .to_owned();
        self.cli(&["credit", "add", "--tenant", tenant, "100"]);
        key
    }

    pub(crate) fn write_config(&self, body: &str) -> PathBuf {
        let path = self.dir.join("tidepool.toml");
        let text = format!(
            "[server]\nlisten = \"{}:{}\"\ndatabase_url = \"{}\"\n{body}",
            self.host, self.port, self.database_url
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs the binary with `args` on this server's config; stdout and stderr go to a log.
    pub(crate) fn spawn(&mut self, args: &[&str]) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let mut command = match &self.netns {
            Some(netns) => {
                // `ip netns exec` execs the binary: the child's pid is the server's.
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, BIN]);
                command
            }
            None => Command::new(BIN),
        };
        let child = command
            .args(args)
            .args(["--config", self.dir.join("tidepool.toml").to_str().unwrap()])
            .current_dir(&self.dir)
            .env("TIDEPOOL_MODELS_DIR", models_dir())
            .env("RUST_LOG", "info")
            .env("TIDEPOOL_ADMIN_TOKEN", ADMIN_TOKEN)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Waits until `/healthz` answers; fails if the process exits first.
    pub(crate) async fn ready(&mut self) {
        self.ready_on("/healthz").await;
    }

    /// Waits until `path` answers 2xx; fails if the process exits first.
    pub(crate) async fn ready_on(&mut self, path: &str) {
        let client = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited with {status}:\n{}", self.name, self.log());
            }
            let url = format!("{}{path}", self.base());
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for the process to exit and returns its log (for start-up errors).
    pub(crate) fn exit_log(&mut self) -> (bool, String) {
        let status = self.child.as_mut().unwrap().wait().unwrap();
        (status.success(), self.log())
    }

    /// SIGKILL: no shutdown, no drain.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Chat completions served so far, from this server's own `/metrics`.
    pub(crate) async fn chat_requests_seen(&self) -> u64 {
        let text = reqwest::Client::new()
            .get(format!("{}/metrics", self.base()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with("tidepool_requests_total")
                    && l.contains("route=\"/v1/chat/completions\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    pub(crate) async fn usage_entry(&self, request_id: &str) -> UsageEntry {
        let ledger = Ledger::connect_with(
            &self.database_url,
            LedgerOptions {
                replica_id: "test-reader".to_owned(),
                ..LedgerOptions::default()
            },
        )
        .await
        .unwrap();
        let id = RequestId::parse(request_id).unwrap();
        loop {
            if let Some(entry) = ledger.usage_entry(id).await.unwrap() {
                return entry;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn fake_worker_config() -> &'static str {
    "[billing]\nenforce = false\n\n[[models]]\nid = \"chat\"\nkind = \"chat\"\nbackend = \"fake\"\nfake_decode_step_us = 2000\n"
}

/// Starts a fake-engine worker in `region`; returns it and its API key.
pub(crate) async fn fake_worker(
    root: &Path,
    name: &str,
    region: &str,
    config: &str,
) -> (Server, String) {
    let mut worker = Server::new(root, name);
    worker.write_config(config);
    let key = worker.key("gateway");
    worker.spawn(&[
        "worker",
        "--region",
        region,
        "--zone",
        &format!("{region}-a"),
    ]);
    worker.ready().await;
    (worker, key)
}

pub(crate) fn backend_toml(
    id: &str,
    kind: &str,
    worker: &Server,
    region: &str,
    key_file: &Path,
    extra: &str,
) -> String {
    format!(
        "[[backends]]\nid = \"{id}\"\nkind = \"{kind}\"\nurl = \"{}\"\nregion = \"{region}\"\nzone = \"{region}-a\"\napi_key_file = \"{}\"\nmodels = [\"chat\"]\n{extra}\n",
        worker.base(),
        key_file.display()
    )
}

pub(crate) fn write_key(root: &Path, name: &str, key: &str) -> PathBuf {
    let path = root.join(format!("{name}.key"));
    let mut file = std::fs::File::create(&path).unwrap();
    writeln!(file, "{key}").unwrap();
    path
}

pub(crate) const GATEWAY_MODEL: &str = "[[models]]\nid = \"chat\"\nkind = \"chat\"\nbackend = \"remote\"\nprice_input_per_mtok = 1_000_000_000\nprice_output_per_mtok = 2_000_000_000\n\n";

pub(crate) async fn chat(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &Value,
) -> (u16, Value, String) {
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value, request_id)
}

/// The `data:` payloads of an SSE body.
pub(crate) fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// How many content chunks (non-empty `delta.content`) an SSE body carries: the completion
/// tokens its client received.
pub(crate) fn content_chunks(text: &str) -> usize {
    data_lines(text)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count()
}
