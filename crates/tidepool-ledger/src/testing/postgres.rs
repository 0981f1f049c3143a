//! Throwaway PostgreSQL clusters for tests: `initdb` into a directory of their own (trust auth,
//! superuser `postgres`), started with `pg_ctl` on a free TCP port, their unix socket in that
//! directory, and stopped again on drop. A test can stop a cluster and start it again on the
//! same data and port (the database going away and coming back).
//!
//! PostgreSQL refuses to run as root: when the tests run as root, `initdb`, `pg_ctl` and the
//! server run as the `postgres` user (`runuser -u postgres --`, the cluster's directory owned by
//! it), which Debian's `postgresql` package creates. The binaries are looked up in `PATH`, then in
//! the newest `/usr/lib/postgresql/<major>/bin` (where Debian installs them, outside `PATH`).
//!
//! [`shared_cluster_url`] is the one cluster all test processes of a run share (nextest runs each
//! test in its own process): a directory under the system temp dir keyed by uid, guarded by an OS
//! file lock; the first process creates and starts the cluster and writes its port, later ones
//! reuse it while it answers. It outlives the processes; `scripts/test-postgres.sh stop` (run at
//! the end of `make rust-test`) stops it and removes its directory.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Where Debian installs each PostgreSQL major version's server binaries.
const DEBIAN_POSTGRES_LIB: &str = "/usr/lib/postgresql";
/// How long `pg_ctl start -w` waits for the server to accept connections, in seconds.
const START_WAIT_S_MAX: u32 = 60;
/// Free ports tried when another process takes the probed port before the server binds it.
const START_ATTEMPTS_MAX: u32 = 5;
/// How long the check that a started cluster accepts TCP connections may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The unprivileged user the server runs as when the tests run as root.
const SERVER_USER: &str = "postgres";
/// The port of a cluster in a network namespace of its own (nothing else listens there).
const NETNS_PORT: u16 = 5432;
/// Connections the cluster accepts: two test processes at once, each with a few ledger pools
/// of 10 connections (two replicas, concurrent `connect`s), stay well below it.
const CONNECTIONS_MAX: u32 = 300;
/// The shared cluster's directory name under the system temp dir (followed by `-<uid>`).
const SHARED_PREFIX: &str = "tidepool-test-postgres";
/// Lines of the server log quoted in a start-up error.
const LOG_TAIL_LINES: usize = 20;

/// `initdb` and `pg_ctl` of one PostgreSQL installation.
#[derive(Debug, Clone)]
struct Binaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

/// One throwaway cluster. Dropping it stops the server (`pg_ctl stop -m immediate`) and deletes
/// its directory.
#[derive(Debug)]
pub struct ThrowawayPostgres {
    binaries: Binaries,
    /// Owned by the server's user: `data/`, the log, the unix socket.
    cluster_dir: PathBuf,
    listen: IpAddr,
    port: u16,
    /// `Some("postgres")` when the tests run as root.
    run_as: Option<&'static str>,
    /// The network namespace the server runs in (`ip netns exec`), if any.
    netns: Option<String>,
    running: bool,
    /// The private cluster's directory, deleted on drop; `None` for the shared cluster, which
    /// outlives this process and is not stopped on drop.
    dir: Option<tempfile::TempDir>,
}

/// The blocking calls of [`ThrowawayPostgres`] (`initdb`, `pg_ctl`) from async tests: run on
/// tokio's blocking pool, a failure fails the test with the tool's output.
impl ThrowawayPostgres {
    /// [`ThrowawayPostgres::new`], from async code.
    pub async fn spawn() -> Self {
        tokio::task::spawn_blocking(Self::new)
            .await
            .unwrap_or_else(|error| panic!("throwaway PostgreSQL: {error}"))
            .unwrap_or_else(|error| panic!("throwaway PostgreSQL: {error}"))
    }

    /// [`ThrowawayPostgres::start`] (`running`) or [`ThrowawayPostgres::stop`], from async code.
    pub async fn set_running(mut self, running: bool) -> Self {
        tokio::task::spawn_blocking(move || {
            let done = if running { self.start() } else { self.stop() };
            done.unwrap_or_else(|error| panic!("pg_ctl: {error}"));
            self
        })
        .await
        .unwrap_or_else(|error| panic!("pg_ctl: {error}"))
    }
}

