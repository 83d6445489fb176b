//! Runs one job as a supervised child process and says how it ended.
//!
//! Owns: spawning (argv, never a shell; stdin `/dev/null`; a mostly clean environment), the
//! child's process group, the timeout and stop sequence (SIGTERM to the group, `kill_grace`,
//! SIGKILL), draining stdout and stderr into the [`JobLog`] while all that happens, killing
//! whatever is left of the job once its leader exits (escaped descendants included), reaping
//! the orphans that come to the agent as a child subreaper, and classifying the ending.
//!
//! Must not touch: where a job came from or where its result goes (SQS, Step Functions,
//! workflows, locks, audit). Callers build a [`Launch`] and read a [`RunOutcome`].
//!
//! # How a job runs
//!
//! - The child is forked by one long-lived thread (see `spawner`) so `PR_SET_PDEATHSIG`
//!   (SIGKILL) means "the agent died", not "some tokio thread retired". It runs in its own
//!   process group (`setpgid(0, 0)`), and its environment carries
//!   `RSQL_AGENT_JOB_ID=<job id>` so descendants that leave the group can still be found.
//! - One task per job runs a single `select!` loop over: the child's exit, reads from both
//!   pipes, stop requests, the timeout / kill deadline, and hand-off of read chunks to the
//!   log writer. Signalling therefore never stops the draining: a chatty child cannot block
//!   on a full pipe while it is being killed.
//! - The log writer runs on a blocking thread behind a small bounded queue, so a slow disk
//!   can only slow the child down (its pipe fills) and can never stall the timers.
//! - When the leader exits, the whole group gets SIGKILL, /proc is swept for processes
//!   carrying the job's marker (those are killed and counted as strays), and the pipes are
//!   read for at most `pipe_drain` more; a grandchild that still holds them open after that
//!   cannot hold the job (`pipes_forced_closed`).
//! - With a cgroup of its own ([`Launch::cgroup`], set up by the job's owner process), the
//!   job's first process moves into it before exec. SIGKILL, at the kill grace or at the
//!   end, is also `cgroup.kill`, which no descendant escapes, marker or not; the job has
//!   ended when the cgroup is empty, and what it used ([`RunOutcome::usage`]) is read then.
//!   Its members replace the /proc search for the marker.
//! - The agent is a child subreaper, so killed descendants become its zombies. It reaps only
//!   pids it knows belong to a job (group members and marker carriers, remembered with their
//!   start times), never with `waitpid(-1)`, and never a leader tokio is still waiting for.
//! - `PR_SET_PDEATHSIG` takes only the leader with a SIGKILLed agent. Every job also carries
//!   its agent's identity ([`SUPERVISOR_ENV`]), and [`Supervisor::new`] kills processes whose
//!   agent is gone, so a restarted agent finishes what the dead one could not.
//! - The job's environment is [`INHERITED_ENV`] from the agent, then [`Launch::env`], then
//!   the two markers. Values are never logged.
//!
//! Dropping the [`JobHandle`] (or its `wait` future) before the outcome is delivered stops
//! the job as [`StopReason::Interrupted`]: a job nobody is waiting for must not run on.

mod blocking;
mod launch;
mod output;
mod procs;
mod spawner;
mod termination;
pub mod user;

pub use blocking::{child_signals, millis_until, BlockingJob};
pub use launch::{command_for_script, spawn_detail, Launch};

use launch::build_command;
use output::{finish_log, hand_over, write_log, Chunk, Output, Pipe};
pub use spawner::SpawnerError;
use termination::{classify, on_deadline, on_stop_request, signal_group, Termination};
pub use user::{JobUser, JobUserError};

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cgroup::{Payload, Usage};
use crate::joblog::{JobLog, Stream};
use crate::stop::{self, StopReason, StopReceiver, StopRequests, StopSender};

/// The environment variable that marks every process of a job.
pub const JOB_ID_ENV: &str = "RSQL_AGENT_JOB_ID";

