//! One job run on the caller's own thread, for the job's owner process (`rsql-job-owner`),
//! which runs exactly one job and has no async runtime.
//!
//! The owner drives a [`BlockingJob`] from its one `poll(2)` loop, beside its own socket
//! and signals: it polls the job's pipes ([`BlockingJob::pipes`]) until the job's next
//! deadline ([`BlockingJob::deadline`]), then calls [`BlockingJob::advance`], which reads
//! what the pipes hold into the log, reaps the owner's children and fires the timeout and
//! kill steps. Once the leader has exited ([`BlockingJob::leader_exited`]),
//! [`BlockingJob::finish`] kills and sweeps what is left, drains the pipes for at most
//! `pipe_drain`, fsyncs the log and classifies the ending.
//!
//! The rules are the async supervisor's (same `termination`, `procs` and `launch` code);
//! what differs is what one job in a process of its own allows:
//! - every child of the owner belongs to the job, so each wake-up reaps all of them
//!   (`waitpid(-1)`), and the periodic /proc census the agent's supervisor needs to tell
//!   its jobs' orphans apart is not done; without a cgroup, the end-of-job sweep reads the
//!   owner's descendants (`/proc/PID/task/TID/children`), not all of /proc, and so finds an
//!   escaped process that cleared the marker too;
//! - the fork copies a process of a few MB, so the job is spawned from this thread, without
//!   the agent's spawner thread;
//! - the log is written on this thread: a slow disk slows the job's output and this loop,
//!   where the agent must never stall; an owner whose loop is wedged past the job's timeout
//!   is killed by the agent watching it (`Rsql.Timeout`).
//!
//! The caller blocks `SIGCHLD` and reads it from a signalfd, so that a wake-up comes when
//! the leader exits ([`child_signals`]).

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ChildStderr, ChildStdout, ExitStatus};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{SigSet, Signal};

use super::launch::{build_command, spawn_detail, Launch};
use super::termination::{classify, on_deadline, on_stop_request, signal_group, Termination};
use super::{
    log_started, procs, validate, Job, RunOutcome, SupervisorError, CGROUP_EMPTY_WAIT, JOB_ID_ENV,
    READ_CHUNK, REAP_WAIT,
};
use crate::joblog::{JobLog, JobLogError, Stream};
use crate::stop::{StopReason, StopRequests};

/// Reads from one pipe per wake-up, at most: a job that writes as fast as it is read must
/// not keep the loop from its timers and sockets.
const READS_PER_WAKE: usize = 16;

/// The signals an owner reads from its signalfd: `SIGCHLD` (the job's processes ended) and
/// the stop signals systemd or an operator send (`SIGTERM`, `SIGINT`).
pub fn child_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        set.add(signal);
    }
    set
}

/// A running job, driven by its owner's loop.
#[derive(Debug)]
pub struct BlockingJob {
    job: Job,
    out: Option<ChildStdout>,
    err: Option<ChildStderr>,
    log: JobLog,
    /// The first failed write to the log; later output is read and dropped.
    log_error: Option<JobLogError>,
    buf: Vec<u8>,
    termination: Option<Termination>,
    stops: StopRequests,
    timeout_at: Option<Instant>,
    /// The leader's status, when it exited, and the wall clock then.
    leader: Option<(ExitStatus, Instant, SystemTime)>,
}

impl BlockingJob {
    /// Makes this process a child subreaper and starts the job (fork and exec from this
    /// thread). The caller must have blocked [`child_signals`] first, or the leader's exit
    /// may come before anything listens for it. On error the job never started.
    pub fn start(launch: Launch) -> Result<BlockingJob, SupervisorError> {
        validate(&launch)?;
        nix::sys::prctl::set_child_subreaper(true).map_err(SupervisorError::Subreaper)?;
        let mut command = build_command(&launch);
        let log_path = launch.log.path().to_path_buf();
        let started = Instant::now();
        let started_at = SystemTime::now();
        let mut child = command.spawn().map_err(|source| SupervisorError::Spawn {
            detail: spawn_detail(&launch.program, &source),
            program: launch.program.clone(),
            log_path: log_path.clone(),
            source,
        })?;
        let pid = child.id();
        let (out, err) = (child.stdout.take(), child.stderr.take());
        for pipe in [out.as_ref().map(AsFd::as_fd), err.as_ref().map(AsFd::as_fd)]
            .into_iter()
            .flatten()
        {
            set_nonblocking(pipe);
        }
        // `child` only holds the pid now: it is reaped by `advance`, never waited through it.
        drop(child);
        log_started(&launch, pid);
        Ok(BlockingJob {
            timeout_at: started.checked_add(launch.timeout),
            job: Job::of(&launch, pid, started, started_at),
            out,
            err,
            log: launch.log,
            log_error: None,
            buf: vec![0; READ_CHUNK],
            termination: None,
            stops: StopRequests::default(),
            leader: None,
        })
    }

