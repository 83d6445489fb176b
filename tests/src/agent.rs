//! The real `rsql-agent run` daemon as a child process of a test.
//!
//! A test describes the config it wants with [`AgentConfig`]; [`Agent::start`] writes it,
//! starts the binary with the AWS environment pointing at an endpoint (moto, or a proxy in
//! front of it) and the `rsql` stand-in first on `PATH`, and captures its log to a file.
//! Dropping an [`Agent`] SIGKILLs it; [`Agent::kill`] and [`Agent::terminate`] do so on
//! purpose, for fault tests.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bins;
use crate::moto;

/// What goes into the agent's `agent.toml`. Paths default to a fresh temp directory.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub queue_url: String,
    pub script_dir: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub lock_dir: Option<PathBuf>,
    pub instance_id: String,
    pub max_concurrent_jobs: usize,
    pub kill_grace: String,
    pub heartbeat_interval: String,
    pub visibility_timeout: String,
    pub wait_time: String,
    pub job_table: Option<String>,
    pub log_group: Option<String>,
    /// Extra TOML appended verbatim (e.g. a `[database]` table).
    pub extra: String,
    /// Extra lines for the `[jobs]` table (e.g. `cgroup_parent = "..."`).
    pub jobs_extra: String,
    /// `[jobs] on_interrupted` (`"fail"` or `"rerun"`); absent when `None`.
    pub on_interrupted: Option<String>,
    /// Extra environment for the agent process (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// `--log-format` (`text` when `None`).
    pub log_format: Option<String>,
    /// Starts the agent with this open-file limit, soft and hard.
    pub open_files: Option<u64>,
}

impl AgentConfig {
    pub fn new(queue_url: &str, script_dir: &Path) -> AgentConfig {
        AgentConfig {
            queue_url: queue_url.to_string(),
            script_dir: script_dir.to_path_buf(),
            state_dir: None,
            lock_dir: None,
            instance_id: "i-0test".to_string(),
            max_concurrent_jobs: 4,
            kill_grace: "2s".to_string(),
            heartbeat_interval: "2s".to_string(),
            visibility_timeout: "30s".to_string(),
            wait_time: "1s".to_string(),
            job_table: None,
            log_group: None,
            extra: String::new(),
            jobs_extra: String::new(),
            on_interrupted: None,
            env: Vec::new(),
            log_format: None,
            open_files: None,
        }
    }

    /// `[database]` pointing at a test PostgreSQL.
    pub fn database(mut self, pg: &crate::pg::TestPg) -> AgentConfig {
        self.extra.push_str(&format!(
            "[database]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ndbname = \"{}\"\npassword = \"{}\"\n",
            pg.host(),
            pg.port(),
            pg.user(),
            pg.database(),
            pg.password()
        ));
        self
    }

    /// Writes `agent.toml` into `dir` (mode 0600, as the agent wants a file that may hold a
    /// password), with the state and lock directories defaulting to `dir/state` and
    /// `dir/locks`; returns the config file, the state dir and the lock dir. For a process
    /// that reads the config without [`Agent::start`] (`rsql-wrapper run`).
    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let state_dir = self.state_dir.clone().unwrap_or_else(|| dir.join("state"));
        let lock_dir = self.lock_dir.clone().unwrap_or_else(|| dir.join("locks"));
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, self.render(&state_dir, &lock_dir)).expect("write config");
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod config");
        (config_path, state_dir, lock_dir)
    }

    fn render(&self, state_dir: &Path, lock_dir: &Path) -> String {
        let mut text = format!(
            "[agent]\nstate_dir = \"{state}\"\nmax_concurrent_jobs = {max}\ninstance_id = \"{id}\"\n\
             [jobs]\nscript_dir = \"{scripts}\"\nlog_dir = \"{state}/jobs\"\ndefault_timeout = \"10m\"\n\
             kill_grace = \"{kg}\"\nheartbeat_interval = \"{hb}\"\n{oi}{je}{sqs}\
             [lock]\ndir = \"{locks}\"\n",
            state = state_dir.display(),
            max = self.max_concurrent_jobs,
            id = self.instance_id,
            scripts = self.script_dir.display(),
            kg = self.kill_grace,
            hb = self.heartbeat_interval,
            // An empty queue URL leaves the SQS intake out (a socket-only agent).
            sqs = if self.queue_url.is_empty() {
                String::new()
            } else {
                format!(
                    "[intake.sqs]\nqueue_url = \"{}\"\nwait_time = \"{}\"\nvisibility_timeout = \"{}\"\n",
                    self.queue_url, self.wait_time, self.visibility_timeout
                )
            },
            locks = lock_dir.display(),
            je = self.jobs_extra,
            oi = self
                .on_interrupted
                .as_ref()
                .map(|v| format!("on_interrupted = \"{v}\"\n"))
                .unwrap_or_default(),
        );
        if let Some(table) = &self.job_table {
            text.push_str(&format!("[report.audit]\njob_table = \"{table}\"\n"));
        }
        if let Some(group) = &self.log_group {
            text.push_str(&format!(
                "[logs.cloudwatch]\nlog_group = \"{group}\"\ncreate_group = true\n"
            ));
        }
        text.push_str(&self.extra);
        text
    }
}

