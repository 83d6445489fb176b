//! The job owner process (`rsql-job-owner --job-dir DIR`): runs one job and outlives the
//! agent that asked for it.
//!
//! In order:
//! 1. reads `job.json`, writes `owner.json` (pid and start time), listens on `owner.sock`;
//! 2. waits (at most [`START_TIMEOUT`]) for the agent's start request, which carries the
//!    locked lock file and the secret environment; without one it exits and runs nothing;
//! 3. records `running` in the lock state under its own pid; where `job.json` asks for it,
//!    makes the job's cgroup and moves itself into its `supervisor` leaf (see
//!    `crate::cgroup`; if that fails, it says so and runs the job without); starts the job
//!    through the [`Supervisor`] (which makes this process a child subreaper) in the
//!    cgroup's `payload` leaf, with the lock descriptor inherited by the job, and answers
//!    the agent with the job's pid;
//! 4. while the job runs: renews the lease, answers `stop`/`status` on its socket (from any
//!    agent, so a restarted agent can adopt it), and treats SIGTERM (a systemd stop at host
//!    shutdown) as a stop that reports `Rsql.Interrupted`;
//! 5. when the job has ended (the supervisor has swept its processes; with a cgroup: the
//!    payload is empty): classifies it, with what it used, writes `exit.json` durably,
//!    records the outcome in the lock state (each tried whatever became of the other: a
//!    full `state_dir` must not lose a known outcome; with neither, an empty `exit.lost`
//!    marker), sends the exit record to every agent connected, releases the lock, removes
//!    the cgroup, exits.
//!
//! It is a small synchronous program, as conmon and containerd-shim are: one thread, no
//! async runtime, one `poll(2)` loop over the job's pipes, a signalfd (the job's exit,
//! SIGTERM) and its socket and connections ([`watch_job`]), driving a
//! [`BlockingJob`] (the supervisor's rules, on this thread). No AWS SDK is in the binary. If
//! this process is SIGKILLed, `PR_SET_PDEATHSIG` takes the job's leader, the rest
//! of the job keeps the lock (the inherited descriptor) until the agent, seeing the owner
//! gone, kills them; under systemd the unit's cgroup is killed too.
//!
//! Why one file of about 800 lines: it is one process's life, read in the order above; the
//! protocol, the job directory and the launch are in `job_owner` and `activation`.