/// The environment variable naming the agent process (`<pid>:<start time>`) that started a
/// job, so that a later agent can kill what is left of jobs whose agent died.
pub const SUPERVISOR_ENV: &str = "RSQL_AGENT_SUPERVISOR";

/// Variables copied from the agent's own environment into every job's; everything else is
/// dropped (the agent's AWS credentials, for one), and [`Launch::env`] adds the rest.
pub const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR",
];

/// `PATH` for jobs when the agent has none (systemd gives services one, but be safe).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Default for [`Launch::pipe_drain`].
pub const DEFAULT_PIPE_DRAIN: Duration = Duration::from_secs(2);

/// Size of one read from a pipe, and so of one chunk handed to the log writer.
const READ_CHUNK: usize = 64 * 1024;

/// Chunks queued for the log writer. With [`READ_CHUNK`] this bounds the queue at 512 KiB a
/// job; past that the pipes are not read and the child waits, as the log is the buffer.
const LOG_QUEUE: usize = 8;

/// How often /proc is searched for the job's marker while it runs, so descendants that leave
/// the group and later exit can still be reaped.
const CENSUS_INTERVAL: Duration = Duration::from_secs(5);

/// How long the end-of-job sweep waits for killed processes to die and be reaped before it
/// leaves the rest to a later sweep.
const REAP_WAIT: Duration = Duration::from_secs(1);

/// How long the end-of-job sweep waits for a killed job's cgroup to empty before it reports
/// the job anyway (a process in uninterruptible sleep, on a hung NFS mount say, dies only
/// when the kernel lets it).
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(10);

/// After the drain bound, how long the last queued chunks, the sweep and the final fsync may
/// still take before the outcome is delivered regardless (a wedged disk must not wedge the
/// agent's reporting).
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot make this process a child subreaper")]
    Subreaper(#[source] Errno),
    #[error("the job spawner thread failed")]
    Spawner(#[source] SpawnerError),
    #[error("Supervisor::start must be called from within a tokio runtime")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    #[error("invalid environment variable name {name:?}")]
    InvalidEnvName { name: String },
    #[error("the job id must be non-empty and free of NUL bytes")]
    InvalidJobId,
    #[error("cannot start {program}{detail} (log {log_path})")]
    Spawn {
        program: PathBuf,
        /// What the OS error means here, when the error alone would mislead (see
        /// [`spawn_detail`]); empty otherwise.
        detail: String,
        log_path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot learn the exit status of job {job_id} (pid {pid})")]
    Wait {
        job_id: String,
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("the task supervising job {job_id} ended without a result")]
    SupervisionLost { job_id: String },
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The leader exited on its own with this code.
    Exited { code: i32 },
    /// Killed by a signal the agent did not send (`kill -9` from outside, the OOM killer,
    /// a crash, or the script signalling itself).
    Signaled { signal: i32 },
    /// The agent killed it after `timeout`; `signal` is the signal that ended it (or, if it
    /// exited on its own after SIGTERM, the last one the agent sent).
    TimedOut { signal: i32 },
    /// The agent stopped it on request; `signal` as for `TimedOut`.
    Stopped {
        reason: StopReason,
        signal: Option<i32>,
    },
}

impl Ending {
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Ending::Exited { code } => Some(*code),
            _ => None,
        }
    }

    pub fn signal(&self) -> Option<i32> {
        match self {
            Ending::Exited { .. } => None,
            Ending::Signaled { signal } | Ending::TimedOut { signal } => Some(*signal),
            Ending::Stopped { signal, .. } => *signal,
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(self, Ending::Exited { code: 0 })
    }
}

/// What happened to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub ending: Ending,
    pub pid: u32,
    pub started_at: SystemTime,
    /// When the leader exited (draining and sweeping after that are not the job's time).
    pub ended_at: SystemTime,
    pub duration: Duration,
    pub log_path: PathBuf,
    /// Processes that had left the job's process group (setsid and the like) and were
    /// killed after the leader exited.
    pub stray_processes_killed: usize,
    /// Something still held stdout or stderr open `pipe_drain` after the leader exited and
    /// everything findable was killed; the agent stopped reading.
    pub pipes_forced_closed: bool,
    /// What the job used, from its cgroup; all `None` without one.
    pub usage: Usage,
    /// Every byte the job printed reached its log file (false: a write failed, a full disk
    /// most often, or the writer did not finish in time).
    pub log_complete: bool,
}

