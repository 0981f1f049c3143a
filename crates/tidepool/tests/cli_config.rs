//! The command line's configuration and admin behaviour, through the real binary:
//! `tidepool config check` (sources, errors, secrets), `TIDEPOOL_<SECTION>__<KEY>` overrides,
//! the warning for a missing config file, `keys create` on an unknown tenant, `rate-limits`
//! changing only what it is given, and flags offered only where they mean something. Each test
//! has its own directory and SQLite ledger; the process environment of the test is never changed
//! (each child gets its variables through `Command::env`).

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] fns fail loudly"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tidepool_core::RequestId;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
const PASSWORD: &str = "hunter2-not-for-logs";

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tidepool-cli-{}", RequestId::new()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn database_url(&self) -> String {
        format!("sqlite://{}", self.0.join("ledger.db").display())
    }

    /// `tidepool args…` in this directory, with only the `TIDEPOOL_*` variables given.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(BIN);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TIDEPOOL_") {
                command.env_remove(name);
            }
        }
        command
            .args(args)
            .current_dir(&self.0)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    /// As [`Self::run`], which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, &[]);
        assert!(
            out.status.success(),
            "tidepool {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The line of `output` that starts with `key = `.
fn line<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no `{key}` in:\n{output}"))
}

#[test]
fn config_check_shows_where_each_value_comes_from_and_no_secret() {
    let dir = TempDir::new();
    let config = dir.path().join("tidepool.toml");
    std::fs::write(&config, "[pool]\nttft_slo_ms = 4000\n").unwrap();
    let url = format!("postgres://tidepool:{PASSWORD}@127.0.0.1:5432/tidepool");
    let out = dir.run(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[
            ("TIDEPOOL_POOL__POLICY", "swap-lru"),
            ("TIDEPOOL_SERVER__DATABASE_URL", &url),
            ("TIDEPOOL_ROUTING__PROBE_AT_START", "false"),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(line(&stdout, "ttft_slo_ms").ends_with("# file"), "{stdout}");
    let policy = line(&stdout, "policy");
    assert!(policy.starts_with("policy = \"swap-lru\""), "{policy}");
    assert!(policy.ends_with("# env TIDEPOOL_POOL__POLICY"), "{policy}");
    assert!(line(&stdout, "probe_at_start").ends_with("# env TIDEPOOL_ROUTING__PROBE_AT_START"));
    assert!(
        line(&stdout, "tbt_slo_ms").ends_with("# default"),
        "{stdout}"
    );
    let database = line(&stdout, "database_url");
    assert!(
        database.contains("postgres://tidepool:***@127.0.0.1:5432/tidepool"),
        "{database}"
    );
    assert!(!stdout.contains(PASSWORD) && !text(&out.stderr).contains(PASSWORD));

    // The command-line variable wins over the config key, and is not printed either.
    let flag_url = format!("postgres://admin:{PASSWORD}@db/tp");
    let out = dir.run(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[
            ("TIDEPOOL_SERVER__DATABASE_URL", &url),
            ("TIDEPOOL_DATABASE_URL", &flag_url),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let database = line(&stdout, "database_url");
    assert!(
        database.contains("admin:***@db/tp") && database.ends_with("# flag --database-url"),
        "{database}"
    );
    assert!(!stdout.contains(PASSWORD) && !text(&out.stderr).contains(PASSWORD));
}

#[test]
fn config_check_lists_every_error_and_fails() {
    let dir = TempDir::new();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[pool]\nttft_slo_ms = 0\n\n[routing]\nbreaker_failures_max = 0\nhealth_timeout_ms = 0\n",
    )
    .unwrap();
    let out = dir.run(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    for expected in [
        "invalid config (3 errors)",
        "\n  pool.ttft_slo_ms: must be at least 1",
        "\n  routing.breaker_failures_max: must be at least 1",
        "\n  routing.health_timeout_ms: must be at least 1",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in:\n{stderr}");
    }
    // The effective configuration is still shown, to find the values in.
    assert!(line(&text(&out.stdout), "ttft_slo_ms").ends_with("# file"));

    // Variables that name no key or do not parse are errors too, all of them at once.
    let out = dir.run(
        &["config", "check"],
        &[
            ("TIDEPOOL_POOL__BOGUS", "1"),
            ("TIDEPOOL_LIMITS__REQUEST_TIMEOUT_MS", "soon"),
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("TIDEPOOL_POOL__BOGUS: no configuration key `pool.bogus`"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "TIDEPOOL_LIMITS__REQUEST_TIMEOUT_MS: `limits.request_timeout_ms`: expected an integer"
        ),
        "{stderr}"
    );
}

#[test]
fn running_without_a_config_file_says_so() {
    let dir = TempDir::new();
    let out = dir.run(&["config", "check"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no configuration file"), "{stderr}");
    assert!(stderr.contains("<built-in tidepool.toml>"), "{stderr}");
    let database = dir.path().join("tidepool.db");
    assert!(
        stderr.contains(&database.display().to_string()),
        "absolute database path in:\n{stderr}"
    );
    assert!(text(&out.stdout).starts_with("# Effective configuration: <built-in tidepool.toml>"));
}

#[test]
fn keys_create_needs_an_existing_tenant_unless_asked() {
    let dir = TempDir::new();
    let db = dir.database_url();
    let create = |extra: &[&str]| {
        let mut args = vec!["keys", "create", "--tenant", "acme", "--name", "laptop"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--database-url", &db]);
        dir.run(&args, &[])
    };
    let out = create(&[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unknown tenant `acme`"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !dir.ok(&["keys", "list", "--database-url", &db])
            .contains("acme")
    );
    assert!(create(&["--create-tenant"]).status.success());
    // Now it exists: no flag needed.
    let out = create(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    dir.ok(&["tenants", "create", "globex", "--database-url", &db]);
    let out = dir.run(
        &[
            "keys",
            "create",
            "--tenant",
            "globex",
            "--name",
            "ci",
            "--database-url",
            &db,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn rate_limits_change_only_what_is_given() {
    let dir = TempDir::new();
    let db = dir.database_url();
    let created = dir.ok(&[
        "keys",
        "create",
        "--tenant",
        "acme",
        "--create-tenant",
        "--name",
        "k",
        "--database-url",
        &db,
    ]);
    let key_id = created
        .split_whitespace()
        .skip_while(|w| *w != "key_id")
        .nth(1)
        .unwrap()
        .to_owned();
    let limits = |args: &[&str]| {
        let mut all = vec!["rate-limits"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--key-id", &key_id, "--database-url", &db]);
        dir.ok(&all).trim().to_owned()
    };
    assert_eq!(limits(&["show"]), "rpm unlimited  tpm unlimited");
    assert_eq!(limits(&["--rpm", "60"]), "rpm 60  tpm unlimited");
    assert_eq!(limits(&["--tpm", "1000"]), "rpm 60  tpm 1000");
    assert_eq!(limits(&["show"]), "rpm 60  tpm 1000");
    assert_eq!(limits(&["--clear-rpm"]), "rpm unlimited  tpm 1000");
    assert_eq!(
        limits(&["--rpm", "5", "--clear-tpm"]),
        "rpm 5  tpm unlimited"
    );
    // A project's limits are their own.
    let project = dir.ok(&[
        "rate-limits",
        "show",
        "--tenant",
        "acme",
        "--project",
        "default",
        "--database-url",
        &db,
    ]);
    assert_eq!(project.trim(), "rpm unlimited  tpm unlimited");
    // Nothing to change is an error, not a silent reset.
    let out = dir.run(
        &["rate-limits", "--key-id", &key_id, "--database-url", &db],
        &[],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nothing to change"));
    let out = dir.run(
        &[
            "rate-limits",
            "--rpm",
            "1",
            "--clear-rpm",
            "--key-id",
            &key_id,
            "--database-url",
            &db,
        ],
        &[],
    );
    assert!(!out.status.success(), "--rpm and --clear-rpm conflict");
    assert_eq!(limits(&["show"]), "rpm 5  tpm unlimited");
}

/// `tidepool sim --config F` runs the pool `tidepool serve` would run from F: the file's policy
/// and knobs with their environment overrides, a flag on top; a file `serve` would refuse is
/// refused with the same field names.
#[test]
fn sim_with_a_config_runs_the_servers_pool_knobs() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("trace.csv"),
        "timestamp,model,prompt_tokens,output_tokens\n0.0,a,64,16\n0.5,b,32,8\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pool.toml"),
        "[pool]\npolicy = \"swap-lru\"\ndecode_steps_min = 8\nprefill_cold_lazy = true\n",
    )
    .unwrap();
    let sim = |env: &[(&str, &str)]| {
        dir.run(
            &[
                "sim",
                "--config",
                "pool.toml",
                "--profile",
                "cpu-devvm",
                "--model-trace",
                "trace.csv",
                "--accelerators",
                "1",
                "--tbt-slo-ms",
                "900",
                "--out",
                "sim.json",
            ],
            env,
        )
    };
    let out = sim(&[("TIDEPOOL_POOL__TTFT_SLO_MS", "7000")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("swap-lru on 1 accelerators"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("sim.json")).unwrap()).unwrap();
    let knobs = &report["knobs"];
    assert_eq!(report["policy"], "swap-lru", "{report}");
    assert_eq!(knobs["decode_steps_min"], 8, "{knobs}");
    assert_eq!(knobs["prefill_cold_lazy"], true, "{knobs}");
    assert_eq!(knobs["ttft_slo_ms"], 7000, "{knobs}");
    assert_eq!(knobs["tbt_slo_ms"], 900, "{knobs}");
    assert_eq!(
        knobs["turn_quota_ms_max"], 4000,
        "the server's default: {knobs}"
    );
    let out = sim(&[("TIDEPOOL_POOL__DECODE_STEPS_MIN", "0")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("pool.decode_steps_min: must be at least 1"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn flags_are_offered_only_where_they_mean_something() {
    let dir = TempDir::new();
    for args in [
        &["sim", "--database-url", "sqlite://x.db"][..],
        &["plan", "--database-url", "sqlite://x.db"],
        &["bench", "--database-url", "sqlite://x.db"],
        &["models", "--database-url", "sqlite://x.db"],
        &["--database-url", "sqlite://x.db", "keys", "list"],
        &["backends", "--config", "x.toml"],
    ] {
        let out = dir.run(args, &[]);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            text(&out.stderr).contains("unexpected argument"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // No secret in any command's --help, even with every secret variable set.
    let secrets = [
        (
            "TIDEPOOL_DATABASE_URL",
            format!("postgres://u:{PASSWORD}@h/db"),
        ),
        ("TIDEPOOL_ADMIN_TOKEN", PASSWORD.to_owned()),
        ("TIDEPOOL_API_KEY", PASSWORD.to_owned()),
    ];
    let secrets: Vec<(&str, &str)> = secrets.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for command in [
        &[][..],
        &["serve"],
        &["worker"],
        &["backends"],
        &["keys"],
        &["keys", "create"],
        &["keys", "list"],
        &["models"],
        &["config", "check"],
        &["tenants", "create"],
        &["projects", "list"],
        &["credit", "add"],
        &["budgets", "set"],
        &["rate-limits"],
        &["rate-limits", "show"],
        &["usage"],
        &["statement"],
        &["bench"],
        &["sim"],
        &["plan"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let out = dir.run(&args, &secrets);
        let help = text(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(
            !help.contains(PASSWORD),
            "{args:?} --help shows a secret:\n{help}"
        );
    }
    let help = dir.ok(&["keys", "list", "--help"]);
    assert!(help.contains("--database-url") && help.contains("--config"));
    let help = dir.ok(&["models", "--help"]);
    assert!(help.contains("--config") && !help.contains("--database-url"));
}