use std::io::{BufRead, BufReader, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use super::activation::{valid_job_id, ActivationAnswer, ActivationRequest};
use super::{
    boot_id, ExitRecord, JobDir, JobDirError, JobFile, OwnerRecord, Reply, Request, PROTOCOL,
};
use crate::cgroup::JobCgroup;
use crate::fsutil::Durability;
use crate::joblog::{JobLog, JobLogError};
use crate::lock::{JobLock, LockError, LockState};
use crate::outcome::{ErrorName, Failure, FailureCause, Outcome};
use crate::run::{classify_run, record_outcome, RunFacts};
use crate::stop::StopReason;
use crate::supervisor::{self, child_signals, millis_until, BlockingJob, Launch, SupervisorError};

/// How long the owner waits for the agent's start request before it gives up, runs nothing
/// and exits. The agent connects as soon as the owner listens, then asks Step Functions
/// whether the task is open before it sends the request; that check may retry through a
/// network outage. An agent that dies meanwhile closes the connection, which ends the wait
/// at once, so this bounds only a hung agent.
pub const START_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest start request (the environment is small; this bounds a confused peer).
const MAX_REQUEST: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error(
        "usage: rsql-job-owner --job-dir DIR | --socket-activated --owners-dir DIR --job-user NAME"
    )]
    Usage,
    #[error(transparent)]
    JobDir(#[from] JobDirError),
    #[error("cannot listen on {path}")]
    Listen {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no start request arrived within {0:?}; nothing was run")]
    NoStart(Duration),
    #[error("the agent closed the connection before asking for a start; nothing was run")]
    Withdrawn,
    #[error("the start request is not valid: {0}")]
    BadStart(String),
    #[error("cannot receive the start request")]
    Receive(#[source] std::io::Error),
    #[error("the job's lock")]
    Lock(#[source] LockError),
    #[error("cannot read signals from a signalfd")]
    Signals(#[source] nix::errno::Errno),
    #[error("cannot start the supervisor")]
    Supervisor(#[source] SupervisorError),
    #[error("cannot open the job log")]
    Log(#[source] JobLogError),
    #[error("the job's user")]
    User(#[source] crate::supervisor::JobUserError),
    #[error("the job file asks to run the job as {asked}, but this owner unit runs jobs only as {allowed:?} (RSQL_JOB_USER of rsql-job-owner@.service; set it in /etc/rsql-agent/environment to match [jobs] user)")]
    UserNotAllowed { asked: String, allowed: String },
}

/// `main` of `rsql-job-owner`. Exit codes: 0 the job ran and its exit is recorded (whatever
/// its outcome); 2 usage; 1 anything else (the log says what).
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let args: Vec<String> = args.skip(1).collect();
    if args.iter().any(|a| a == "--version") {
        println!("rsql-job-owner {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if let [flag, _, detach] = args.as_slice() {
        if flag == "--job-dir" && detach == "--detach" && !detach_from_launcher() {
            return ExitCode::FAILURE;
        }
    }
    init_logging();
    let (dir, activation, job_user) = match args.as_slice() {
        [flag, dir] if flag == "--job-dir" => (JobDir::new(dir), None, None),
        [flag, dir, detach] if flag == "--job-dir" && detach == "--detach" => {
            (JobDir::new(dir), None, None)
        }
        [flag, owners_flag, owners, user_flag, user]
            if flag == "--socket-activated"
                && owners_flag == "--owners-dir"
                && user_flag == "--job-user" =>
        {
            match activated(std::path::Path::new(owners)) {
                Ok((dir, stream)) => (dir, stream, Some(user.clone())),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "the job owner was started for no valid job");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => {
            eprintln!("{}", ShimError::Usage);
            return ExitCode::from(2);
        }
    };
    match run(&dir, activation, job_user.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ShimError::Withdrawn) => {
            tracing::info!(job_dir = %dir.path().display(), "the agent withdrew the job before starting it (its task was closed, or another copy runs it); nothing was run");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(job_dir = %dir.path().display(), error = %crate::error_chain(&e), "the job owner failed");
            ExitCode::FAILURE
        }
    }
}

/// `--detach` (the agent's direct launcher): leaves the process that spawned this one at
/// once, as the first thing it does. The agent spawns the owner with `posix_spawn` (a
/// `vfork`, which copies nothing of a large agent) and reaps this first half at once; the
/// second half, forked from this small fresh process, is nobody's child the agent must
/// reap, in a session of its own (no terminal, no process group shared with the agent).
/// `false` if that failed (the first half exits non-zero, which the agent reports).
fn detach_from_launcher() -> bool {
    // SAFETY: this process has one thread here (nothing has started another), so fork is
    // sound; the parent half only calls _exit.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            // SAFETY: _exit ends the first half without running any Rust code.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Child) => {
            nix::unistd::setsid().is_ok() && std::env::set_current_dir("/").is_ok()
        }
        Err(e) => {
            eprintln!("rsql-job-owner: cannot detach from the agent: {e}");
            false
        }
    }
}

/// How long a socket-activated owner waits for the agent to name its job.
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(10);

/// A socket-activated start (`rsql-job-owner@.service`, `StandardInput=socket`): reads the
/// agent's [`ActivationRequest`] from standard input, the accepted connection, and returns the
/// job's directory under `owners` with the connection to answer on. Standard input becomes
/// `/dev/null`, so the connection is not inherited by the job.
fn activated(owners: &std::path::Path) -> Result<(JobDir, Option<UnixStream>), ShimError> {
    // systemd passes the connection as fd 3 too (`LISTEN_FDS`): not for the job to inherit.
    let passed: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for fd in 3..3 + passed.clamp(0, 64) {
        // SAFETY: fcntl on an integer descriptor this process was given; it touches no
        // Rust-owned memory.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let stdin = nix::unistd::dup(std::io::stdin()).map_err(|e| ShimError::Receive(e.into()))?;
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
    }
    let stream = UnixStream::from(stdin);
    let answer_error = |stream: &UnixStream, reason: &str| {
        answer(
            stream,
            &ActivationAnswer {
                ok: false,
                unit: None,
                error: Some(reason.to_string()),
            },
        )
    };
    stream
        .set_read_timeout(Some(ACTIVATION_TIMEOUT))
        .map_err(ShimError::Receive)?;
    let mut line = Vec::new();
    BufReader::new(std::io::Read::take(&stream, 4096))
        .read_until(b'\n', &mut line)
        .map_err(ShimError::Receive)?;
    let request: ActivationRequest = match serde_json::from_slice(line.trim_ascii_end()) {
        Ok(request) => request,
        Err(e) => {
            answer_error(&stream, &format!("not an activation request: {e}"));
            return Err(ShimError::BadStart(format!(
                "not an activation request: {e}"
            )));
        }
    };
    if !valid_job_id(&request.job_id) {
        let reason = format!("{:?} is not a job id", request.job_id);
        answer_error(&stream, &reason);
        return Err(ShimError::BadStart(reason));
    }
    let path = owners.join(&request.job_id);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => {}
        _ => {
            let reason = format!("{} is not a job directory", path.display());
            answer_error(&stream, &reason);
            return Err(ShimError::BadStart(reason));
        }
    }
    Ok((JobDir::new(path), Some(stream)))
}

/// Writes the activation answer line; the agent reads it with a timeout of its own.
fn answer(stream: &UnixStream, answer: &ActivationAnswer) {
    let mut line = serde_json::to_vec(answer).unwrap_or_default();
    line.push(b'\n');
    let _ = (&*stream).write_all(&line);
}

/// This process's systemd unit: the last part of its cgroup path, if that is a unit.
fn own_unit() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let last = path.rsplit('/').next()?;
    last.ends_with(".service").then(|| last.to_string())
}

/// Logs to stderr (the owner's log file, or the journal under systemd) at the most verbose
/// level `RSQL_AGENT_LOG` names (`info` without one). A level, not the agent's per-module
/// filter: that filter's parser and its regular expressions are a third of the owner's
/// binary, for a process that logs a handful of lines.
fn init_logging() {
    let level = std::env::var("RSQL_AGENT_LOG")
        .ok()
        .and_then(|filter| most_verbose_level(&filter))
        .unwrap_or(tracing::level_filters::LevelFilter::INFO);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// The most verbose level in an `RSQL_AGENT_LOG` filter (`warn,rsql_agent=debug` → debug).
fn most_verbose_level(filter: &str) -> Option<tracing::level_filters::LevelFilter> {
    filter
        .split(',')
        .filter_map(|directive| {
            let level = directive.rsplit('=').next().unwrap_or(directive).trim();
            level.parse::<tracing::level_filters::LevelFilter>().ok()
        })
        .max()
}

/// Runs the job of `dir`; see the module doc. `activation`: the connection of a
/// socket-activated start, answered once this owner listens on its own socket. `job_user`:
/// the only user this owner may run the job as (its unit's `--job-user`, which root set);
/// a job file that names another, or none, is refused.
pub fn run(
    dir: &JobDir,
    activation: Option<UnixStream>,
    job_user: Option<&str>,
) -> Result<(), ShimError> {
    let job = match dir.read_job() {
        Ok(job) => job,
        Err(e) => {
            if let Some(stream) = &activation {
                answer(
                    stream,
                    &ActivationAnswer {
                        ok: false,
                        unit: None,
                        error: Some(crate::error_chain(&e)),
                    },
                );
            }
            return Err(e.into());
        }
    };
    let me = std::process::id() as i32;
    let mut owner = OwnerRecord {
        protocol: PROTOCOL,
        pid: me,
        start_time: supervisor::process_start_time(me).unwrap_or(0),
        boot_id: boot_id(),
        job_pid: None,
        cgroup: None,
    };
    dir.write_owner(&owner)?;
    let socket = dir.socket();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|source| ShimError::Listen {
        path: socket.clone(),
        source,
    })?;
    let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
    if let Some(stream) = activation {
        answer(
            &stream,
            &ActivationAnswer {
                ok: true,
                unit: own_unit(),
                error: None,
            },
        );
    }

    let StartRequest {
        stream: first,
        env,
        lock: lock_fd,
    } = receive_start(&listener, START_TIMEOUT)?;
    let mut held =
        JobLock::adopt(lock_fd, &job.lock_dir, &job.lock_key, None).map_err(ShimError::Lock)?;
    let mut state = LockState::new_running(
        &job.lock_key,
        &job.instance_id,
        &job.token_hash,
        job.attempt,
    );
    held.write_state(&state).map_err(ShimError::Lock)?;

    let cgroup = set_up_cgroup(&job);
    owner.cgroup = cgroup.as_ref().map(|c| c.payload().path().to_path_buf());
    let launch = build_launch(&job, &held, env, cgroup.as_ref(), job_user)?;
    let (outcome, exit, watchers) =
        supervise(dir, &job, &mut owner, &mut held, first, listener, launch)?;

    record_end(dir, &mut held, &mut state, &outcome, &exit);
    tell_watchers(watchers, &exit, owner.job_pid);
    if let Err(e) = held.release() {
        tracing::warn!(error = %crate::error_chain(&e), "cannot release the job's lock cleanly");
    }
    let _ = std::fs::remove_file(&socket);
    if let Some(cgroup) = cgroup {
        cgroup.finish();
    }
    tracing::info!(
        job_name = %job.job_name,
        status = outcome.status(),
        exit_code = ?exit.exit_code,
        "job owner done"
    );
    Ok(())
}

/// Records how the job ended wherever it can: the lock state (for any agent of the fleet)
/// and the exit record (for this host's agents). A full `state_dir` must not turn a known
/// outcome into a dead owner, so each is tried whatever became of the other; where neither
/// holds it, an empty marker says the outcome was lost (an agent watching now still gets it
/// from [`tell_watchers`]).
///
/// One durable write guards this transition, not two: the lock state first, fsynced (a
/// crash after it loses nothing: the next agent reads the outcome there); the exit record
/// then only replaces its file, unless the lock state could not be written, when it is the
/// only record and is fsynced too.
fn record_end(
    dir: &JobDir,
    held: &mut JobLock,
    state: &mut LockState,
    outcome: &Outcome,
    exit: &ExitRecord,
) {
    record_outcome(state, outcome);
    let state_written = match held.write_state(state) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "cannot record the outcome in the lock state; writing the exit record durably and telling the watching agent");
            false
        }
    };
    let durability = if state_written {
        Durability::ThisBoot
    } else {
        Durability::Durable
    };
    let exit_written = match dir.write_exit(exit, durability) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "cannot write the job's exit record");
            false
        }
    };
    if !exit_written && !state_written {
        match dir.mark_outcome_lost() {
            Ok(()) => tracing::error!("the job's outcome could be recorded nowhere; marked it lost, so it is reported as such and not run again"),
            Err(e) => tracing::error!(error = %crate::error_chain(&e), "the job's outcome could be recorded nowhere, not even as lost; only an agent watching now learns it"),
        }
    }
}