/// Runs jobs. One per process: it makes the process a child subreaper.
#[derive(Debug)]
pub struct Supervisor {
    _private: (),
}

impl Supervisor {
    /// Makes this process a child subreaper (orphaned job descendants are re-parented to
    /// it rather than to init, so they can be found and reaped) and starts the spawner
    /// thread. Also kills what is left of jobs whose agent died (see
    /// [`Supervisor::kill_orphaned_jobs`]), so that after an agent is SIGKILLed and
    /// restarted none of its jobs' processes live on.
    pub fn new() -> Result<Arc<Supervisor>, SupervisorError> {
        nix::sys::prctl::set_child_subreaper(true).map_err(SupervisorError::Subreaper)?;
        spawner::ensure_started().map_err(SupervisorError::Spawner)?;
        let supervisor = Arc::new(Supervisor { _private: () });
        supervisor.kill_orphaned_jobs();
        Ok(supervisor)
    }

    /// For a job's owner process (`rsql-job-owner`), which runs one job: a child subreaper
    /// and the spawner, without the sweep of other agents' orphans that [`Supervisor::new`]
    /// does (the agent does that; each owner doing it again would walk /proc per job).
    pub fn for_one_job() -> Result<Arc<Supervisor>, SupervisorError> {
        nix::sys::prctl::set_child_subreaper(true).map_err(SupervisorError::Subreaper)?;
        spawner::ensure_started().map_err(SupervisorError::Spawner)?;
        Ok(Arc::new(Supervisor { _private: () }))
    }

    /// Kills the processes of jobs started by an agent process that no longer exists (each
    /// job carries [`SUPERVISOR_ENV`]). `PR_SET_PDEATHSIG` takes a job's leader with a
    /// SIGKILLed agent, but not the leader's children. Jobs of live agents are left alone.
    /// Returns how many processes were killed.
    pub fn kill_orphaned_jobs(&self) -> usize {
        let killed = procs::kill_orphaned_jobs();
        if killed > 0 {
            tracing::warn!(
                killed,
                "killed processes left by jobs of an agent that died"
            );
        }
        killed
    }

    /// Starts a job and returns at once (after the fork and exec). Must be called from
    /// within a tokio runtime, which then runs the job's supervising task.
    ///
    /// On error the job never started; the log file exists but holds nothing.
    pub fn start(self: &Arc<Self>, launch: Launch) -> Result<JobHandle, SupervisorError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(SupervisorError::NoRuntime)?;
        validate(&launch)?;
        let command = build_command(&launch);
        let log_path = launch.log.path().to_path_buf();
        // Taken before the fork: on a busy host the spawner's reply can come after a quick
        // job has already ended, and its duration must not come out as zero.
        let started = Instant::now();
        let started_at = SystemTime::now();
        let child = spawner::spawn(command, runtime.clone()).map_err(|e| match e {
            spawner::SpawnerError::Spawn(source) => SupervisorError::Spawn {
                detail: spawn_detail(&launch.program, &source),
                program: launch.program.clone(),
                log_path: log_path.clone(),
                source,
            },
            other => SupervisorError::Spawner(other),
        })?;
        let Some(pid) = child.id() else {
            // tokio gives no pid only once it has reaped the child, which cannot have
            // happened yet; treat it as a failed spawn rather than guess.
            return Err(SupervisorError::Spawn {
                program: launch.program.clone(),
                detail: String::new(),
                log_path,
                source: io::Error::other("the child has no pid"),
            });
        };
        log_started(&launch, pid);
        let (stopper, stop_rx) = stop::channel();
        let (result_tx, result_rx) = oneshot::channel();
        let job = Job::of(&launch, pid, started, started_at);
        let job_id = job.job_id.clone();
        runtime.spawn(supervise(job, child, launch.log, stop_rx, result_tx));
        Ok(JobHandle {
            pid,
            job_id,
            log_path,
            stopper,
            outcome: result_rx,
        })
    }

    /// Reaps orphans of earlier jobs that were still dying when their job ended. Every job
    /// end does this too; a daemon may also call it now and then. Returns how many are
    /// still not reaped.
    pub fn reap_orphans(&self) -> usize {
        procs::reap_pending()
    }
}