    /// The leader's pid, which is also the job's process group id.
    pub fn pid(&self) -> u32 {
        self.job.pid
    }

    /// The job's open output pipes, to poll for reading.
    pub fn pipes(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        [
            self.out.as_ref().map(AsFd::as_fd),
            self.err.as_ref().map(AsFd::as_fd),
        ]
        .into_iter()
        .flatten()
    }

    /// When [`BlockingJob::advance`] must run next even if nothing is ready: the timeout,
    /// or the end of the kill grace.
    pub fn deadline(&self) -> Option<Instant> {
        if self.leader.is_some() {
            return None;
        }
        match &self.termination {
            Some(t) => t.kill_at,
            None => self.timeout_at,
        }
    }

    /// One more stop request (see [`crate::stop::StopSender::stop`]): the first stops the
    /// job gracefully, any later one kills it; the first reason is the one reported.
    pub fn stop(&mut self, reason: StopReason) {
        if self.leader.is_some() {
            return;
        }
        self.stops.count = self.stops.count.saturating_add(1);
        self.stops.reason.get_or_insert(reason);
        on_stop_request(&self.job, self.stops, &mut self.termination);
    }

    /// After a wake-up: copies what the pipes hold to the log, reaps the children that
    /// ended (the leader's status among them), and fires a deadline that has come.
    pub fn advance(&mut self) {
        self.read_pipes();
        self.reap();
        if let Some(deadline) = self.deadline() {
            if Instant::now() >= deadline {
                on_deadline(&self.job, &mut self.termination);
            }
        }
    }

    pub fn leader_exited(&self) -> bool {
        self.leader.is_some()
    }

    /// Ends the job once its leader has exited: SIGKILL to its group (and cgroup), the
    /// sweep of escaped processes, the pipes drained for at most `pipe_drain`, the log
    /// completed and fsynced. Blocks for as long as that takes.
    pub fn finish(mut self) -> RunOutcome {
        let Some((status, exited, ended_at)) = self.leader else {
            // Not called before the leader exited; if it is, end the job first.
            self.stop(StopReason::Interrupted);
            self.stop(StopReason::Interrupted);
            while self.leader.is_none() {
                std::thread::sleep(Duration::from_millis(10));
                self.reap();
            }
            return self.finish();
        };
        let pgid = self.job.pid as i32;
        let job_id = self.job.job_id.clone();
        signal_group(&job_id, pgid, Signal::SIGKILL);
        let swept = match &self.job.cgroup {
            Some(cgroup) => procs::sweep_cgroup(
                cgroup,
                pgid,
                Default::default(),
                REAP_WAIT,
                CGROUP_EMPTY_WAIT,
            ),
            // Every descendant of this process is the job's: found through the children
            // lists, where the kernel has them, instead of a walk of all of /proc.
            None => procs::sweep_descendants(std::process::id() as i32, pgid, pgid, REAP_WAIT)
                .unwrap_or_else(|| {
                    let marker = format!("{JOB_ID_ENV}={job_id}").into_bytes();
                    procs::sweep(&marker, pgid, pgid, Default::default(), REAP_WAIT)
                }),
        };
        if swept.left_dying > 0 {
            tracing::warn!(
                job_id,
                count = swept.left_dying,
                "some job processes were still dying; they will be reaped later"
            );
        }
        let drain_until = exited.checked_add(self.job.pipe_drain);
        let forced = self.drain(drain_until);
        let log_complete = self.complete_log();
        let ending = classify(status, self.termination);
        tracing::info!(
            job_id,
            pid = self.job.pid,
            ?ending,
            strays = swept.strays_killed,
            pipes_forced_closed = forced,
            "job ended"
        );
        RunOutcome {
            ending,
            pid: self.job.pid,
            started_at: self.job.started_at,
            ended_at,
            duration: exited.duration_since(self.job.started),
            log_path: self.job.log_path.clone(),
            stray_processes_killed: swept.strays_killed,
            pipes_forced_closed: forced,
            usage: swept.usage,
            log_complete,
        }
    }