/// Accepts the agent's connection and reads its start request with the lock descriptor.
fn receive_start(listener: &UnixListener, timeout: Duration) -> Result<StartRequest, ShimError> {
    let mut poll = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(listener),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let ready = loop {
        match nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(ms)) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ShimError::Receive(e.into())),
        }
    };
    if ready == 0 {
        return Err(ShimError::NoStart(timeout));
    }
    let (stream, _) = listener.accept().map_err(ShimError::Receive)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(ShimError::Receive)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut fd: Option<OwnedFd> = None;
    let received = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| ShimError::Receive(e.into()))?;
        for c in msg.cmsgs().map_err(|e| ShimError::Receive(e.into()))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor in our table for us;
                    // nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        msg.bytes
    };
    if received == 0 {
        return Err(ShimError::Withdrawn);
    }
    let mut line = buf[..received].to_vec();
    let mut reader = BufReader::new(&stream);
    while !line.contains(&b'\n') {
        let mut more = Vec::new();
        let n = reader
            .read_until(b'\n', &mut more)
            .map_err(ShimError::Receive)?;
        if n == 0 || line.len() + more.len() > MAX_REQUEST {
            return Err(ShimError::BadStart("the request ended early".into()));
        }
        line.extend_from_slice(&more);
    }
    let request: Request = serde_json::from_slice(line.trim_ascii_end())
        .map_err(|e| ShimError::BadStart(e.to_string()))?;
    let Request::Start { env, .. } = request else {
        return Err(ShimError::BadStart(
            "the first request must be start".into(),
        ));
    };
    let fd = fd.ok_or_else(|| ShimError::BadStart("no lock descriptor came with it".into()))?;
    stream.set_read_timeout(None).map_err(ShimError::Receive)?;
    Ok(StartRequest {
        stream,
        env,
        lock: fd,
    })
}

