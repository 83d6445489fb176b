//! A throwaway PostgreSQL server for system tests.
//!
//! Owns: one cluster per [`TestPg`], made by `initdb` in its own temporary directory, the
//! server process that serves it on `127.0.0.1:<a free port>` and on a unix socket inside that
//! directory, and the removal of both. Must not touch: any system-wide cluster, the system
//! socket directory (`/var/run/postgresql`), or ports other than the one it picked.
//!
//! Every instance is independent, so tests (nextest runs each one as its own process, in
//! parallel) each start their own. The role has a password and host connections use
//! `scram-sha-256`, so a client that ignores `RSPASSWORD` fails as it would against Redshift.
//!
//! `initdb` refuses to run as root. When the tests run as root (CI containers), `initdb` and
//! `pg_ctl` run as the `postgres` OS user through `runuser`, in a directory owned by that user
//! under `/tmp`.
//!
//! `pg_ctl start` detaches the server into its own session, so the server would outlive a test
//! process that is killed (a nextest timeout, a SIGKILL) before `Drop` runs. Each instance
//! therefore has a watchdog: a small `sh` in its own process group that blocks reading a pipe
//! whose only write end this process holds. When this process goes away, in any manner, the
//! read returns and the watchdog stops the server and removes the directory. `Drop` uses the
//! same path: it closes the pipe and waits for the watchdog.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, SimpleQueryMessage};

const HOST: &str = "127.0.0.1";
const USER: &str = "rsql_test";
const DATABASE: &str = "rsql_test";
/// How long the server may take to accept connections once `pg_ctl` says it started.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// A port picked free can be taken before the server binds it; try this many ports.
const PORT_ATTEMPTS: usize = 8;
const INSTALL_HINT: &str = "install it with: apt-get install -y postgresql";

/// A running, private PostgreSQL server. Dropping it stops the server (`pg_ctl stop -m
/// immediate`) and removes its directory.
#[derive(Debug)]
pub struct TestPg {
    port: u16,
    password: String,
    dir: PathBuf,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    /// Run the server tools as the `postgres` OS user (we are root).
    as_postgres: bool,
    watchdog: Option<Child>,
    /// Removes the directory if the watchdog could not.
    _tempdir: Option<tempfile::TempDir>,
}

