//! A job's life belongs to its own owner process, not to the agent.
//!
//! Each job the daemon runs gets a small owner process, `rsql-job-owner` (a "shim", as
//! containerd-shim and conmon are for containers). The owner is started detached from the
//! agent (its own session, or its own systemd unit) and:
//! - is a child subreaper, and runs the job through the same [`crate::supervisor`] as
//!   everything else: its own process group, pipes into the timestamped job log, the timeout
//!   (SIGTERM, `kill_grace`, SIGKILL), and the sweep of every descendant at the end;
//! - holds the job's fleet lock. The agent takes the lock and decides to run, then hands the
//!   locked open file description over (`SCM_RIGHTS`), and every process of the job inherits
//!   it too: the lock lives exactly as long as any process of the job, even when the owner
//!   itself is SIGKILLed;
//! - renews the lock's lease while the job runs, so the fleet can see the job is alive while
//!   no agent runs on its host;
//! - when the job has ended: writes a durable exit record ([`ExitRecord`]), records the
//!   outcome in the lock state so any agent of the fleet can replay it, releases the lock, and
//!   exits.
//!
//! The agent and the owner share a directory per job, `state_dir/owners/<job id>/`:
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `job.json` | agent, before the launch | [`JobFile`]: what to run, the task token, the SQS receipt |
//! | `owner.json` | owner | [`OwnerRecord`]: its pid and start time, the job's pid |
//! | `owner.sock` | owner | the control socket ([`Request`] / [`Reply`], one JSON line each) |
//! | `exit.json` | owner | [`ExitRecord`]: how the job ended and its classified outcome |
//! | `owner.log` | owner (direct launch) | the owner's own diagnostics |
//!
//! Everything in the directory carries [`PROTOCOL`], so an agent can adopt an owner started
//! by an older version. The secret part of the job's environment (the database password)
//! never touches the disk: it travels with the lock in the start request.
//!
//! Owns: those files, the protocol, the owner process ([`shim`]) and what it agrees on with
//! its launchers ([`activation`]). The launchers and the agent's side of the conversation
//! are the agent's (`job_owner/launch`, `job_owner/client`). Must not touch: Step
//! Functions, SQS or the audit; the daemon reports what the owner recorded.

pub mod activation;
pub mod shim;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{self, Durability};
use crate::stop::StopReason;

/// The version of the files and the control protocol. An agent reads every version up to
/// its own; an owner refuses a job file newer than itself.
pub const PROTOCOL: u32 = 1;

/// `state_dir/owners`: one directory per job handed to an owner process.
pub const OWNERS_DIR: &str = "owners";

const JOB_FILE: &str = "job.json";
const OWNER_FILE: &str = "owner.json";
const EXIT_FILE: &str = "exit.json";
const SOCKET_FILE: &str = "owner.sock";
const LOG_FILE: &str = "owner.log";
/// An empty file: the job ended, and its owner could record its outcome nowhere (no exit
/// record, no lock state). Empty, so that a full filesystem can still hold it.
const LOST_FILE: &str = "exit.lost";

#[derive(Debug, thiserror::Error)]
pub enum JobDirError {
    #[error("cannot create the job owner directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid record")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has protocol {found}; this program speaks up to {PROTOCOL}")]
    Protocol { path: PathBuf, found: u32 },
    #[error(
        "{path} is larger than {MAX_RECORD_BYTES} bytes, more than any record the agent \
         writes; it is not read"
    )]
    TooLarge { path: PathBuf },
}

/// The largest `job.json`, `owner.json` or `exit.json` read: the biggest holds a job's
/// success output (at most 256 KiB) or its environment; a bigger file was not written by an
/// agent, and reading it whole would let it take the agent's memory.
pub const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Where an SQS job came from, so whichever agent watches the job can keep its message
/// hidden and delete it at the end (receipt handles stay valid across processes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqsReceipt {
    pub queue_url: String,
    pub receipt_handle: String,
    pub message_id: String,
    pub receive_count: u32,
    /// The message's `SentTimestamp` (ms since the epoch), for the job's queue wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at_ms: Option<u64>,
}