/// The agent's start request: its connection, the secret environment, the locked file.
struct StartRequest {
    stream: UnixStream,
    env: Vec<(String, String)>,
    lock: OwnedFd,
}

/// Sets up the job's own cgroup where `job.json` asks for one; without it (none asked
/// for, or it cannot be made) the job runs with the process group and marker sweep only,
/// and the log says so.
fn set_up_cgroup(job: &JobFile) -> Option<JobCgroup> {
    let Some(plan) = &job.launch.cgroup else {
        tracing::info!("no cgroup for this job: its processes are found by process group and marker variable only");
        return None;
    };
    match JobCgroup::set_up(plan, &job.launch.job_id) {
        Ok(cgroup) => {
            tracing::info!(
                cgroup = %cgroup.path().display(),
                controllers = %cgroup.controllers().join(" "),
                memory_max = ?cgroup.payload().has_memory().then_some(plan.memory_max).flatten(),
                "the job runs in its own cgroup"
            );
            if plan.memory_max.is_some() && !cgroup.payload().has_memory() {
                tracing::warn!(
                    "the job's memory limit is not enforced: its cgroup has no memory controller"
                );
            }
            Some(cgroup)
        }
        Err(e) => {
            tracing::warn!(
                error = %crate::error_chain(&e),
                "cannot give the job a cgroup of its own; falling back to the process group and marker sweep"
            );
            None
        }
    }
}