impl ThrowawayPostgres {
    /// A new cluster listening on 127.0.0.1.
    pub fn new() -> io::Result<Self> {
        Self::new_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// A new cluster listening on `listen` (any local address; a non-loopback one accepts every
    /// client of the network without a password, as this is a throwaway test cluster).
    pub fn new_on(listen: IpAddr) -> io::Result<Self> {
        Self::create(listen, None)
    }

    /// A new cluster inside network namespace `netns` (made with `ip netns add`), listening on
    /// `listen`, one of that namespace's addresses, on port 5432 (the namespace has its own
    /// ports): the database host of a multi-host test.
    pub fn new_in_netns(netns: &str, listen: IpAddr) -> io::Result<Self> {
        Self::create(listen, Some(netns.to_owned()))
    }

    fn create(listen: IpAddr, netns: Option<String>) -> io::Result<Self> {
        let binaries = find_binaries()?;
        let dir = tempfile::Builder::new().prefix("tidepool-pg-").tempdir()?;
        let run_as = server_user(current_uid()?)?;
        let cluster_dir = dir.path().join("cluster");
        let mut cluster = Self {
            binaries,
            cluster_dir,
            listen,
            port: 0,
            run_as,
            netns,
            running: false,
            dir: Some(dir),
        };
        cluster.init()?;
        if cluster.netns.is_some() {
            cluster.port = NETNS_PORT;
            cluster.pg_ctl_start()?;
        } else {
            cluster.start_on_a_free_port()?;
        }
        Ok(cluster)
    }

    /// The superuser's URL of the `postgres` database (`postgres://postgres@127.0.0.1:PORT/postgres`).
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The superuser's URL of `database` on this cluster.
    pub fn url_for(&self, database: &str) -> String {
        let host = match self.listen {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        format!("postgres://postgres@{host}:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn listen(&self) -> IpAddr {
        self.listen
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Stops the server (`pg_ctl stop -m fast`: clients are disconnected, nothing is lost); the
    /// data stays for [`ThrowawayPostgres::start`].
    pub fn stop(&mut self) -> io::Result<()> {
        if self.running {
            self.pg_ctl_stop("fast")?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts the server again on the same data and port, and waits until it accepts
    /// connections.
    pub fn start(&mut self) -> io::Result<()> {
        if !self.running {
            self.pg_ctl_start()?;
        }
        Ok(())
    }

    /// `initdb` into `cluster_dir/data`, then the settings: socket in `cluster_dir`, no fsync
    /// (throwaway data), more connections, and `trust` for any address when listening beyond
    /// loopback.
    fn init(&mut self) -> io::Result<()> {
        fs::create_dir_all(&self.cluster_dir)?;
        if let Some(user) = self.run_as {
            // The server's user reaches its directory through ours.
            if let Some(parent) = self.cluster_dir.parent() {
                fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
            }
            let owner = format!("{user}:");
            run(Command::new("chown")
                .arg("-R")
                .arg(owner)
                .arg(&self.cluster_dir))?;
        }
        let data = self.data_dir();
        let mut initdb = self.command(&self.binaries.initdb);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8"])
            .args(["--no-locale", "--no-sync"]);
        run(&mut initdb)?;
        let socket_dir = self.cluster_dir.to_string_lossy().replace('\'', "''");
        let mut settings = format!(
            "\n# tidepool test cluster\nlisten_addresses = '{}'\nunix_socket_directories = \
             '{socket_dir}'\nmax_connections = {CONNECTIONS_MAX}\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\n",
            self.listen
        );
        append(&data.join("postgresql.conf"), &settings)?;
        if !self.listen.is_loopback() {
            settings.clear();
            settings.push_str("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n");
            append(&data.join("pg_hba.conf"), &settings)?;
        }
        Ok(())
    }

    /// Starts on a port that was free a moment ago; another process may take it first, so a
    /// failed start is retried on another port.
    fn start_on_a_free_port(&mut self) -> io::Result<()> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS_MAX {
            self.port = free_port(self.listen)?;
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("PostgreSQL did not start")))
    }

    fn pg_ctl_start(&mut self) -> io::Result<()> {
        let log = self.log_file();
        let mut pg_ctl = self.command(&self.binaries.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", &START_WAIT_S_MAX.to_string()])
            .args(["-o", &format!("-p {}", self.port)])
            .arg("start");
        if let Err(error) = run(&mut pg_ctl) {
            return Err(io::Error::other(format!(
                "{error}\nlast lines of {}:\n{}",
                log.display(),
                log_tail(&log)
            )));
        }
        // `-w` waited for the server to be ready; check it is reachable where the URL points.
        TcpStream::connect_timeout(&SocketAddr::new(self.listen, self.port), CONNECT_TIMEOUT)
            .map_err(|error| {
                io::Error::other(format!(
                    "PostgreSQL started but {}:{} does not accept connections: {error}",
                    self.listen, self.port
                ))
            })?;
        self.running = true;
        Ok(())
    }

    fn pg_ctl_stop(&self, mode: &str) -> io::Result<()> {
        let mut pg_ctl = self.command(&self.binaries.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "stop"]);
        run(&mut pg_ctl).map(drop)
    }

    fn data_dir(&self) -> PathBuf {
        self.cluster_dir.join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.cluster_dir.join("postgres.log")
    }

    /// `program`, run as the server's user when the tests run as root, inside the cluster's
    /// network namespace if it has one.
    fn command(&self, program: &Path) -> Command {
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]);
                command
            }
            None if self.run_as.is_some() => Command::new("runuser"),
            None => return Command::new(program),
        };
        if let Some(user) = self.run_as {
            if self.netns.is_some() {
                command.arg("runuser");
            }
            command.args(["-u", user, "--"]);
        }
        command.arg(program);
        command
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        if self.running && self.dir.is_some() {
            // Nothing to keep: the fastest stop. An error leaves a server whose directory is
            // deleted next; it exits on its own when it notices.
            drop(self.pg_ctl_stop("immediate"));
        }
    }
}