    /// Reads both pipes until they are empty (or [`READS_PER_WAKE`] chunks each), then
    /// flushes the log so that a tailing reader sees the output at once.
    fn read_pipes(&mut self) {
        let mut wrote = false;
        for stream in [Stream::Stdout, Stream::Stderr] {
            for _ in 0..READS_PER_WAKE {
                let read = match stream {
                    Stream::Stdout => self.out.as_mut().map(|p| p.read(&mut self.buf)),
                    Stream::Stderr => self.err.as_mut().map(|p| p.read(&mut self.buf)),
                };
                match read {
                    None => break,
                    Some(Ok(0)) => {
                        self.close(stream);
                        break;
                    }
                    Some(Ok(n)) => {
                        wrote = true;
                        if self.log_error.is_none() {
                            let at = SystemTime::now();
                            if let Err(e) = self.log.append(stream, at, &self.buf[..n]) {
                                self.log_error = Some(e);
                            }
                        }
                    }
                    Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Some(Err(e)) => {
                        tracing::warn!(job_id = %self.job.job_id, ?stream, error = %e, "reading the job's output failed; closing the pipe");
                        self.close(stream);
                        break;
                    }
                }
            }
        }
        if wrote && self.log_error.is_none() {
            if let Err(e) = self.log.flush() {
                self.log_error = Some(e);
            }
        }
    }

    fn close(&mut self, stream: Stream) {
        match stream {
            Stream::Stdout => self.out = None,
            Stream::Stderr => self.err = None,
        }
    }

    /// Reaps every child that has ended: the job's leader (its status kept) and its
    /// orphans, which come to this subreaper. Every child of an owner is its job's.
    fn reap(&mut self) {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes only to `status`, a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid as u32 == self.job.pid && self.leader.is_none() {
                self.leader = Some((
                    ExitStatus::from_raw(status),
                    Instant::now(),
                    SystemTime::now(),
                ));
            }
        }
    }

    /// Reads the pipes until both are closed or `until` has come; `true` when they were
    /// closed by force (something still held them open).
    fn drain(&mut self, until: Option<Instant>) -> bool {
        loop {
            self.read_pipes();
            let fds: Vec<libc::pollfd> = self
                .pipes()
                .map(|fd| libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            if fds.is_empty() {
                return false;
            }
            let now = Instant::now();
            if until.is_some_and(|until| now >= until) {
                tracing::warn!(job_id = %self.job.job_id, pid = self.job.pid, drain = ?self.job.pipe_drain,
                    "the job's output pipes are still held open after its end; closing them");
                self.out = None;
                self.err = None;
                return true;
            }
            let wait = until.map_or(-1, |until| millis_until(now, until));
            let mut fds = fds;
            // SAFETY: `fds` is a live array of `fds.len()` pollfd structs for the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        }
    }

    /// Writes out the unfinished lines and fsyncs the log: it is the record a user reads,
    /// and the outcome about to be made durable says whether it is complete.
    fn complete_log(&mut self) -> bool {
        let done = match self.log_error.take() {
            Some(e) => Err(e),
            None => self.log.finish().and_then(|()| self.log.sync()),
        };
        match done {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(job_id = %self.job.job_id, path = %self.job.log_path.display(), error = %crate::error_chain(&e), "the job log is incomplete");
                false
            }
        }
    }
}

/// Milliseconds from `now` until `until`, rounded up (a poll that wakes a little early
/// would spin), for `poll(2)`.
pub fn millis_until(now: Instant, until: Instant) -> libc::c_int {
    let wait = until.saturating_duration_since(now);
    let ms = wait.as_millis() + u128::from(!wait.subsec_nanos().is_multiple_of(1_000_000));
    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
}

fn set_nonblocking(fd: BorrowedFd<'_>) {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor this process owns; it touches no Rust-owned memory.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}
