//! Starting a job's owner process so that it does not belong to the agent.
//!
//! - [`Launcher::Systemd`]: under systemd, each owner is a transient service
//!   (`systemd-run`) in `rsql-jobs.slice`, ordered `After=rsql-agent.service`. So the job is
//!   not in the agent's cgroup (a `systemctl restart rsql-agent` leaves it alone), and at
//!   shutdown job units stop first, while the agent can still report them. systemd is the
//!   unit's parent, so there is no pid race.
//! - [`Launcher::Direct`]: a double fork into a new session, for hosts without systemd and
//!   for tests. The owner's parent becomes init (or the nearest subreaper above the agent),
//!   never the agent.
//!
//! The launcher also decides where a job's cgroup comes from (see `cgroup`): a systemd job
//! unit is delegated its own cgroup (`Delegate=yes`, with memory and CPU accounting); a
//! directly started owner makes one under `[jobs] cgroup_parent`, when that is set.
//!
//! Must not touch: what the owner does once started (see `shim`).

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::JobDir;
use crate::cgroup::{self, Capability, CgroupChoice, CgroupPlan, Placement};
use crate::config::JobSettings;

/// The systemd slice every job owner unit runs in.
pub const SLICE: &str = "rsql-jobs.slice";
/// Job owner units are named `rsql-job-<job id>.service`.
pub const UNIT_PREFIX: &str = "rsql-job-";
/// The agent's own unit; job units are ordered after it.
pub const AGENT_UNIT: &str = "rsql-agent.service";

/// The name of the owner program; looked for next to the running binary first.
pub const OWNER_PROGRAM: &str = "rsql-job-owner";
/// Where the packages install it.
pub const OWNER_PROGRAM_INSTALLED: &str = "/usr/libexec/rsql-agent/rsql-job-owner";

/// `[jobs] launcher`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherChoice {
    /// systemd when the agent runs as a systemd service, direct otherwise.
    #[default]
    Auto,
    Systemd,
    Direct,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start the job owner {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("systemd-run could not start the job owner unit {unit} ({status}): {stderr}")]
    SystemdRun {
        unit: String,
        status: String,
        stderr: String,
    },
}

/// How owners are started; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    Direct,
    Systemd {
        /// `User=` of the unit: the agent's own user when it is not root.
        user: Option<String>,
        /// `TimeoutStopSec=`: the job's kill grace plus time to record its exit.
        stop_timeout: Duration,
    },
}