/// The job's [`Launch`]: `job.json`'s plan, the secret `env` from the start request, the
/// lock's descriptor for every process of the job to inherit, and its cgroup.
fn build_launch(
    job: &JobFile,
    held: &JobLock,
    env: Vec<(String, String)>,
    cgroup: Option<&JobCgroup>,
    job_user: Option<&str>,
) -> Result<Launch, ShimError> {
    let plan = &job.launch;
    let mut all_env = plan.env.clone();
    all_env.extend(env);
    // Looked up again here: the owner, not the job file, decides that a job never runs as
    // root or as the owner's own user; a socket-activated owner runs it only as the user its
    // unit names.
    let user = match (&plan.user, job_user) {
        (Some(user), Some(allowed)) if user.name != allowed => {
            return Err(ShimError::UserNotAllowed {
                asked: user.name.clone(),
                allowed: allowed.to_string(),
            })
        }
        (None, Some(allowed)) => {
            return Err(ShimError::UserNotAllowed {
                asked: "the owner's own user".into(),
                allowed: allowed.to_string(),
            })
        }
        (Some(user), _) => Some(user.verify().map_err(ShimError::User)?),
        (None, None) => None,
    };
    Ok(Launch {
        program: plan.program.clone(),
        args: plan.args.clone(),
        cwd: plan.cwd.clone(),
        env: all_env,
        timeout: Duration::from_millis(plan.timeout_ms),
        kill_grace: Duration::from_millis(plan.kill_grace_ms),
        pipe_drain: Duration::from_millis(plan.pipe_drain_ms),
        log: JobLog::open(&job.log_file).map_err(ShimError::Log)?,
        job_id: plan.job_id.clone(),
        inherit_fd: Some(held.as_fd().as_raw_fd()),
        cgroup: cgroup.map(|c| c.payload().clone()),
        user,
    })
}