/// The log line of a job just started, the same from both supervisors.
fn log_started(launch: &Launch, pid: u32) {
    tracing::info!(
        job_id = %launch.job_id,
        pid,
        pgid = pid,
        program = %launch.program.display(),
        args = launch.args.len(),
        timeout = ?launch.timeout,
        "job started"
    );
}

/// A job id and environment names the child can be given.
fn validate(launch: &Launch) -> Result<(), SupervisorError> {
    if launch.job_id.is_empty() || launch.job_id.contains('\0') {
        return Err(SupervisorError::InvalidJobId);
    }
    for (name, _) in &launch.env {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(SupervisorError::InvalidEnvName { name: name.clone() });
        }
    }
    Ok(())
}

/// Kills processes of jobs whose supervising process is gone (see
/// [`Supervisor::kill_orphaned_jobs`]), without being a supervisor: the agent calls it when a
/// job's owner process died, and at start. Returns how many were killed.
pub fn kill_orphaned_jobs() -> usize {
    procs::kill_orphaned_jobs()
}

/// SIGKILLs every live process carrying the marker of job `job_id` ([`JOB_ID_ENV`]), for a
/// job whose owner died. Returns how many it signalled.
pub fn kill_job_processes(job_id: &str) -> usize {
    let marker = format!("{JOB_ID_ENV}={job_id}").into_bytes();
    let found = procs::census(&marker);
    for (&pid, &start) in &found {
        // Still the process the census saw (not a reused pid).
        if procs::read_stat(pid).is_some_and(|s| s.start_time == start) {
            tracing::warn!(
                pid,
                job_id,
                "killing a process of a job whose owner is gone"
            );
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    found.len()
}

/// The kernel's start time of `pid` (field 22 of `/proc/PID/stat`), which tells a live
/// process from a later one that reused its pid; `None` when there is no such process or it
/// is a zombie.
pub fn process_start_time(pid: i32) -> Option<u64> {
    procs::read_stat(pid)
        .filter(|s| s.state != b'Z' && s.state != b'X')
        .map(|s| s.start_time)
}

/// A running job.
#[derive(Debug)]
pub struct JobHandle {
    pid: u32,
    job_id: String,
    log_path: PathBuf,
    stopper: StopSender,
    outcome: oneshot::Receiver<Result<RunOutcome, SupervisorError>>,
}

impl JobHandle {
    /// The leader's pid, which is also the job's process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// See [`StopSender::stop`]: the first request stops the job gracefully (SIGTERM to its
    /// process group, `kill_grace`, SIGKILL), any later one kills it.
    pub fn stop(&self, reason: StopReason) {
        self.stopper.stop(reason);
    }

    /// A handle that can stop the job while `wait` is being awaited.
    pub fn stopper(&self) -> StopSender {
        self.stopper.clone()
    }

    /// Waits until the job has ended and everything of it is gone. The future may be
    /// polled from `select!` by `&mut`; dropping it before it completes stops the job.
    pub async fn wait(self) -> Result<RunOutcome, SupervisorError> {
        match self.outcome.await {
            Ok(result) => result,
            Err(_) => Err(SupervisorError::SupervisionLost {
                job_id: self.job_id,
            }),
        }
    }
}

/// What the supervising task needs to know about its job.
#[derive(Debug)]
struct Job {
    job_id: String,
    pid: u32,
    started: Instant,
    started_at: SystemTime,
    timeout: Duration,
    kill_grace: Duration,
    pipe_drain: Duration,
    log_path: PathBuf,
    cgroup: Option<Payload>,
}

impl Job {
    /// What supervision needs of `launch`, for its leader `pid` started at `started`.
    fn of(launch: &Launch, pid: u32, started: Instant, started_at: SystemTime) -> Job {
        Job {
            job_id: launch.job_id.clone(),
            pid,
            started,
            started_at,
            timeout: launch.timeout,
            kill_grace: launch.kill_grace,
            pipe_drain: launch.pipe_drain,
            log_path: launch.log.path().to_path_buf(),
            cgroup: launch.cgroup.clone(),
        }
    }

    /// SIGKILL to the job's process group and, with a cgroup, to every process in it.
    fn kill_all(&self, pgid: i32) {
        signal_group(&self.job_id, pgid, Signal::SIGKILL);
        if let Some(cgroup) = &self.cgroup {
            if let Err(e) = cgroup.kill() {
                tracing::warn!(job_id = %self.job_id, cgroup = %cgroup.path().display(), error = %e, "cannot kill the job's cgroup");
            }
        }
    }

    /// Looks for the job's live processes in the background (to reap them later): its
    /// cgroup's members, or the carriers of its marker.
    fn census(&self, marker: &[u8]) -> JoinHandle<HashMap<i32, u64>> {
        match &self.cgroup {
            Some(cgroup) => {
                let cgroup = cgroup.clone();
                tokio::task::spawn_blocking(move || procs::census_pids(cgroup.pids()))
            }
            None => {
                let marker = marker.to_vec();
                tokio::task::spawn_blocking(move || procs::census(&marker))
            }
        }
    }

    /// Kills and reaps everything left of the job once its leader has exited, in the
    /// background: through its cgroup (and its end is when that is empty), or by group and
    /// marker.
    fn sweep(&self, marker: Vec<u8>, known: HashMap<i32, u64>) -> JoinHandle<procs::Sweep> {
        let pgid = self.pid as i32;
        match &self.cgroup {
            Some(cgroup) => {
                let cgroup = cgroup.clone();
                tokio::task::spawn_blocking(move || {
                    procs::sweep_cgroup(&cgroup, pgid, known, REAP_WAIT, CGROUP_EMPTY_WAIT)
                })
            }
            None => tokio::task::spawn_blocking(move || {
                procs::sweep(&marker, pgid, pgid, known, REAP_WAIT)
            }),
        }
    }
}

/// Kills the job's process group (and cgroup) if the supervising task is dropped before it
/// finished (runtime shutdown, panic): nothing of a job may outlive its supervision.
struct GroupGuard {
    pgid: i32,
    cgroup: Option<Payload>,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
            if let Some(cgroup) = &self.cgroup {
                let _ = cgroup.kill();
            }
        }
    }
}