/// How the job's processes are started: the parts of [`crate::supervisor::Launch`] that are
/// not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchPlan {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// The job's own variables that are not secret (`RSQL_JOB_NAME` and the like).
    pub env: Vec<(String, String)>,
    /// The agent's `PATH`, `HOME`, `LANG`... (`supervisor::INHERITED_ENV`), since the owner
    /// may run with systemd's environment rather than the agent's.
    pub inherited_env: Vec<(String, String)>,
    pub timeout_ms: u64,
    pub kill_grace_ms: u64,
    pub pipe_drain_ms: u64,
    /// The marker id of the attempt (`supervisor::JOB_ID_ENV`); also the directory's name.
    pub job_id: String,
    /// The job's own cgroup, where the host offers one (see `cgroup`); `None` (and in the
    /// files of agents that predate it): the process group and marker sweep only.
    #[serde(default)]
    pub cgroup: Option<crate::cgroup::CgroupPlan>,
    /// The unprivileged user the owner runs the job as (`[jobs] user`); `None` (and in the
    /// files of agents that predate it): the owner's own user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<crate::supervisor::JobUser>,
}

/// `job.json`: everything the owner needs to run the job, and everything a later agent needs
/// to watch and report it. Holds the task token, so the directory is private (0700).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFile {
    pub protocol: u32,
    pub job_name: String,
    pub workflow_id: String,
    pub workflow_execution_id: String,
    pub lock_key: String,
    pub lock_dir: PathBuf,
    pub task_token: String,
    pub token_hash: String,
    pub attempt: u32,
    pub instance_id: String,
    /// The job's `heartbeat_seconds`, for the heartbeat tick.
    pub heartbeat_ms: Option<u64>,
    /// How often the owner renews the lock's lease.
    pub lease_interval_ms: u64,
    pub ssm_command_id: Option<String>,
    pub sqs: Option<SqsReceipt>,
    pub log_file: PathBuf,
    pub log_group: Option<String>,
    pub log_stream: Option<String>,
    /// The outbox entry id the outcome is stored under, fixed in advance so that storing it
    /// twice (a crash between storing and clean-up) replaces rather than repeats it.
    pub outbox_id: String,
    /// When the attempt started (RFC 3339), for the audit.
    pub started_at: String,
    pub launch: LaunchPlan,
}

// Hand-written: the task token is a credential.
impl std::fmt::Debug for JobFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobFile")
            .field("protocol", &self.protocol)
            .field("job_name", &self.job_name)
            .field("workflow_execution_id", &self.workflow_execution_id)
            .field("token_hash", &self.token_hash)
            .field("attempt", &self.attempt)
            .field("job_id", &self.launch.job_id)
            .finish_non_exhaustive()
    }
}

/// `owner.json`: who the owner is. A process is identified by pid and start time, never by a
/// bare pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub protocol: u32,
    pub pid: i32,
    pub start_time: u64,
    pub boot_id: String,
    /// The job's leader, once started.
    #[serde(default)]
    pub job_pid: Option<u32>,
    /// The job's payload cgroup, once set up: where an agent finds what is left of the job
    /// if this owner dies.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

impl OwnerRecord {
    /// Whether this owner process is still running (same pid, same start time).
    pub fn is_alive(&self) -> bool {
        crate::supervisor::process_start_time(self.pid) == Some(self.start_time)
    }
}

/// `exit.json`: how the job ended, written durably before the lock state and the unlock.
/// The same record goes to every agent connected at the end, in the owner's last [`Reply`],
/// so a watching agent knows the outcome even when the file could not be written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub protocol: u32,
    /// The classified outcome (`outcome::Outcome`), as sent to Step Functions.
    pub outcome: serde_json::Value,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: String,
    pub ended_at: String,
    pub duration_ms: u64,
    pub stray_processes_killed: usize,
    pub pipes_forced_closed: bool,
}

/// A request on the control socket. One JSON object per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The first request, with the lock's descriptor attached: start the job. `env` is the
    /// secret part of its environment.
    Start { v: u32, env: Vec<(String, String)> },
    /// Stop the job: SIGTERM to its group, `kill_grace`, SIGKILL. A second stop kills it.
    Stop { v: u32, reason: StopReason },
    /// Is it running? Answered with the job's pid.
    Status { v: u32 },
}

/// The owner's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub ok: bool,
    #[serde(default)]
    pub job_pid: Option<u32>,
    #[serde(default)]
    pub error: Option<String>,
    /// Set in the owner's last line on each open connection, once the job has ended: its
    /// exit record (older owners close the connection without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitRecord>,
}

/// One job's directory under `state_dir/owners`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDir {
    path: PathBuf,
}