/// CPU time of this process's reaped children, in ms. An owner runs one job and, as a child
/// subreaper, reaps the job's orphans too: without a cgroup this is the job's CPU, short of
/// processes that were never reaped.
fn reaped_cpu_ms() -> Option<u64> {
    let usage =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).ok()?;
    let ms = |t: nix::sys::time::TimeVal| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1000
            + u64::try_from(t.tv_usec()).unwrap_or(0) / 1000
    };
    Some(ms(usage.user_time()) + ms(usage.system_time()))
}

/// The classified outcome of a finished run and its exit record.
fn exit_of(job: &JobFile, run: &supervisor::RunOutcome) -> (Outcome, ExitRecord) {
    let outcome = classify_run(
        &RunFacts {
            job_name: &job.job_name,
            workflow_execution_id: &job.workflow_execution_id,
            instance_id: &job.instance_id,
            timeout: Duration::from_millis(job.launch.timeout_ms),
            log_group: job.log_group.clone(),
            log_stream: job.log_stream.clone(),
        },
        run,
    );
    let exit = ExitRecord {
        protocol: PROTOCOL,
        outcome: serde_json::to_value(&outcome).unwrap_or_default(),
        exit_code: run.ending.exit_code(),
        signal: run.ending.signal(),
        started_at: humantime::format_rfc3339_millis(run.started_at).to_string(),
        ended_at: humantime::format_rfc3339_millis(run.ended_at).to_string(),
        duration_ms: run.duration.as_millis() as u64,
        stray_processes_killed: run.stray_processes_killed,
        pipes_forced_closed: run.pipes_forced_closed,
    };
    (outcome, exit)
}

/// The outcome and exit record of a job that ended without a run to classify (it could not
/// be started, or its supervision was lost).
fn ended_early(error: ErrorName, message: String, started_at: SystemTime) -> (Outcome, ExitRecord) {
    let outcome = Outcome::Failed(Failure {
        error,
        cause: FailureCause {
            message,
            ..FailureCause::default()
        },
    });
    let exit = ExitRecord {
        protocol: PROTOCOL,
        outcome: serde_json::to_value(&outcome).unwrap_or_default(),
        exit_code: None,
        signal: None,
        started_at: humantime::format_rfc3339_millis(started_at).to_string(),
        ended_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        duration_ms: 0,
        stray_processes_killed: 0,
        pipes_forced_closed: false,
    };
    (outcome, exit)
}