/// Awaits a background task if there is one; never completes otherwise.
async fn join_running<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task.as_mut() {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// The supervising task of one job: phase 1 until the leader exits, phase 2 until nothing
/// of the job is left and its log is complete, then the outcome.
async fn supervise(
    job: Job,
    mut child: tokio::process::Child,
    log: JobLog,
    mut stop_rx: StopReceiver,
    mut result_tx: oneshot::Sender<Result<RunOutcome, SupervisorError>>,
) {
    let pgid = job.pid as i32;
    let job_id = job.job_id.as_str();
    let mut guard = GroupGuard {
        pgid,
        cgroup: job.cgroup.clone(),
        armed: true,
    };
    let marker = format!("{JOB_ID_ENV}={}", job.job_id).into_bytes();
    let (log_tx, log_rx) = mpsc::channel::<Chunk>(LOG_QUEUE);
    let mut writer = tokio::task::spawn_blocking(move || write_log(log, log_rx));
    let mut output = Output {
        out: Pipe::new(child.stdout.take(), Stream::Stdout),
        err: Pipe::new(child.stderr.take(), Stream::Stderr),
        prefer_err: false,
        log_tx,
    };

    let leader = until_leader_exits(
        &job,
        &mut child,
        &mut output,
        &mut stop_rx,
        &mut result_tx,
        &marker,
    )
    .await;
    let exited = Instant::now();
    let ended_at = SystemTime::now();
    if leader.waited.is_ok() {
        spawner::forget_child(pgid);
    }
    // checked: a caller may pass Duration::MAX to mean "no bound", which must not panic.
    let drain_until = exited
        .checked_add(job.pipe_drain)
        .unwrap_or_else(far_future);
    let give_up_at = drain_until
        .checked_add(FINISH_TIMEOUT)
        .unwrap_or(drain_until);
    let (swept, forced) = sweep_and_drain(
        &job,
        &mut output,
        marker,
        leader.known,
        leader.census,
        drain_until,
        give_up_at,
    )
    .await;
    drop(output);
    let log_complete = finish_log(&job, &mut writer, give_up_at).await;
    // The group has been killed and swept; the guard's job is done.
    guard.armed = false;

    let result = match leader.waited {
        Ok(status) => {
            let ending = classify(status, leader.termination);
            tracing::info!(
                job_id,
                pid = job.pid,
                ?ending,
                strays = swept.strays_killed,
                pipes_forced_closed = forced,
                "job ended"
            );
            Ok(RunOutcome {
                ending,
                pid: job.pid,
                started_at: job.started_at,
                ended_at,
                duration: exited.duration_since(job.started),
                log_path: job.log_path.clone(),
                stray_processes_killed: swept.strays_killed,
                pipes_forced_closed: forced,
                usage: swept.usage,
                log_complete,
            })
        }
        Err(source) => Err(SupervisorError::Wait {
            job_id: job.job_id.clone(),
            pid: job.pid,
            source,
        }),
    };
    // The receiver may be gone (abandoned job); the outcome then only lives in the log.
    let _ = result_tx.send(result);
}

/// A deadline that never comes, for a timer that must exist but not fire.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// How phase 1 ended.
struct LeaderExit {
    waited: io::Result<ExitStatus>,
    termination: Option<Termination>,
    /// The job's processes seen while the leader lived, so phase 2 can reap them.
    known: HashMap<i32, u64>,
    census: Option<JoinHandle<HashMap<i32, u64>>>,
}

/// Phase 1, until the leader exits: copies the output to the log, enforces the timeout and
/// stop requests (SIGTERM, then SIGKILL after the grace or at a second request), and counts
/// the job's processes now and then.
async fn until_leader_exits(
    job: &Job,
    child: &mut tokio::process::Child,
    output: &mut Output,
    stop_rx: &mut StopReceiver,
    result_tx: &mut oneshot::Sender<Result<RunOutcome, SupervisorError>>,
    marker: &[u8],
) -> LeaderExit {
    let job_id = job.job_id.as_str();
    let timeout_at = job.started.checked_add(job.timeout);
    let mut termination: Option<Termination> = None;
    let mut stop_open = true;
    let mut abandoned = false;
    let mut known: HashMap<i32, u64> = HashMap::new();
    let mut census: Option<JoinHandle<HashMap<i32, u64>>> = None;
    let mut census_tick =
        tokio::time::interval_at((Instant::now() + CENSUS_INTERVAL).into(), CENSUS_INTERVAL);
    census_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let never = far_future();
    let sleep = tokio::time::sleep_until(never.into());
    tokio::pin!(sleep);
    let mut armed_for: Option<Instant> = None;

    let waited = loop {
        let deadline = match &termination {
            Some(t) => t.kill_at,
            None => timeout_at,
        };
        if deadline != armed_for {
            sleep.as_mut().reset(deadline.unwrap_or(never).into());
            armed_for = deadline;
        }
        let mut stop_request: Option<StopRequests> = None;
        tokio::select! {
            biased;
            status = child.wait() => break status,
            changed = stop_rx.changed(), if stop_open => match changed {
                Ok(()) => stop_request = Some(*stop_rx.borrow_and_update()),
                Err(_) => stop_open = false,
            },
            _ = result_tx.closed(), if !abandoned => {
                abandoned = true;
                tracing::warn!(job_id, pid = job.pid, "nobody waits for this job any more; stopping it");
                stop_request = Some(StopRequests { count: 1, reason: Some(StopReason::Interrupted) });
            }
            _ = &mut sleep, if deadline.is_some() => on_deadline(job, &mut termination),
            permit = output.log_tx.reserve(), if output.queued() => {
                hand_over(permit, &mut output.out, &mut output.err, &mut output.prefer_err);
            }
            read = output.out.read(), if output.out.can_read() => output.out.took(read, job_id),
            read = output.err.read(), if output.err.can_read() => output.err.took(read, job_id),
            _ = census_tick.tick(), if census.is_none() => census = Some(job.census(marker)),
            found = join_running(&mut census), if census.is_some() => {
                census = None;
                if let Ok(found) = found {
                    known.extend(found);
                }
            }
        }
        if let Some(state) = stop_request {
            on_stop_request(job, state, &mut termination);
        }
    };
    LeaderExit {
        waited,
        termination,
        known,
        census,
    }
}

/// Phase 2, the leader is gone and nothing of the job may survive it: kills and reaps what
/// is left, and drains the pipes until they close or `drain_until` (then they are closed by
/// force, the `bool`). At `give_up_at` a wedged log queue or sweep is abandoned.
async fn sweep_and_drain(
    job: &Job,
    output: &mut Output,
    marker: Vec<u8>,
    mut known: HashMap<i32, u64>,
    census: Option<JoinHandle<HashMap<i32, u64>>>,
    drain_until: Instant,
    give_up_at: Instant,
) -> (procs::Sweep, bool) {
    let job_id = job.job_id.as_str();
    signal_group(job_id, job.pid as i32, Signal::SIGKILL);
    if let Some(running) = census {
        if let Ok(found) = running.await {
            known.extend(found);
        }
    }
    let mut sweeper = job.sweep(marker, known);
    let mut swept: Option<procs::Sweep> = None;
    let mut forced = false;
    loop {
        let reading = output.reading();
        let queued = output.queued();
        if !reading && !queued && swept.is_some() {
            break;
        }
        tokio::select! {
            biased;
            result = &mut sweeper, if swept.is_none() => {
                swept = Some(result.unwrap_or_else(|e| {
                    tracing::error!(job_id, error = %e, "the sweep of the job's processes failed");
                    procs::Sweep::default()
                }));
            }
            permit = output.log_tx.reserve(), if queued => {
                hand_over(permit, &mut output.out, &mut output.err, &mut output.prefer_err);
            }
            read = output.out.read(), if output.out.can_read() => output.out.took(read, job_id),
            read = output.err.read(), if output.err.can_read() => output.err.took(read, job_id),
            _ = tokio::time::sleep_until(drain_until.into()), if reading => {
                forced = true;
                tracing::warn!(job_id, pid = job.pid, drain = ?job.pipe_drain,
                    "the job's output pipes are still held open after its end; closing them");
                output.out.reader = None;
                output.err.reader = None;
            }
            _ = tokio::time::sleep_until(give_up_at.into()) => {
                tracing::error!(job_id, pid = job.pid, "the job's log or process sweep is wedged; reporting without waiting further");
                output.out.pending = None;
                output.err.pending = None;
                if swept.is_none() {
                    swept = Some(procs::Sweep::default());
                }
            }
        }
    }
    let swept = swept.unwrap_or_default();
    if swept.left_dying > 0 {
        tracing::warn!(
            job_id,
            count = swept.left_dying,
            "some job processes were still dying; they will be reaped later"
        );
    }
    (swept, forced)
}

#[cfg(test)]
mod tests;
