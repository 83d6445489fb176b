//! Starting a job's owner process so that it does not belong to the agent.
//!
//! - [`Launcher::Systemd`]: under systemd, each owner is an instance of the template unit
//!   `rsql-job-owner@.service`, started by systemd itself when the agent connects to the
//!   socket `rsql-job-owner.socket` listens on (`Accept=yes`). The agent sends the job's id
//!   on that connection; the owner answers once it listens on its own socket. So:
//!   - the agent needs no privilege at all: no polkit rule, no `systemd-run`, no D-Bus
//!     call. Only the agent's user and root may connect (the socket is `rsql` 0600), and
//!     all they can ask for is an owner for a job directory under the state directory:
//!     every property of the unit (user, capabilities, sandbox, slice, delegation, and the
//!     one user its job may run as) is fixed by the packaged template, not by the caller;
//!   - the job is not in the agent's cgroup (a `systemctl restart rsql-agent` leaves it
//!     alone); the unit is ordered after the agent, so at shutdown job units stop first,
//!     while the agent can still report them; systemd is the owner's parent, so there is no
//!     pid race.
//! - [`Launcher::Direct`]: `posix_spawn` of the owner, which detaches itself (fork, new
//!   session) at once, for hosts without systemd and for tests. The owner's parent becomes
//!   init (or the nearest subreaper above the agent), never the agent.
//!
//! Either way the owner runs the job as [`JobUser`] (`[jobs] user`): under systemd that is
//! `rsql-job` unless configured, never root and never the agent's user.
//!
//! The launcher also decides where a job's cgroup comes from (see `cgroup`): a systemd job
//! unit is delegated its own cgroup (`Delegate=yes`, with memory and CPU accounting); a
//! directly started owner makes one under `[jobs] cgroup_parent`, when that is set.
//!
//! Must not touch: what the owner does once started (see `shim`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

// The owner socket's protocol and the unit names are shared with the owner itself.
pub use super::activation::{
    valid_job_id, ActivationAnswer, ActivationRequest, SLICE, UNIT_PREFIX,
};
use super::JobDir;
use crate::cgroup::{self, Capability, CgroupChoice, CgroupPlan, Placement};
use crate::config::{JobSettings, LauncherChoice};
use crate::supervisor::{JobUser, JobUserError};

/// The agent's own unit; job units are ordered after it.
pub const AGENT_UNIT: &str = "rsql-agent.service";
/// Where `rsql-job-owner.socket` listens: a connection starts one owner unit.
pub const OWNER_SOCKET: &str = "/run/rsql-job-owner.sock";
/// The user jobs run as under systemd when `[jobs] user` is not set; the packages create it.
pub const DEFAULT_JOB_USER: &str = "rsql-job";
/// The only user an owner unit runs jobs as (`rsql-job-owner@.service`'s `--job-user`);
/// set in `/etc/rsql-agent/environment`, which the agent's unit reads too.
pub const JOB_USER_ENV: &str = "RSQL_JOB_USER";
/// How long a socket-activated owner may take to answer that it listens.
const OWNER_ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// The owner's answer is one short JSON line.
const MAX_ANSWER: u64 = 4096;

/// The name of the owner program; looked for next to the running binary first.
pub const OWNER_PROGRAM: &str = "rsql-job-owner";
/// Where the packages install it.
pub const OWNER_PROGRAM_INSTALLED: &str = "/usr/libexec/rsql-agent/rsql-job-owner";

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start the job owner {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the job owner socket {path} (is rsql-job-owner.socket active? `systemctl status rsql-job-owner.socket`)")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the job owner unit for job {job_id} refused it: {reason}")]
    Refused { job_id: String, reason: String },
}

/// How owners are started; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    Direct,
    /// Socket-activated `rsql-job-owner@.service` units, through `socket`.
    Systemd {
        socket: PathBuf,
    },
}

impl Launcher {
    /// Picks the launcher for `choice`: `auto` means systemd when this process is a systemd
    /// service (`INVOCATION_ID` is set and systemd is the init system) and the owner socket
    /// exists.
    pub fn choose(choice: LauncherChoice) -> Launcher {
        let socket = PathBuf::from(OWNER_SOCKET);
        let systemd = match choice {
            LauncherChoice::Systemd => true,
            LauncherChoice::Direct => false,
            LauncherChoice::Auto => {
                std::env::var_os("INVOCATION_ID").is_some()
                    && Path::new("/run/systemd/system").is_dir()
                    && socket.exists()
            }
        };
        if systemd {
            Launcher::Systemd { socket }
        } else {
            Launcher::Direct
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Launcher::Direct => "direct",
            Launcher::Systemd { .. } => "systemd",
        }
    }