/// Runs the job to its end under this process's one loop; see [`watch_job`]. Returns the
/// outcome, the exit record and the agents' connections still open, which take the exit
/// record as their last line.
fn supervise(
    dir: &JobDir,
    job: &JobFile,
    owner: &mut OwnerRecord,
    held: &mut JobLock,
    first: UnixStream,
    listener: UnixListener,
    launch: Launch,
) -> Result<(Outcome, ExitRecord, Vec<Conn>), ShimError> {
    // The supervisor reads these from this process's environment; the owner may have been
    // started with systemd's, so the agent sent its own.
    for (name, value) in &job.launch.inherited_env {
        // SAFETY: this process has one thread, so nothing reads the environment meanwhile.
        unsafe { std::env::set_var(name, value) };
    }
    // The password this job gets is masked in everything this process writes about it.
    crate::masking::remember_env(&launch.env);
    // Blocked before the fork, so the leader's exit cannot come before anything listens;
    // the spawn gives the job an empty mask of its own.
    let signals = child_signals();
    signals.thread_block().map_err(ShimError::Signals)?;
    let mut signal_fd =
        SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(ShimError::Signals)?;
    let started_at = SystemTime::now();
    let mut running = match BlockingJob::start(launch) {
        Ok(running) => running,
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "the job could not be started");
            let (outcome, exit) = ended_early(
                ErrorName::ScriptFailed,
                format!("the job could not be started: {}", crate::error_chain(&e)),
                started_at,
            );
            // Durable before the reply: the agent reads the exit record as soon as this
            // connection closes, and without it would report a dead owner instead of why.
            if let Err(e) = dir.write_exit(&exit, Durability::Durable) {
                tracing::error!(error = %crate::error_chain(&e), "cannot record the job's exit");
            }
            reply(
                first,
                &Reply {
                    v: PROTOCOL,
                    ok: true,
                    job_pid: None,
                    error: Some(e.to_string()),
                    exit: Some(exit.clone()),
                },
            );
            return Ok((outcome, exit, Vec::new()));
        }
    };
    let job_pid = running.pid();
    owner.job_pid = Some(job_pid);
    if let Err(e) = dir.write_owner(owner) {
        tracing::warn!(error = %crate::error_chain(&e), "cannot record the job's pid");
    }
    let mut conns = Vec::new();
    let started = Reply {
        v: PROTOCOL,
        ok: true,
        job_pid: Some(job_pid),
        error: None,
        exit: None,
    };
    if send_line(&first, &started) && first.set_nonblocking(true).is_ok() {
        conns.push(Conn::new(first));
    }
    let _ = listener.set_nonblocking(true);
    let lease_every = Duration::from_millis(job.lease_interval_ms.max(100));
    watch_job(
        &mut running,
        held,
        &listener,
        &mut signal_fd,
        &mut conns,
        lease_every,
    );
    let mut run = running.finish();
    if run.usage.cpu_ms.is_none() {
        run.usage.cpu_ms = reaped_cpu_ms();
    }
    let (outcome, exit) = exit_of(job, &run);
    Ok((outcome, exit, conns))
}

/// Until the job's leader has exited, one `poll(2)` over: the signalfd (the leader's exit,
/// SIGTERM/SIGINT from systemd or an operator, a stop that reports `Rsql.Interrupted`), the
/// socket (agents connecting, from any agent, so a restarted one can adopt the job), each
/// agent's connection (`stop`, `status`), and the job's pipes; it wakes no later than the
/// job's next deadline (timeout, kill grace) and the lease's next renewal.
fn watch_job(
    job: &mut BlockingJob,
    held: &mut JobLock,
    listener: &UnixListener,
    signals: &mut SignalFd,
    conns: &mut Vec<Conn>,
    lease_every: Duration,
) {
    let job_pid = job.pid();
    let mut lease_at = Instant::now() + lease_every;
    let poll_in = |fd: RawFd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    while !job.leader_exited() {
        let wake_at = job.deadline().map_or(lease_at, |d| d.min(lease_at));
        let mut fds = vec![poll_in(signals.as_raw_fd()), poll_in(listener.as_raw_fd())];
        fds.extend(conns.iter().map(|c| poll_in(c.stream.as_raw_fd())));
        fds.extend(job.pipes().map(|p| poll_in(p.as_raw_fd())));
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs for the call.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                millis_until(Instant::now(), wake_at),
            )
        };
        if fds[0].revents != 0 {
            while let Ok(Some(info)) = signals.read_signal() {
                if info.ssi_signo == Signal::SIGTERM as u32 {
                    tracing::warn!("SIGTERM: stopping the job (reported Rsql.Interrupted)");
                    job.stop(StopReason::Interrupted);
                } else if info.ssi_signo == Signal::SIGINT as u32 {
                    job.stop(StopReason::Interrupted);
                }
            }
        }
        let mut i = 2;
        conns.retain_mut(|conn| {
            let ready = fds[i].revents != 0;
            i += 1;
            !ready || conn.serve(|line| answer_to(line, job, job_pid))
        });
        if fds[1].revents != 0 {
            while let Ok((stream, _)) = listener.accept() {
                if stream.set_nonblocking(true).is_ok() {
                    conns.push(Conn::new(stream));
                }
            }
        }
        if Instant::now() >= lease_at {
            if let Err(e) = held.touch() {
                tracing::warn!(error = %crate::error_chain(&e), "cannot renew the lock's lease");
            }
            lease_at = Instant::now() + lease_every;
        }
        job.advance();
    }
}