impl TestPg {
    /// Creates a cluster and starts its server. Panics, saying why, when that fails: a missing
    /// PostgreSQL installation, a missing `postgres` user when running as root, or a server that
    /// does not come up (the panic message then carries the server log).
    pub fn start() -> TestPg {
        let bin_dir = find_bin_dir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server programs (initdb, pg_ctl) were not found in \
                 $RSQL_TEST_PG_BIN, /usr/lib/postgresql/*/bin or PATH; {INSTALL_HINT}"
            )
        });
        let as_postgres = nix::unistd::geteuid().is_root();
        let owner = if as_postgres {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .unwrap_or_else(|| {
                    panic!(
                        "the tests run as root, and initdb refuses root, so PostgreSQL must run \
                         as the `postgres` OS user, which does not exist; {INSTALL_HINT}"
                    )
                });
            Some((user.uid, user.gid))
        } else {
            None
        };

        // Root: under /tmp, which the postgres user can traverse (TMPDIR might not be).
        // Otherwise TMPDIR, unless it is so long that the socket path would not fit.
        let base = match std::env::temp_dir() {
            dir if owner.is_none() && dir.as_os_str().len() < 60 => dir,
            _ => PathBuf::from("/tmp"),
        };
        let tempdir = tempfile::Builder::new()
            .prefix("rsql-test-pg.")
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot create a temporary directory in {base:?}: {e}"));
        let dir = tempdir.path().to_path_buf();
        if let Some((uid, gid)) = owner {
            nix::unistd::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("cannot chown {dir:?} to postgres: {e}"));
        }

        let mut pg = TestPg {
            port: 0,
            password: random_password(),
            data_dir: dir.join("data"),
            dir,
            bin_dir,
            as_postgres,
            watchdog: None,
            _tempdir: Some(tempdir),
        };
        // From here on a panic drops `pg`, which stops whatever was started.
        pg.watchdog = Some(pg.spawn_watchdog());
        pg.init_cluster(owner);
        pg.start_server();
        pg.wait_ready_and_create_database();
        pg
    }

    /// The address the server listens on.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The TCP port the server listens on (loopback only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A superuser role that logs in with [`TestPg::password`].
    pub fn user(&self) -> &str {
        USER
    }

    /// The role's password, different for every instance.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A database owned by [`TestPg::user`], empty at start.
    pub fn database(&self) -> &str {
        DATABASE
    }

    /// The environment an RSQL job gets from the agent: `RSQL_HOST`, `RSQL_PORT`, `RSQL_USER`,
    /// `RSQL_DB` and `RSPASSWORD`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("RSQL_HOST".to_string(), self.host().to_string()),
            ("RSQL_PORT".to_string(), self.port.to_string()),
            ("RSQL_USER".to_string(), self.user().to_string()),
            ("RSQL_DB".to_string(), self.database().to_string()),
            ("RSPASSWORD".to_string(), self.password.clone()),
        ]
    }

    /// A new connection to [`TestPg::database`] as [`TestPg::user`], over TCP with the password.
    pub fn client(&self) -> Client {
        self.connect(DATABASE).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the test PostgreSQL on {HOST}:{}: {e}\n--- server log ---\n{}",
                self.port,
                self.server_log()
            )
        })
    }

    /// Runs `sql` on a new connection and returns the first column of the first row as an
    /// integer, for checks such as `SELECT COUNT(*) FROM t`. Any integer type works.
    pub fn query_i64(&self, sql: &str) -> i64 {
        let messages = self
            .client()
            .simple_query(sql)
            .unwrap_or_else(|e| panic!("query {sql:?} failed: {}", describe(&e)));
        let row = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .unwrap_or_else(|| panic!("query {sql:?} returned no rows"));
        let text = row
            .get(0)
            .unwrap_or_else(|| panic!("query {sql:?} returned NULL"));
        text.parse()
            .unwrap_or_else(|e| panic!("query {sql:?} returned {text:?}, not an integer: {e}"))
    }

    /// The server log so far, for assertion messages.
    pub fn server_log(&self) -> String {
        fs::read_to_string(self.log_path())
            .unwrap_or_else(|e| format!("(no server log at {:?}: {e})", self.log_path()))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn connect(&self, dbname: &str) -> Result<Client, postgres::Error> {
        postgres::Config::new()
            .host(HOST)
            .port(self.port)
            .user(USER)
            .password(&self.password)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10))
            .connect(NoTls)
    }

    /// A command for a PostgreSQL server program, run as the `postgres` user when we are root.
    fn tool(&self, program: &str) -> Command {
        let path = self.bin_dir.join(program);
        let mut cmd = if self.as_postgres {
            // root's PATH normally has /usr/sbin, but a test runner's environment may not.
            let runuser = Path::new("/usr/sbin/runuser");
            let mut cmd = Command::new(if runuser.exists() {
                runuser
            } else {
                Path::new("runuser")
            });
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        };
        // The postgres user may not be able to enter our working directory.
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        // The server reads these; they must not leak in from the test's environment.
        for var in [
            "PGDATA",
            "PGPORT",
            "PGHOST",
            "PGUSER",
            "PGDATABASE",
            "PGPASSWORD",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    fn spawn_watchdog(&self) -> Child {
        // `read` returns at end of file, that is when every write end of the pipe is closed:
        // only this process holds one (std opens pipes close-on-exec). Its own process group
        // keeps it out of a signal sent to the test's group.
        const SCRIPT: &str =
            r#"read -r _; dir="$1"; shift; "$@" >/dev/null 2>&1; rm -rf -- "$dir""#;
        let stop = self.stop_command();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("rsql-test-pg-watchdog")
            .arg(&self.dir)
            .arg(stop.get_program())
            .args(stop.get_args())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start the PostgreSQL watchdog (/bin/sh): {e}"))
    }

    fn stop_command(&self) -> Command {
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "30"]);
        cmd
    }

    fn init_cluster(&self, owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>) {
        let pwfile = self.dir.join("pwfile");
        write_private(&pwfile, &self.password, owner);
        let mut auth = OsString::from("--pwfile=");
        auth.push(&pwfile);
        let output = self
            .tool("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-U")
            .arg(USER)
            .arg(auth)
            .args([
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .output();
        let _ = fs::remove_file(&pwfile);
        check(output, "initdb", String::new);

        // Everything but the port, which may change between attempts (see start_server).
        let conf = format!(
            "\n# rsql-agent test harness\n\
             listen_addresses = '{HOST}'\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 16MB\n\
             max_connections = 40\n\
             autovacuum = off\n\
             log_min_messages = warning\n",
            self.dir.display()
        );
        fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .unwrap_or_else(|e| panic!("cannot extend postgresql.conf: {e}"));
    }

    fn start_server(&mut self) {
        let log = self.log_path();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let log_before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            // `-w` makes pg_ctl poll until the server reports it is ready, up to `-t`.
            let output = self
                .tool("pg_ctl")
                .arg("start")
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(format!("-p {port}"))
                .args(["-w", "-t", &READY_DEADLINE.as_secs().to_string()])
                .output();
            let ok = matches!(&output, Ok(out) if out.status.success());
            if ok {
                self.port = port;
                return;
            }
            let attempt_log = fs::read(&log)
                .map(|all| String::from_utf8_lossy(&all[log_before as usize..]).into_owned())
                .unwrap_or_default();
            if attempt_log.contains("Address already in use") {
                continue; // someone took the port between our probe and the server's bind
            }
            check(output, "pg_ctl start", || self.server_log());
        }
        panic!(
            "PostgreSQL could not bind a free port in {PORT_ATTEMPTS} attempts\n--- server log ---\n{}",
            self.server_log()
        );
    }

    fn wait_ready_and_create_database(&self) {
        let deadline = Instant::now() + READY_DEADLINE;
        let mut client = loop {
            match self.connect("postgres") {
                Ok(client) => break client,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!(
                    "PostgreSQL on {HOST}:{} did not accept connections within {:?}: {}\n\
                     --- server log ---\n{}",
                    self.port,
                    READY_DEADLINE,
                    describe(&e),
                    self.server_log()
                ),
            }
        };
        client
            .batch_execute(&format!("CREATE DATABASE {DATABASE} OWNER {USER}"))
            .unwrap_or_else(|e| {
                panic!(
                    "CREATE DATABASE failed: {}\n--- server log ---\n{}",
                    describe(&e),
                    self.server_log()
                )
            });
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take()); // end of file: the watchdog stops the server
                                         // Bounded: `pg_ctl stop -m immediate -t 30` gives up after 30 s.
            let _ = watchdog.wait();
        } else {
            let _ = self.stop_command().output();
        }
    }
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`, all from one installation.
fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|p| dir.join(p).is_file())
    };
    if let Some(dir) = std::env::var_os("RSQL_TEST_PG_BIN") {
        return Some(PathBuf::from(dir)).filter(|d| has_tools(d));
    }
    // Debian/Ubuntu keep the server programs out of PATH; take the newest major version.
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_tools(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    // Elsewhere: wherever `initdb` is on PATH, following symlinks to the real installation.
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("initdb"))
        .filter(|p| p.is_file())
        .filter_map(|p| fs::canonicalize(p).ok())
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .find(|dir| has_tools(dir))
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot probe for a free loopback port: {e}"))
}

/// A password unique to this instance; it only has to differ between instances, not resist
/// guessing, so std's randomly keyed hasher is enough.
fn random_password() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("pw-{:016x}", hasher.finish())
}

fn write_private(path: &Path, contents: &str, owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>) {
    fs::write(path, contents)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o600)))
        .unwrap_or_else(|e| panic!("cannot write {path:?}: {e}"));
    if let Some((uid, gid)) = owner {
        nix::unistd::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("cannot chown {path:?} to postgres: {e}"));
    }
}

/// Panics with the program's output (and `extra`, e.g. the server log) unless it succeeded.
fn check(output: std::io::Result<Output>, what: &str, extra: impl FnOnce() -> String) {
    match output {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            extra()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{what} could not be started ({e}); {INSTALL_HINT} (and util-linux for runuser)")
        }
        Err(e) => panic!("{what} could not be started: {e}"),
    }
}

/// An error with the server's message and SQLSTATE when there is one.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}
