//! What a job's end writes besides its callback: the final audit record of a run this agent
//! reports without having watched it, and the job-end metrics.

use super::Shared;
use crate::job::JobSpec;
use crate::lock::LockState;
use crate::outcome::Outcome;
use crate::report::audit::JobAuditRecord;

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
    JobAuditRecord {
        job_name: spec.job_name.clone(),
        workflow_execution_id: spec.workflow_execution_id.clone(),
        workflow_id: spec.workflow_id.clone(),
        execution_status: outcome.status().to_string(),
        execution_start_ts: previous.started_at.clone(),
        execution_end_ts: Some(if replayed {
            previous.updated_at.clone()
        } else {
            crate::workflow::now_ts()
        }),
        instance_id: if replayed {
            previous.instance_id.clone()
        } else {
            shared.attempts.instance_id.clone()
        },
        exit_code: outcome.exit_code(),
        error_message: outcome.error_message(),
        sql_state: match outcome {
            Outcome::Failed(f) => f.cause.sql_state.clone(),
            _ => None,
        },
        log_group,
        log_stream,
        log_file,
        attempt: previous.attempt,
        duration_ms,
        cpu_ms: outcome.cpu_ms(),
        max_rss_mb: outcome.max_rss_mb(),
        log_complete: outcome.log_complete(),
        ssm_command_id: spec.ssm_command_id.clone(),
        stage: None,
    }
}
