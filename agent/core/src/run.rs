//! A finished run's outcome: classified from how it ended and what its log says, and
//! recorded in the job's lock state so any agent of the fleet can replay it. The job owner
//! and the local runner do both the same way.
//!
//! Must not touch: reporting; the caller sends the outcome where it goes.

use std::time::{Duration, SystemTime};

use crate::joblog;
use crate::lock::{LockState, RunState};
use crate::outcome::{self, Finished, LogLocation, Outcome};
use crate::supervisor;

/// How much of stderr goes into a failure cause.
pub const STDERR_TAIL_BYTES: usize = 4096;

/// What classifying a finished run needs besides the run itself.
#[derive(Debug, Clone)]
pub struct RunFacts<'a> {
    pub job_name: &'a str,
    pub workflow_execution_id: &'a str,
    pub instance_id: &'a str,
    pub timeout: Duration,
    pub log_group: Option<String>,
    pub log_stream: Option<String>,
}

/// Classifies a finished run: its ending, with the SQL error and the stderr tail read back
/// from its log.
pub fn classify_run(facts: &RunFacts<'_>, run: &supervisor::RunOutcome) -> Outcome {
    let log_file = &run.log_path;
    outcome::classify(Finished {
        job_name: facts.job_name,
        workflow_execution_id: facts.workflow_execution_id,
        instance_id: facts.instance_id,
        ending: &run.ending,
        duration_ms: run.duration.as_millis() as u64,
        timeout_secs: facts.timeout.as_secs(),
        sql_error: joblog::extract_sql_error(log_file),
        stderr_tail: joblog::stderr_tail(log_file, STDERR_TAIL_BYTES),
        log: LogLocation {
            log_group: facts.log_group.clone(),
            log_stream: facts.log_stream.clone(),
            log_file: Some(log_file.display().to_string()),
        },
        usage: run.usage,
        log_complete: run.log_complete,
    })
    .masked()
}

/// Sets a lock state record to the final state `outcome` means, with the outcome to replay.
pub fn record_outcome(state: &mut LockState, outcome: &Outcome) {
    state.state = match outcome {
        Outcome::Completed(_) => RunState::Completed,
        Outcome::Failed(f) if f.error == outcome::ErrorName::Interrupted => RunState::Interrupted,
        Outcome::Failed(_) => RunState::Failed,
        Outcome::Cancelled { .. } => RunState::Cancelled,
    };
    state.exit_code = outcome.exit_code();
    state.outcome = serde_json::to_value(outcome.masked()).ok();
    state.updated_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
}