impl Launcher {
    /// Picks the launcher for `choice`: `auto` means systemd when this process is a systemd
    /// service (`INVOCATION_ID` is set and systemd is the init system).
    pub fn choose(choice: LauncherChoice, kill_grace: Duration) -> Launcher {
        let systemd = match choice {
            LauncherChoice::Systemd => true,
            LauncherChoice::Direct => false,
            LauncherChoice::Auto => {
                std::env::var_os("INVOCATION_ID").is_some()
                    && Path::new("/run/systemd/system").is_dir()
            }
        };
        if !systemd {
            return Launcher::Direct;
        }
        let user = if nix::unistd::geteuid().is_root() {
            None
        } else {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        };
        Launcher::Systemd {
            user,
            stop_timeout: kill_grace + Duration::from_secs(30),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Launcher::Direct => "direct",
            Launcher::Systemd { .. } => "systemd",
        }
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

    /// Starts `program --job-dir DIR` for `dir`, with `env` (the agent's inherited variables
    /// and its log filter), and returns once it runs. The owner then waits for the agent's
    /// start request on its socket.
    pub fn launch(
        &self,
        program: &Path,
        dir: &JobDir,
        env: &[(String, String)],
    ) -> Result<(), LaunchError> {
        match self {
            Launcher::Direct => launch_direct(program, dir, env),
            Launcher::Systemd { .. } => {
                let argv = self.systemd_run_argv(program, dir, env);
                let unit = format!("{UNIT_PREFIX}{}.service", dir.job_id());
                let out = Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|source| LaunchError::Spawn {
                        program: PathBuf::from(&argv[0]),
                        source,
                    })?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(LaunchError::SystemdRun {
                        unit,
                        status: out.status.to_string(),
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    })
                }
            }
        }
    }

    /// The `systemd-run` command line for [`Launcher::Systemd`].
    pub fn systemd_run_argv(
        &self,
        program: &Path,
        dir: &JobDir,
        env: &[(String, String)],
    ) -> Vec<String> {
        let Launcher::Systemd { user, stop_timeout } = self else {
            return Vec::new();
        };
        let mut argv: Vec<String> = vec![
            "systemd-run".into(),
            format!("--unit={UNIT_PREFIX}{}", dir.job_id()),
            format!("--slice={SLICE}"),
            "--collect".into(),
            "--quiet".into(),
            format!("--description=rsql-agent job owner {}", dir.job_id()),
            "--property=Type=exec".into(),
            format!("--property=After={AGENT_UNIT}"),
            // SIGTERM to the owner alone (it stops the job, records it, exits); what is left
            // after TimeoutStopSec gets SIGKILL.
            "--property=KillMode=mixed".into(),
            format!(
                "--property=TimeoutStopSec={}",
                stop_timeout.as_secs().max(1)
            ),
            "--property=SyslogIdentifier=rsql-job-owner".into(),
            // The unit's cgroup is the job's (see `cgroup`): the owner may make sub-cgroups
            // in it, with every controller, and memory and CPU are accounted per job.
            "--property=Delegate=yes".into(),
            "--property=MemoryAccounting=yes".into(),
            "--property=CPUAccounting=yes".into(),
        ];
        if let Some(user) = user {
            argv.push(format!("--uid={user}"));
        }
        for (name, value) in env {
            argv.push(format!("--setenv={name}={value}"));
        }
        argv.push("--".into());
        argv.push(program.display().to_string());
        argv.push("--job-dir".into());
        argv.push(dir.path().display().to_string());
        argv
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
    let mut command = Command::new(program);
    command
        .arg("--job-dir")
        .arg(dir.path())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(spawn_error)?)
        .stderr(log);
    let detach = || -> io::Result<()> {
        // In the forked child, before exec: a session of its own (no terminal, no process
        // group shared with the agent), then fork again so the owner is nobody's child that
        // the agent would have to reap. The middle process exits at once; std's exec-error
        // pipe is close-on-exec, so an exec failure of the grandchild still reaches the
        // caller.
        nix::unistd::setsid().map_err(io::Error::from)?;
        // SAFETY: fork in a single-threaded child between fork and exec; the parent branch
        // only calls _exit, which is async-signal-safe.
        match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
            nix::unistd::ForkResult::Parent { .. } => {
                // SAFETY: _exit ends the middle process without running any Rust code.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Child => Ok(()),
        }
    };
    // SAFETY: the closure calls only setsid, fork and _exit, all async-signal-safe, and
    // allocates nothing, as code between fork and exec in a multi-threaded process must.
    unsafe {
        command.pre_exec(detach);
    }
    let mut middle = command.spawn().map_err(spawn_error)?;
    // The middle process exits as soon as it has forked.
    middle.wait().map_err(spawn_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_units_go_in_the_jobs_slice_after_the_agent_as_the_agents_user() {
        let launcher = Launcher::Systemd {
            user: Some("rsql".into()),
            stop_timeout: Duration::from_secs(60),
        };
        let dir = JobDir::new("/var/lib/rsql-agent/owners/abc-1");
        let argv = launcher.systemd_run_argv(
            Path::new("/usr/libexec/rsql-agent/rsql-job-owner"),
            &dir,
            &[("PATH".into(), "/usr/bin".into())],
        );
        for want in [
            "--unit=rsql-job-abc-1",
            "--slice=rsql-jobs.slice",
            "--property=After=rsql-agent.service",
            "--property=KillMode=mixed",
            "--property=TimeoutStopSec=60",
            "--property=Delegate=yes",
            "--property=MemoryAccounting=yes",
            "--property=CPUAccounting=yes",
            "--uid=rsql",
            "--setenv=PATH=/usr/bin",
        ] {
            assert!(
                argv.iter().any(|a| a == want),
                "{want} missing from {argv:?}"
            );
        }
        let tail: Vec<&str> = argv[argv.len() - 4..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "--",
                "/usr/libexec/rsql-agent/rsql-job-owner",
                "--job-dir",
                "/var/lib/rsql-agent/owners/abc-1"
            ]
        );
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
            user: None,
            stop_timeout: Duration::from_secs(60),
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
        assert_eq!(
            Launcher::choose(LauncherChoice::Direct, Duration::from_secs(1)),
            Launcher::Direct
        );
    }
}