impl JobDir {
    pub fn new(path: impl Into<PathBuf>) -> JobDir {
        JobDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The job id (the directory's name).
    pub fn job_id(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn socket(&self) -> PathBuf {
        self.path.join(SOCKET_FILE)
    }

    pub fn log(&self) -> PathBuf {
        self.path.join(LOG_FILE)
    }

    pub fn exit_path(&self) -> PathBuf {
        self.path.join(EXIT_FILE)
    }

    pub fn read_job(&self) -> Result<JobFile, JobDirError> {
        let job: JobFile =
            read_json(&self.path.join(JOB_FILE))?.ok_or_else(|| JobDirError::Read {
                path: self.path.join(JOB_FILE),
                source: io::Error::from(io::ErrorKind::NotFound),
            })?;
        if job.protocol > PROTOCOL {
            return Err(JobDirError::Protocol {
                path: self.path.join(JOB_FILE),
                found: job.protocol,
            });
        }
        Ok(job)
    }

    /// Durable: after a crash of the host it is the one record of the job's token and
    /// message, from which the next agent reports the job (`Rsql.Interrupted`).
    pub fn write_job(&self, job: &JobFile) -> Result<(), JobDirError> {
        write_json(&self.path.join(JOB_FILE), job, Durability::Durable)
    }

    pub fn read_owner(&self) -> Result<Option<OwnerRecord>, JobDirError> {
        read_json(&self.path.join(OWNER_FILE))
    }

    /// Not fsynced: the record names a process of this boot (pid, start time, boot id).
    /// After a crash the owner is gone whatever the file says, and a missing `owner.json`
    /// reads as an owner that is not running, which is then the truth.
    pub fn write_owner(&self, owner: &OwnerRecord) -> Result<(), JobDirError> {
        write_json(&self.path.join(OWNER_FILE), owner, Durability::ThisBoot)
    }

    pub fn read_exit(&self) -> Result<Option<ExitRecord>, JobDirError> {
        read_json(&self.path.join(EXIT_FILE))
    }

    /// `durability`: [`Durability::ThisBoot`] once the lock state holds the same outcome
    /// durably (the next agent falls back to it after a crash), [`Durability::Durable`]
    /// where the exit record is the only record.
    pub fn write_exit(&self, exit: &ExitRecord, durability: Durability) -> Result<(), JobDirError> {
        write_json(&self.path.join(EXIT_FILE), exit, durability)
    }

    /// Marks the job as ended with its outcome recorded nowhere (see [`JobDir::outcome_lost`]).
    pub fn mark_outcome_lost(&self) -> Result<(), JobDirError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path.join(LOST_FILE);
        std::fs::OpenOptions::new()
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map(drop)
            .map_err(|source| JobDirError::Write { path, source })
    }

    /// Whether the owner said the job ended but its outcome could be recorded nowhere.
    pub fn outcome_lost(&self) -> bool {
        self.path.join(LOST_FILE).exists()
    }

    /// Removes the directory once the job is reported (best effort: a leftover is reported
    /// again after a restart, which the outbox id makes harmless).
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a finished job's owner directory");
            }
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, JobDirError> {
    let bytes = match read_bounded(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
            return Err(JobDirError::TooLarge {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(JobDirError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| JobDirError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads at most [`MAX_RECORD_BYTES`] of the regular file `path`, never through a symlink;
/// a longer file is [`io::ErrorKind::FileTooLarge`].
fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    fsutil::read_bounded(path, MAX_RECORD_BYTES)
}

fn write_json<T: Serialize>(
    path: &Path,
    value: &T,
    durability: Durability,
) -> Result<(), JobDirError> {
    let bytes = serde_json::to_vec(value).map_err(|source| JobDirError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    fsutil::write_replacing(path, &bytes, 0o600, durability).map_err(|source| JobDirError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// How long the agent waits for a dead owner's job cgroup to empty once it is killed.
const LEFTOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Kills what is left of the job of `dir`, whose owner died: everything in its cgroup (as
/// `owner.json` names it, once [`crate::cgroup::check_job_payload`] found it to be this
/// job's cgroup under `cgroup_parent` or the job's unit), then every process still carrying
/// its marker (a job without a cgroup, or one its owner had not set up yet). Returns how
/// many it killed.
pub fn kill_leftovers(dir: &JobDir, cgroup_parent: Option<&Path>) -> usize {
    let job_id = dir.job_id();
    let payload = dir
        .read_owner()
        .ok()
        .flatten()
        .and_then(|owner| owner.cgroup);
    let in_cgroup = match payload.map(|p| {
        crate::cgroup::check_job_payload(
            &p,
            &job_id,
            cgroup_parent,
            activation::SLICE,
            activation::UNIT_PREFIX,
        )
    }) {
        None => 0,
        Some(Ok(payload)) => crate::cgroup::kill_leftovers(&payload, LEFTOVER_WAIT),
        Some(Err(e)) => {
            tracing::error!(error = %crate::error_chain(&e), "the job's owner record names a cgroup that is not the job's");
            0
        }
    };
    in_cgroup + crate::supervisor::kill_job_processes(&job_id)
}

/// This host's boot id, which tells a pid from before a reboot apart from one after it.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_each_with_their_version() {
        let start = Request::Start {
            v: PROTOCOL,
            env: vec![("RSPASSWORD".into(), "x".into())],
        };
        let text = serde_json::to_string(&start).expect("serialize");
        assert!(text.starts_with("{\"op\":\"start\",\"v\":1"), "{text}");
        assert!(!text.contains('\n'));
        let stop: Request =
            serde_json::from_str(r#"{"op":"stop","v":1,"reason":"cancelled"}"#).expect("parse");
        assert_eq!(
            stop,
            Request::Stop {
                v: 1,
                reason: StopReason::Cancelled
            }
        );
    }

    fn sample_job(protocol: u32) -> JobFile {
        JobFile {
            protocol,
            job_name: "load.sh".into(),
            workflow_id: "wf".into(),
            workflow_execution_id: "ex-1".into(),
            lock_key: "ex-1/load.sh".into(),
            lock_dir: "/locks".into(),
            task_token: "secret-token".into(),
            token_hash: "abcd".into(),
            attempt: 1,
            instance_id: "i-1".into(),
            heartbeat_ms: Some(60_000),
            lease_interval_ms: 20_000,
            ssm_command_id: None,
            sqs: None,
            log_file: "/logs/x.log".into(),
            log_group: None,
            log_stream: None,
            outbox_id: "0000000000001-0000000000000001".into(),
            started_at: "2026-11-30T00:00:00.000Z".into(),
            launch: LaunchPlan {
                program: "/bin/true".into(),
                args: vec![],
                cwd: "/".into(),
                env: vec![],
                inherited_env: vec![],
                timeout_ms: 1000,
                kill_grace_ms: 1000,
                pipe_drain_ms: 1000,
                job_id: "abc-1".into(),
                cgroup: Some(crate::cgroup::CgroupPlan {
                    placement: crate::cgroup::Placement::Under {
                        parent: "/sys/fs/cgroup/rsql-jobs".into(),
                    },
                    memory_max: Some(1 << 30),
                }),
                user: Some(crate::supervisor::JobUser {
                    name: "rsql-job".into(),
                    uid: 990,
                    gid: 990,
                    groups: vec![990],
                    home: "/var/lib/rsql-job".into(),
                }),
            },
        }
    }

    #[test]
    fn a_job_file_reads_back_and_one_from_a_newer_agent_is_refused_by_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let job_dir = JobDir::new(dir.path());
        job_dir.write_job(&sample_job(PROTOCOL)).expect("write");
        assert_eq!(job_dir.read_job().expect("read"), sample_job(PROTOCOL));
        job_dir
            .write_job(&sample_job(PROTOCOL + 1))
            .expect("write newer");
        let err = job_dir.read_job().expect_err("refused");
        assert!(
            matches!(err, JobDirError::Protocol { found, .. } if found == PROTOCOL + 1),
            "{err}"
        );
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let shown = format!("{:?}", sample_job(PROTOCOL));
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(shown.contains("abcd"), "{shown}");
    }

    #[test]
    fn an_oversize_or_symlinked_record_is_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let job_dir = JobDir::new(dir.path());
        let exit = std::fs::File::create(job_dir.exit_path()).expect("create");
        exit.set_len(MAX_RECORD_BYTES + 1).expect("grow");
        let err = job_dir.read_exit().expect_err("oversize");
        assert!(matches!(err, JobDirError::TooLarge { .. }), "{err}");
        std::fs::write(dir.path().join("elsewhere"), b"{}").expect("write");
        std::os::unix::fs::symlink("elsewhere", dir.path().join(OWNER_FILE)).expect("symlink");
        assert!(job_dir.read_owner().is_err());
    }

    #[test]
    fn a_dead_owner_is_not_alive_even_if_its_pid_is_reused() {
        let me = std::process::id() as i32;
        let start = crate::supervisor::process_start_time(me).expect("own start time");
        let alive = OwnerRecord {
            protocol: PROTOCOL,
            pid: me,
            start_time: start,
            boot_id: boot_id(),
            job_pid: None,
            cgroup: None,
        };
        assert!(alive.is_alive());
        let reused = OwnerRecord {
            start_time: start + 1,
            ..alive
        };
        assert!(!reused.is_alive());
    }
}
