//! How a job is ended on purpose, and how its ending is told: the timeout and stop requests
//! (SIGTERM to the process group, `kill_grace`, SIGKILL), and the classification of the exit.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::{Ending, Job};
use crate::stop::{StopLevel, StopReason, StopRequests};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    TimedOut,
    Stopped(StopReason),
}

/// The agent has begun ending the job.
#[derive(Debug, Clone, Copy)]
pub(super) struct Termination {
    pub(super) cause: Cause,
    pub(super) last_signal: Signal,
    /// When SIGKILL follows, unless it has been sent.
    pub(super) kill_at: Option<Instant>,
}

pub(super) fn signal_group(job_id: &str, pgid: i32, signal: Signal) {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => {
            tracing::debug!(job_id, pgid, signal = %signal, "signalled the job's process group")
        }
        Err(Errno::ESRCH) => {}
        Err(e) => {
            tracing::warn!(job_id, pgid, signal = %signal, error = %e, "cannot signal the job's process group")
        }
    }
}

/// The timeout has come (SIGTERM) or the kill grace after it has run out (SIGKILL).
pub(super) fn on_deadline(job: &Job, termination: &mut Option<Termination>) {
    let (job_id, pgid) = (job.job_id.as_str(), job.pid as i32);
    match termination.as_mut() {
        None => {
            tracing::info!(job_id, pid = job.pid, pgid, timeout = ?job.timeout, "job timed out; sending SIGTERM");
            signal_group(job_id, pgid, Signal::SIGTERM);
            *termination = Some(Termination {
                cause: Cause::TimedOut,
                last_signal: Signal::SIGTERM,
                kill_at: Instant::now().checked_add(job.kill_grace),
            });
        }
        Some(t) => {
            tracing::info!(job_id, pid = job.pid, pgid, grace = ?job.kill_grace, "job outlived its kill grace; sending SIGKILL");
            job.kill_all(pgid);
            t.last_signal = Signal::SIGKILL;
            t.kill_at = None;
        }
    }
}

/// A stop request: the first sends SIGTERM (SIGKILL follows after the grace), the second
/// SIGKILL at once.
pub(super) fn on_stop_request(
    job: &Job,
    state: StopRequests,
    termination: &mut Option<Termination>,
) {
    let (job_id, pgid) = (job.job_id.as_str(), job.pid as i32);
    let reason = state.reason();
    let Some(level) = state.level() else {
        return;
    };
    if termination.is_none() {
        tracing::info!(
            job_id,
            pid = job.pid,
            pgid,
            ?reason,
            "stopping the job; sending SIGTERM"
        );
        signal_group(job_id, pgid, Signal::SIGTERM);
        *termination = Some(Termination {
            cause: Cause::Stopped(reason),
            last_signal: Signal::SIGTERM,
            kill_at: Instant::now().checked_add(job.kill_grace),
        });
    }
    if level == StopLevel::Kill {
        if let Some(t) = termination.as_mut() {
            if t.last_signal != Signal::SIGKILL {
                tracing::info!(
                    job_id,
                    pid = job.pid,
                    pgid,
                    "stop request to kill; sending SIGKILL"
                );
                job.kill_all(pgid);
                t.last_signal = Signal::SIGKILL;
                t.kill_at = None;
            }
        }
    }
}

pub(super) fn classify(status: ExitStatus, termination: Option<Termination>) -> Ending {
    match termination {
        None => match (status.code(), status.signal()) {
            (Some(code), _) => Ending::Exited { code },
            (None, Some(signal)) => Ending::Signaled { signal },
            // wait() reports only exits and deaths, so this is unreachable in practice.
            (None, None) => Ending::Exited { code: -1 },
        },
        Some(t) => {
            let signal = status.signal().unwrap_or(t.last_signal as i32);
            match t.cause {
                Cause::TimedOut => Ending::TimedOut { signal },
                Cause::Stopped(reason) => Ending::Stopped {
                    reason,
                    signal: Some(signal),
                },
            }
        }
    }
}