/// The URL of the cluster every test process of this run shares, starting it if none answers
/// (see the module docs). Blocking: call it through `spawn_blocking` from async code.
pub fn shared_cluster_url() -> io::Result<String> {
    let uid = current_uid()?;
    let base = shared_dir(uid);
    let lock_path = base.with_extension("lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)?;
    check_owner(&lock_path, uid)?;
    // Released when `lock` closes, also if this process dies while holding it.
    lock.lock()?;
    let binaries = find_binaries()?;
    let run_as = server_user(uid)?;
    if base.exists() {
        check_owner(&base, uid)?;
        if let Some(port) = read_port(&base) {
            let cluster = ThrowawayPostgres {
                binaries: binaries.clone(),
                cluster_dir: base.join("cluster"),
                listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
                run_as,
                netns: None,
                running: true,
                dir: None,
            };
            if answers(&cluster) {
                return Ok(cluster.url());
            }
            // Left by an earlier run that was not stopped (or was killed): start afresh.
            drop(cluster.pg_ctl_stop("immediate"));
        }
        fs::remove_dir_all(&base)?;
    }
    fs::create_dir(&base)?;
    let mut cluster = ThrowawayPostgres {
        binaries,
        cluster_dir: base.join("cluster"),
        listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 0,
        run_as,
        netns: None,
        running: false,
        dir: None,
    };
    cluster.init()?;
    cluster.start_on_a_free_port()?;
    // What `scripts/test-postgres.sh stop` needs, one value per file (never sourced).
    fs::write(
        base.join("pg_ctl"),
        cluster.binaries.pg_ctl.as_os_str().as_encoded_bytes(),
    )?;
    fs::write(base.join("run_as"), run_as.unwrap_or_default())?;
    fs::write(base.join("port"), cluster.port.to_string())?;
    Ok(cluster.url())
}

/// `<temp dir>/tidepool-test-postgres-<uid>`.
pub fn shared_dir(uid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("{SHARED_PREFIX}-{uid}"))
}

