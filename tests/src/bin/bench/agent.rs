//! The agent under test: a release-like `rsql-agent run` the figures measure, of one build
//! (the current tree's, or the previous main's for the side-by-side figures).

use super::*;

/// One build under test: the directory of its `rsql-agent` and `rsql-job-owner` (the
/// agent's direct launcher runs the `rsql-job-owner` next to its own binary, so each build
/// gets its own owner).
#[derive(Debug, Clone)]
pub(super) struct Build {
    /// `previous` or `new`: the key in `bench/results.json`.
    pub(super) key: &'static str,
    /// How the table names it.
    pub(super) label: &'static str,
    pub(super) bin_dir: PathBuf,
    /// The commit it was built from, as far as it is known.
    pub(super) commit: Option<String>,
}

impl Build {
    /// The current tree's build: the binaries next to this program (`target/release` for
    /// `make bench`).
    pub(super) fn current() -> Build {
        let agent = bins::agent();
        let commit = Command::new("git")
            .arg("-C")
            .arg(bins::workspace_root())
            .args(["describe", "--always", "--dirty", "--abbrev=12"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        Build {
            key: "new",
            label: "new",
            bin_dir: agent
                .parent()
                .expect("the agent has a directory")
                .to_path_buf(),
            commit,
        }
    }

    /// The previous main's binaries in `dir` (`make bench-baseline`: `DIR/COMMIT` names
    /// the commit). Refuses a directory without them, and a `current` build whose binaries
    /// are byte for byte the baseline's: `target/release` then still holds what the
    /// baseline's build left there, and the table would compare a build with itself.
    pub(super) fn baseline(dir: &Path, current: &Build) -> Result<Build, String> {
        for name in ["rsql-agent", OWNER] {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(format!(
                    "{} is missing: run `make bench-baseline` (it builds the previous main there)",
                    path.display()
                ));
            }
        }
        for name in ["rsql-agent", OWNER] {
            let (ours, theirs) = (current.bin_dir.join(name), dir.join(name));
            if same_bytes(&ours, &theirs) {
                return Err(format!(
                    "{} is the baseline's own binary ({}): build the current tree after the \
                     baseline (`make bench` does: the shared target directory holds whichever \
                     build ran last)",
                    ours.display(),
                    theirs.display()
                ));
            }
        }
        let commit = std::fs::read_to_string(dir.join("COMMIT"))
            .ok()
            .map(|c| c.trim().to_string());
        Ok(Build {
            key: "previous",
            label: "previous main",
            bin_dir: dir.to_path_buf(),
            commit,
        })
    }

    pub(super) fn agent(&self) -> PathBuf {
        self.bin_dir.join("rsql-agent")
    }

    pub(super) fn json(&self) -> Value {
        json!({"label": self.label, "bin_dir": self.bin_dir.display().to_string(), "commit": self.commit})
    }
}

/// The job owner program's name; the agent looks for it next to itself.
const OWNER: &str = "rsql-job-owner";

fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(fa), Ok(fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let same_len = match (fa.metadata(), fb.metadata()) {
        (Ok(ma), Ok(mb)) => ma.len() == mb.len(),
        _ => false,
    };
    if !same_len {
        return false;
    }
    let (mut ra, mut rb) = (BufReader::new(fa), BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = match ra.read(&mut ba) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 {
            return true;
        }
        if rb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// `RSQL_BENCH_WRAP`: a command line (split on white space) put in front of every agent this
/// run starts, for profiling (`strace -f -c -o /tmp/strace-{build}.txt`, `perf record -g -o
/// /tmp/perf-{build}.data --`); `{build}` becomes `new` or `previous`.
pub(super) fn wrap_prefix(build: &Build) -> Vec<String> {
    std::env::var("RSQL_BENCH_WRAP")
        .unwrap_or_default()
        .split_whitespace()
        .map(|w| w.replace("{build}", build.key))
        .collect()
}

/// A release-like `rsql-agent run`: default log level, long polling, audit table, and
/// `[logs.cloudwatch]` when `ship` (the shipper, when built, then runs as in production).
#[derive(Debug)]
pub(super) struct BenchAgent {
    pub(super) child: Option<Child>,
    /// The agent's own pid: the child's, or under `RSQL_BENCH_WRAP` its descendant's.
    pid: u32,
    wrapped: bool,
    pub(super) log_path: PathBuf,
    pub(super) _dir: tempfile::TempDir,
}

impl BenchAgent {
    /// Starts `build`'s agent on `queue`, its AWS traffic through `proxy`.
    pub(super) fn start(
        world: &World,
        build: &Build,
        queue: &str,
        proxy: &TimingProxy,
        ship: bool,
    ) -> BenchAgent {
        let dir = tempfile::Builder::new()
            .prefix("rsql-bench-agent-")
            .tempdir()
            .expect("agent dir");
        let state = dir.path().join("state");
        let mut config = format!(
            "[agent]\nstate_dir = \"{state}\"\nmax_concurrent_jobs = 4\ninstance_id = \"i-0bench\"\n\
             shutdown_grace = \"30s\"\n\
             [jobs]\nscript_dir = \"{scripts}\"\nlog_dir = \"{state}/jobs\"\ndefault_timeout = \"10m\"\n\
             kill_grace = \"2s\"\nheartbeat_interval = \"20s\"\n\
             [intake.sqs]\nqueue_url = \"{queue}\"\nwait_time = \"20s\"\nvisibility_timeout = \"120s\"\n\
             [lock]\ndir = \"{locks}\"\n\
             [report.audit]\njob_table = \"{table}\"\n",
            state = state.display(),
            scripts = world.scripts.display(),
            locks = dir.path().join("locks").display(),
            table = world.table,
        );
        if ship {
            config.push_str(&format!(
                "[logs.cloudwatch]\nlog_group = \"{LOG_GROUP}\"\ncreate_group = true\n"
            ));
        }
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, config).expect("write agent config");
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod agent config");
        let log_path = dir.path().join("agent.log");
        let log = File::create(&log_path).expect("agent log");
        let agent = build.agent();
        let wrap = wrap_prefix(build);
        let mut command = match wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&agent);
                c
            }
            None => Command::new(&agent),
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .envs(moto::aws_env(&proxy.url()))
            .env_remove("RSQL_AGENT_LOG")
            // Not a systemd service: the direct launcher, whatever started the bench.
            .env_remove("INVOCATION_ID")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} ({wrap:?}): {e}", agent.display()));
        let mut agent_process = BenchAgent {
            pid: child.id(),
            child: Some(child),
            wrapped: !wrap.is_empty(),
            log_path,
            _dir: dir,
        };
        if agent_process.wrapped {
            agent_process.pid = agent_process.find_wrapped(&agent);
        }
        agent_process
    }

    /// The agent under the wrapper: the descendant of the wrapper whose executable is the
    /// agent's binary (the wrapper itself when it execs the agent, as `env` does).
    fn find_wrapped(&mut self, agent: &Path) -> u32 {
        let want = std::fs::canonicalize(agent).unwrap_or_else(|_| agent.to_path_buf());
        let root = self.pid;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut family = vec![root];
            let mut procs: Vec<(u32, u32)> = Vec::new();
            for entry in std::fs::read_dir("/proc").expect("list /proc").flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                if let Some(ppid) = proc_ppid(pid) {
                    procs.push((pid, ppid));
                }
            }
            let mut i = 0;
            while i < family.len() {
                let parent = family[i];
                family.extend(
                    procs
                        .iter()
                        .filter(|(_, pp)| *pp == parent)
                        .map(|(p, _)| *p),
                );
                i += 1;
            }
            if let Some(pid) = family.into_iter().find(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == want)
            }) {
                return pid;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "no {} process under the RSQL_BENCH_WRAP command (pid {root}):\n{}",
                want.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(super) fn pid(&self) -> u32 {
        assert!(self.child.is_some(), "agent running");
        self.pid
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub(super) fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the agent exited ({status}):\n{}", self.log());
            }
        }
    }

    /// Kills the agent. Under `RSQL_BENCH_WRAP` it is asked to stop (SIGTERM) and the
    /// wrapper is given a minute to finish (a profiler writes its report when its process
    /// exits), killed only then.
    pub(super) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.wrapped {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The parent pid of `pid` (field 4 of /proc/PID/stat), if it still runs.
fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}