    /// The user jobs run as: `configured` (`[jobs] user`), else `rsql-job` under systemd;
    /// `None` for a direct launcher with no user configured (jobs run as the agent's user:
    /// fine for a developer's agent, and check-config says what it means).
    pub fn job_user(&self, configured: Option<&str>) -> Result<Option<JobUser>, JobUserError> {
        let name = match (configured, self) {
            (Some(name), _) => name,
            (None, Launcher::Systemd { .. }) => DEFAULT_JOB_USER,
            (None, Launcher::Direct) => return Ok(None),
        };
        if let Launcher::Systemd { .. } = self {
            // The owner unit runs jobs only as its RSQL_JOB_USER, which both units read from
            // /etc/rsql-agent/environment: a different [jobs] user would fail every job, so
            // say so now, at check-config and at start.
            let allowed = std::env::var(JOB_USER_ENV)
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| DEFAULT_JOB_USER.to_string());
            if name != allowed {
                return Err(JobUserError::NotTheOwnersUser {
                    name: name.to_string(),
                    allowed,
                });
            }
        }
        JobUser::resolve_for_jobs(name).map(Some)
    }

    /// Where jobs started by this launcher get their cgroup, or why they get none.
    pub fn cgroup_placement(&self, jobs: &JobSettings) -> Result<Placement, String> {
        match (jobs.cgroup, self, &jobs.cgroup_parent) {
            (CgroupChoice::Off, _, _) => Err("[jobs] cgroup = \"off\"".to_string()),
            (CgroupChoice::Auto, Launcher::Systemd { .. }, _) => Ok(Placement::Unit),
            (CgroupChoice::Auto, Launcher::Direct, Some(parent)) => Ok(Placement::Under {
                parent: parent.clone(),
            }),
            (CgroupChoice::Auto, Launcher::Direct, None) => Err(
                "job owners are started directly (not as systemd units) and [jobs] \
                 cgroup_parent is not set"
                    .to_string(),
            ),
        }
    }

    /// What jobs started by this launcher will get; for the log at start and `check-config`.
    pub fn cgroup_capability(&self, jobs: &JobSettings) -> Capability {
        match self.cgroup_placement(jobs) {
            Ok(placement) => cgroup::detect(&placement),
            Err(reason) => Capability::None { reason },
        }
    }

    /// The cgroup the owner of a job with `memory_max` (the message's) sets up, if any. The
    /// limit is the lower of the message's and `[jobs] memory_max`: a message may ask for
    /// less memory than the host allows a job, never more.
    pub fn cgroup_plan(&self, jobs: &JobSettings, memory_max: Option<u64>) -> Option<CgroupPlan> {
        let placement = self.cgroup_placement(jobs).ok()?;
        let memory_max = match (jobs.memory_max, memory_max) {
            (Some(limit), Some(asked)) if asked > limit => {
                tracing::warn!(
                    asked,
                    limit,
                    "the message asks for more memory than [jobs] memory_max; the configured limit applies"
                );
                Some(limit)
            }
            (limit, asked) => asked.or(limit),
        };
        Some(CgroupPlan {
            placement,
            memory_max,
        })
    }

    /// Starts an owner for `dir` and returns once it runs. A direct owner is
    /// `program --job-dir DIR` with `env` (the agent's inherited variables and its log
    /// filter); a systemd owner's program and environment are its unit's. The owner then
    /// waits for the agent's start request on its socket. Returns the owner's unit, if any.
    pub fn launch(
        &self,
        program: &Path,
        dir: &JobDir,
        env: &[(String, String)],
    ) -> Result<Option<String>, LaunchError> {
        match self {
            Launcher::Direct => launch_direct(program, dir, env).map(|()| None),
            Launcher::Systemd { socket } => activate(socket, &dir.job_id()).map(Some),
        }
    }
}

/// Connects to the owner socket (systemd starts a unit for the connection), names the job,
/// and waits for the owner's answer.
fn activate(socket: &Path, job_id: &str) -> Result<String, LaunchError> {
    let unreachable = |source| LaunchError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(OWNER_ANSWER_TIMEOUT))
        .map_err(unreachable)?;
    let request = ActivationRequest {
        v: super::PROTOCOL,
        job_id: job_id.to_string(),
    };
    let mut line = serde_json::to_vec(&request).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    let refused = |reason: String| LaunchError::Refused {
        job_id: job_id.to_string(),
        reason,
    };
    let mut answer = Vec::new();
    let read = BufReader::new(io::Read::take(&stream, MAX_ANSWER)).read_until(b'\n', &mut answer);
    match read {
        Ok(0) => return Err(refused("the owner closed the connection without an answer (see `journalctl -u 'rsql-job-owner@*'`)".into())),
        Ok(_) => {}
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            return Err(refused(format!("no answer within {OWNER_ANSWER_TIMEOUT:?}")))
        }
        Err(e) => return Err(refused(format!("cannot read its answer: {e}"))),
    }
    let answer: ActivationAnswer = serde_json::from_slice(answer.trim_ascii_end())
        .map_err(|e| refused(format!("not an answer: {e}")))?;
    match answer {
        ActivationAnswer { ok: true, unit, .. } => Ok(unit.unwrap_or_default()),
        ActivationAnswer { error, .. } => {
            Err(refused(error.unwrap_or_else(|| "no reason given".into())))
        }
    }
}

/// The owner program: `rsql-job-owner` next to this process's binary (the packages' and the
/// build's layout), else where the packages install it.
pub fn owner_program() -> PathBuf {
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let sibling = dir.join(OWNER_PROGRAM);
            if sibling.is_file() {
                return sibling;
            }
        }
    }
    PathBuf::from(OWNER_PROGRAM_INSTALLED)
}