/// The running shared cluster answers: its server is up (`pg_ctl status`) and its port accepts
/// connections.
fn answers(cluster: &ThrowawayPostgres) -> bool {
    let mut status = cluster.command(&cluster.binaries.pg_ctl);
    status.arg("-D").arg(cluster.data_dir()).arg("status");
    run(&mut status).is_ok()
        && TcpStream::connect_timeout(
            &SocketAddr::new(cluster.listen, cluster.port),
            CONNECT_TIMEOUT,
        )
        .is_ok()
}

fn read_port(base: &Path) -> Option<u16> {
    fs::read_to_string(base.join("port"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A shared path in the world-writable temp dir is trusted only if this user owns it.
fn check_owner(path: &Path, uid: u32) -> io::Result<()> {
    let owner = fs::metadata(path)?.uid();
    if owner == uid {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{} belongs to uid {owner}, not to this user (uid {uid}); remove it",
            path.display()
        )))
    }
}

/// This process's effective uid: the owner of a file it just created.
fn current_uid() -> io::Result<u32> {
    Ok(tempfile::tempfile()?.metadata()?.uid())
}

/// Who runs the server: this user, or `postgres` when this is root (initdb refuses root).
fn server_user(uid: u32) -> io::Result<Option<&'static str>> {
    if uid != 0 {
        return Ok(None);
    }
    let exists = Command::new("id")
        .args(["-u", SERVER_USER])
        .output()
        .is_ok_and(|output| output.status.success());
    if exists {
        Ok(Some(SERVER_USER))
    } else {
        Err(io::Error::other(format!(
            "the tests run as root, PostgreSQL refuses to, and there is no `{SERVER_USER}` user \
             to run it as: install Debian's postgresql package (it creates the user), or run \
             the tests as an unprivileged user"
        )))
    }
}

/// `initdb` and `pg_ctl` from `PATH`, else from the newest `/usr/lib/postgresql/*/bin` that has
/// both.
fn find_binaries() -> io::Result<Binaries> {
    let from_path = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
    };
    if let (Some(initdb), Some(pg_ctl)) = (from_path("initdb"), from_path("pg_ctl")) {
        // pg_ctl finds `postgres` next to its own resolved path, so keep the real one.
        return Ok(Binaries {
            initdb: fs::canonicalize(initdb)?,
            pg_ctl: fs::canonicalize(pg_ctl)?,
        });
    }
    let newest = fs::read_dir(DEBIAN_POSTGRES_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major);
    if let Some((_, bin)) = newest {
        return Ok(Binaries {
            initdb: bin.join("initdb"),
            pg_ctl: bin.join("pg_ctl"),
        });
    }
    let missing: Vec<&str> = ["initdb", "pg_ctl"]
        .into_iter()
        .filter(|name| from_path(name).is_none())
        .collect();
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no PostgreSQL server binaries: `{}` not found in PATH nor in \
             {DEBIAN_POSTGRES_LIB}/*/bin; install Debian's postgresql package (`apt-get install \
             postgresql`, which `make deps` does)",
            missing.join("` and `")
        ),
    ))
}

/// A port on `listen` that nothing listens on right now.
fn free_port(listen: IpAddr) -> io::Result<u16> {
    Ok(TcpListener::bind(SocketAddr::new(listen, 0))?
        .local_addr()?
        .port())
}

/// Runs `command`; a failure says which program and quotes its output.
fn run(command: &mut Command) -> io::Result<Output> {
    let program = describe(command);
    let output = command
        .output()
        .map_err(|error| io::Error::new(error.kind(), format!("cannot run {program}: {error}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        let mut message = format!("{program} failed ({})", output.status);
        for stream in [&output.stdout, &output.stderr] {
            let text = String::from_utf8_lossy(stream);
            if !text.trim().is_empty() {
                let _ = write!(message, "\n{}", text.trim_end());
            }
        }
        Err(io::Error::other(message))
    }
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn append(path: &Path, text: &str) -> io::Result<()> {
    use io::Write as _;
    fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