/// A running `rsql-agent run`.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    endpoint: String,
    pub config: AgentConfig,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub lock_dir: PathBuf,
    pub log_path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Agent {
    /// Starts the agent against `endpoint` (moto's, or a proxy's URL).
    pub fn start(config: AgentConfig, endpoint: &str) -> Agent {
        let dir = tempfile::tempdir().expect("agent temp dir");
        let (config_path, state_dir, lock_dir) = config.write(dir.path());
        let log_path = dir.path().join("agent.log");
        let mut agent = Agent {
            child: None,
            endpoint: endpoint.to_string(),
            config,
            config_path,
            state_dir,
            lock_dir,
            log_path,
            _dir: Some(dir),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("agent log file");
        let path = format!(
            "{}:{}",
            bins::rsql_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new(bins::agent());
        if let Some(format) = &self.config.log_format {
            command.args(["--log-format", format]);
        }
        if let Some(limit) = self.config.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        limit,
                        limit,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .envs(moto::aws_env(&self.endpoint))
            .env("PATH", path)
            .env("RSQL_AGENT_LOG", "info,rsql_agent=debug")
            .envs(self.config.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start rsql-agent");
        self.child = Some(child);
    }

    /// Starts the agent again on the same config and state (after [`Self::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        self.spawn();
    }

    /// Rewrites `agent.toml` from `config`, keeping the state and lock directories (for a
    /// reload test: then send SIGHUP).
    pub fn rewrite_config(&mut self, config: AgentConfig) {
        std::fs::write(
            &self.config_path,
            config.render(&self.state_dir, &self.lock_dir),
        )
        .expect("rewrite config");
        self.config = config;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGKILL, for real, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; returns how it exited, or panics after `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(timeout)
    }

    pub fn signal(&self, signal: Signal) {
        let pid = self.pid();
        kill(Pid::from_raw(pid as i32), signal).expect("signal agent");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("agent running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls the agent's log until it contains `needle`; panics with the log after `timeout`,
    /// or at once when the agent has exited without logging it (a config it refused).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            let exited = self
                .child
                .as_ref()
                .is_some_and(|c| !process_alive(c.id() as i32));
            if exited && !self.log().contains(needle) {
                panic!(
                    "the agent exited without logging {needle:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "agent log has no {needle:?} after {timeout:?}:\n{}",
            self.log()
        );
    }

    /// The local job audit records, oldest first.
    pub fn local_audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state_dir.join("audit/job_audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The entries waiting in the outbox, parsed.
    pub fn outbox_entries(&self) -> Vec<serde_json::Value> {
        let Ok(dir) = std::fs::read_dir(self.state_dir.join("outbox")) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect()
    }

    /// How many outbox entries still carry an undelivered Step Functions callback.
    pub fn pending_callbacks(&self) -> usize {
        self.outbox_entries()
            .iter()
            .filter(|e| !e["callback"].is_null() && e["callback_done"] != true)
            .count()
    }

    /// Files waiting in the outbox.
    pub fn outbox_len(&self) -> usize {
        std::fs::read_dir(self.state_dir.join("outbox"))
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Agent {
    /// The job owner processes this agent's state directory knows of (their `owner.json`),
    /// alive or not.
    pub fn owners(&self) -> Vec<serde_json::Value> {
        let Ok(dir) = std::fs::read_dir(self.state_dir.join("owners")) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| std::fs::read(e.path().join("owner.json")).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect()
    }

    /// SIGKILLs every live job owner of this agent's state directory (jobs outlive the
    /// agent, so a test cleans them up itself). Returns how many it killed.
    pub fn kill_owners(&self) -> usize {
        let mut killed = 0;
        for owner in self.owners() {
            let Some(pid) = owner["pid"].as_i64() else {
                continue;
            };
            if start_time(pid as i32) == owner["start_time"].as_u64() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                killed += 1;
            }
        }
        killed
    }
}

/// Every file below `dir`, recursively (directories themselves are not listed).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// A process's start time (field 22 of /proc/PID/stat), or `None` when it is gone.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    // Fields after the command: state is field 3, start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        self.kill_owners();
    }
}

/// Writes an executable bash job into `dir`.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
    path
}

/// A script directory (mode 0755, as the agent requires) in a new temp dir.
pub fn script_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let scripts = dir.path().join("scripts");
    std::fs::create_dir(&scripts).expect("mkdir scripts");
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (dir, scripts)
}

/// Copies the sample jobs and workflows of `rsql_scripts/` into `dir`.
pub fn copy_sample_scripts(dir: &Path) {
    for entry in
        std::fs::read_dir(bins::workspace_root().join("rsql_scripts")).expect("rsql_scripts")
    {
        let entry = entry.expect("rsql_scripts entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy sample script");
    }
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state is the field after the parenthesised command name.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !matches!(
                state.and_then(|s| s.chars().next()),
                Some('Z') | Some('X') | None
            )
        }
        Err(_) => false,
    }
}

/// Polls until `cond` holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// The AWS emulator with one job queue and an empty script directory: the world most
/// system tests start from. Test files wrap it (with `Deref`) to add their own helpers.
#[derive(Debug)]
pub struct QueueWorld {
    pub moto: moto::Moto,
    pub sdk: aws_config::SdkConfig,
    pub queue_url: String,
    pub scripts: PathBuf,
    _scripts_dir: tempfile::TempDir,
}

impl QueueWorld {
    /// Starts moto and creates a queue named after `prefix`.
    pub async fn new(prefix: &str) -> QueueWorld {
        let moto = moto::Moto::start();
        let sdk = moto.sdk_config().await;
        let queue_url = moto::create_queue(&sdk, &moto::unique_name(prefix)).await;
        let (dir, scripts) = script_dir();
        QueueWorld {
            moto,
            sdk,
            queue_url,
            scripts,
            _scripts_dir: dir,
        }
    }
}
