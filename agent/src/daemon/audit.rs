//! What a job's end writes besides its callback: the final audit record of a run this agent
//! reports without having watched it, and the job-end metrics.

use super::Shared;
use crate::job::JobSpec;
use crate::lock::LockState;
use crate::outcome::Outcome;
use crate::report::audit::{JobAuditRecord, JobNames};

/// Writes a job's end to the metrics (when they are on).
pub(super) fn job_end_metrics(
    shared: &Shared,
    spec: (&str, &str, &str),
    outcome: &Outcome,
    duration_ms: Option<u64>,
    queue_wait_ms: Option<u64>,
) {
    let Some(metrics) = shared.metrics.get() else {
        return;
    };
    let (workflow_id, workflow_execution_id, job_name) = spec;
    let status = match outcome {
        Outcome::Completed(_) => crate::metrics::JobStatus::Completed,
        Outcome::Failed(f) => crate::metrics::JobStatus::Failed(f.error.as_str()),
        Outcome::Cancelled { .. } => crate::metrics::JobStatus::Cancelled,
    };
    metrics.job_end(&crate::metrics::JobEnd {
        workflow_id,
        workflow_execution_id,
        job_name,
        status,
        duration_ms,
        queue_wait_ms,
    });
}

/// The final audit record of the run `previous` describes, reported by this agent: one that
/// died while it ran (still `running` in the lock state), or one whose recorded outcome is
/// replayed (final: it ended on `previous.instance_id`, perhaps while no agent watched it).
pub(super) fn run_record(
    shared: &Shared,
    spec: &JobSpec,
    previous: &LockState,
    outcome: &Outcome,
) -> JobAuditRecord {
    let replayed = previous.is_final();
    let (log_group, log_stream, log_file, duration_ms) = match outcome {
        Outcome::Completed(out) => (
            out.log_group.clone(),
            out.log_stream.clone(),
            out.log_file.clone(),
            Some(out.duration_ms),
        ),
        Outcome::Failed(f) => (
            f.cause.log_group.clone(),
            f.cause.log_stream.clone(),
            f.cause.log_file.clone(),
            None,
        ),
        Outcome::Cancelled { .. } => (None, None, None, None),
    };
    JobAuditRecord::running(
        JobNames::of(spec),
        if replayed {
            &previous.instance_id
        } else {
            &shared.attempts.instance_id
        },
        previous.started_at.clone(),
        previous.attempt,
    )
    .with_log(log_group, log_stream, log_file)
    .finished(
        outcome,
        if replayed {
            previous.updated_at.clone()
        } else {
            crate::workflow::now_ts()
        },
        duration_ms,
    )
}