fn launch_direct(
    program: &Path,
    dir: &JobDir,
    env: &[(String, String)],
) -> Result<(), LaunchError> {
    let spawn_error = |source| LaunchError::Spawn {
        program: program.to_path_buf(),
        source,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.log())
        .map_err(spawn_error)?;
    // No `pre_exec`, no working directory, no credentials: std then spawns with
    // `posix_spawn` (a `vfork`: nothing of the agent's address space is copied, where a
    // `fork` copies the page tables of a multi-threaded agent of tens of MB). The owner
    // detaches itself (`--detach`: fork, setsid, chdir /, in the small fresh process), and
    // the half spawned here exits at once; an exec failure still comes back as an error.
    let mut command = Command::new(program);
    command
        .arg("--job-dir")
        .arg(dir.path())
        .arg("--detach")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(spawn_error)?)
        .stderr(log);
    let mut first_half = command.spawn().map_err(spawn_error)?;
    let status = first_half.wait().map_err(spawn_error)?;
    if !status.success() {
        return Err(spawn_error(io::Error::other(format!(
            "the owner could not detach from the agent ({status}; its log {} says why)",
            dir.log().display()
        ))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_jobs_default_to_the_packaged_job_user() {
        let systemd = Launcher::Systemd {
            socket: PathBuf::from(OWNER_SOCKET),
        };
        // No rsql-job user on a build host: the error names it and says how to make it.
        match systemd.job_user(None) {
            Ok(Some(user)) => assert_eq!(user.name, DEFAULT_JOB_USER),
            Ok(None) => panic!("systemd jobs must get a user of their own"),
            Err(e) => assert!(e.to_string().contains(DEFAULT_JOB_USER), "{e}"),
        }
        // Another user than the owner units run jobs as would fail every job: refused now.
        assert!(
            matches!(
                systemd.job_user(Some("etl")),
                Err(JobUserError::NotTheOwnersUser { .. })
            ) || std::env::var(JOB_USER_ENV).is_ok_and(|u| u == "etl")
        );
        assert_eq!(Launcher::Direct.job_user(None), Ok(None));
        assert!(matches!(
            Launcher::Direct.job_user(Some("root")),
            Err(JobUserError::Root { .. })
        ));
    }

    fn jobs(cgroup: CgroupChoice, parent: Option<&str>, memory_max: Option<u64>) -> JobSettings {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = crate::config::Config::defaults_for_user(dir.path()).expect("defaults");
        config.jobs.cgroup = cgroup;
        config.jobs.cgroup_parent = parent.map(std::path::PathBuf::from);
        config.jobs.memory_max = memory_max;
        config.jobs
    }

    #[test]
    fn job_cgroups_come_from_the_unit_or_the_configured_parent() {
        let systemd = Launcher::Systemd {
            socket: PathBuf::from(OWNER_SOCKET),
        };
        let auto = jobs(CgroupChoice::Auto, Some("/sys/fs/cgroup/rsql-jobs"), None);
        assert_eq!(systemd.cgroup_placement(&auto), Ok(Placement::Unit));
        assert_eq!(
            Launcher::Direct.cgroup_placement(&auto),
            Ok(Placement::Under {
                parent: "/sys/fs/cgroup/rsql-jobs".into()
            })
        );
        let no_parent = jobs(CgroupChoice::Auto, None, None);
        let why = Launcher::Direct.cgroup_placement(&no_parent).unwrap_err();
        assert!(why.contains("cgroup_parent"), "{why}");
        assert_eq!(Launcher::Direct.cgroup_plan(&no_parent, None), None);
        let off = jobs(CgroupChoice::Off, Some("/sys/fs/cgroup/rsql-jobs"), None);
        assert!(systemd.cgroup_plan(&off, None).is_none());
        assert_eq!(
            systemd.cgroup_capability(&off).level(),
            crate::cgroup::Level::None
        );
    }

    #[test]
    fn a_message_may_lower_the_memory_limit_but_never_raise_it() {
        const GIB: u64 = 1 << 30;
        let limited = jobs(CgroupChoice::Auto, Some("/cg"), Some(4 * GIB));
        let plan = |jobs: &JobSettings, asked| {
            Launcher::Direct
                .cgroup_plan(jobs, asked)
                .expect("a plan")
                .memory_max
        };
        assert_eq!(plan(&limited, None), Some(4 * GIB));
        assert_eq!(plan(&limited, Some(GIB)), Some(GIB));
        assert_eq!(plan(&limited, Some(8 * GIB)), Some(4 * GIB));
        let unlimited = jobs(CgroupChoice::Auto, Some("/cg"), None);
        assert_eq!(plan(&unlimited, Some(GIB)), Some(GIB));
        assert_eq!(plan(&unlimited, None), None);
    }

    #[test]
    fn direct_is_direct_whatever_the_host() {
        assert_eq!(Launcher::choose(LauncherChoice::Direct), Launcher::Direct);
    }
}