/// The longest request line an agent sends on an open connection (`stop`, `status`: tens of
/// bytes); a connection that sends more without a newline is dropped.
const MAX_LINE: usize = 16 * 1024;

/// One agent's connection: answered a line at a time; the exit record is its last line.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads what has come and answers each complete line; `false` once the connection is
    /// closed, broken or abusive.
    fn serve(&mut self, mut answer: impl FnMut(&str) -> Reply) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut &self.stream, &mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let reply = answer(&String::from_utf8_lossy(&line[..end]));
            if !send_line(&self.stream, &reply) {
                return false;
            }
        }
        self.buf.len() <= MAX_LINE
    }
}

/// One reply line; `false` when it could not be written whole.
fn send_line(stream: &UnixStream, reply: &Reply) -> bool {
    let mut line = serde_json::to_vec(reply).unwrap_or_default();
    line.push(b'\n');
    (&*stream).write_all(&line).is_ok()
}

/// How long the owner waits for its last reply to reach the agents connected at the end.
const TELL_WATCHERS_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends the exit record to every agent connected now, as the last line on each
/// connection, within [`TELL_WATCHERS_TIMEOUT`] in all; then the connections close (EOF),
/// which is how a watching agent learns that the job is over.
fn tell_watchers(watchers: Vec<Conn>, exit: &ExitRecord, job_pid: Option<u32>) {
    let deadline = Instant::now() + TELL_WATCHERS_TIMEOUT;
    for conn in watchers {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero()
            || conn.stream.set_nonblocking(false).is_err()
            || conn.stream.set_write_timeout(Some(left)).is_err()
        {
            continue;
        }
        send_line(
            &conn.stream,
            &Reply {
                v: PROTOCOL,
                ok: true,
                job_pid,
                error: None,
                exit: Some(exit.clone()),
            },
        );
    }
}

fn reply(stream: UnixStream, reply: &Reply) {
    let mut stream = stream;
    let mut line = serde_json::to_vec(reply).unwrap_or_default();
    line.push(b'\n');
    let _ = stream.write_all(&line);
}

/// The answer to one request line.
fn answer_to(line: &str, job: &mut BlockingJob, job_pid: u32) -> Reply {
    let (ok, error) = match serde_json::from_str::<Request>(line) {
        Ok(Request::Stop { reason, .. }) => {
            job.stop(reason);
            (true, None)
        }
        Ok(Request::Status { .. }) => (true, None),
        Ok(Request::Start { .. }) => (false, Some("the job has already started".into())),
        Err(e) => (false, Some(format!("not a request: {e}"))),
    };
    Reply {
        v: PROTOCOL,
        ok,
        job_pid: Some(job_pid),
        error,
        exit: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn the_owner_logs_at_the_most_verbose_level_the_agents_filter_names() {
        assert_eq!(most_verbose_level("debug"), Some(LevelFilter::DEBUG));
        assert_eq!(
            most_verbose_level("warn,rsql_agent=trace"),
            Some(LevelFilter::TRACE)
        );
        assert_eq!(
            most_verbose_level("rsql_agent::daemon=info, error"),
            Some(LevelFilter::INFO)
        );
        assert_eq!(most_verbose_level("not a level"), None);
    }
}
