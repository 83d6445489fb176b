//! The resident daemon: wires intake, locks, the supervisor and the reporters together.
//!
//! Owns: the receive loop (only as many messages as there are free job slots), the life of
//! one delivery (parse → lock decision → run with heartbeats → outcome in the outbox →
//! delete the message → unlock), heartbeats and cancellation, and the order of shutdown.
//!
//! Must not touch: how a process is supervised, how a log is written, or how a report is
//! retried; those belong to `supervisor`, `joblog` and `report`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::attempt::{Acquired, AttemptContext, AttemptError, AttemptRequest};
use crate::aws::AwsClients;
use crate::config::Config;
use crate::intake::sqs::{Delivery, SqsIntake};
use crate::job::{JobRules, JobSpec};
use crate::lock::{self, Decision, JobLock, LockState, RunState};
use crate::outcome::{ErrorName, Failure, FailureCause, Outcome};
use crate::report::audit::dynamodb::JobAuditTable;
use crate::report::audit::JobAuditRecord;
use crate::report::outbox::{Callback, Outbox, OutboxEntry, OutboxError};
use crate::report::retry::RetryPolicy;
use crate::report::stepfunctions::StepFunctions;
use crate::secrets::DatabaseEnv;
use crate::supervisor::StopReason;

/// Heartbeats go out at a third of the task's `HeartbeatSeconds`, within these bounds.
const MIN_TICK: Duration = Duration::from_secs(1);
const MAX_TICK: Duration = Duration::from_secs(300);
/// How often old job logs and finished lock entries are cleaned up.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(3600);
/// After a shutdown, how long the outbox may keep trying before the process exits; what is
/// left goes out after the next start.
const OUTBOX_DRAIN_ON_EXIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no intake is configured: set [intake.sqs] queue_url")]
    NoIntake,
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Attempt(#[from] AttemptError),
}

/// Everything one delivery needs; shared by all job tasks.
#[derive(Debug)]
struct Shared {
    config: Arc<Config>,
    attempts: Arc<AttemptContext>,
    sfn: StepFunctions,
    audit_table: Option<JobAuditTable>,
    outbox: Outbox,
    sqs: SqsIntake,
    database: DatabaseEnv,
}

/// The daemon, built once: clients, outbox and context are reused by every job.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<Shared>,
    policy: RetryPolicy,
}

/// The heartbeat period for a job: a third of its `heartbeat_seconds`, or the configured
/// interval when the message has none, and never longer than a third of the visibility
/// timeout (the same tick keeps the message hidden).
pub fn tick_for(
    heartbeat: Option<Duration>,
    configured: Duration,
    visibility: Duration,
) -> Duration {
    let tick = match heartbeat {
        Some(hb) => (hb / 3).clamp(MIN_TICK, MAX_TICK),
        None => configured,
    };
    tick.min((visibility / 3).max(MIN_TICK))
}

impl Daemon {
    pub fn new(
        config: Arc<Config>,
        attempts: Arc<AttemptContext>,
        clients: &AwsClients,
    ) -> Result<Daemon, DaemonError> {
        let sqs = config.sqs.clone().ok_or(DaemonError::NoIntake)?;
        let outbox = Outbox::open(&config.agent.state_dir)?;
        let audit_table = config
            .audit
            .job_table
            .as_ref()
            .map(|t| JobAuditTable::new(clients.dynamodb.clone(), t.clone()));
        let database = DatabaseEnv::new(
            config.database.clone(),
            config
                .database
                .secret_id
                .as_ref()
                .map(|_| clients.secrets.clone()),
        );
        Ok(Daemon {
            shared: Arc::new(Shared {
                config,
                attempts,
                sfn: StepFunctions::new(clients.sfn.clone()),
                audit_table,
                outbox,
                sqs: SqsIntake::new(clients.sqs.clone(), sqs),
                database,
            }),
            policy: RetryPolicy {
                max: Duration::from_secs(10),
                ..RetryPolicy::default()
            },
        })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.shared.outbox
    }

    /// Runs until `shutdown` resolves, then stops intake, lets running jobs finish within
    /// `shutdown_grace`, stops the rest (`Rsql.Interrupted`) and gives the outbox a last
    /// chance to deliver.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let shared = self.shared.clone();
        let pending = shared.outbox.len()?;
        if pending > 0 {
            tracing::info!(
                pending,
                "delivering outcomes left in the outbox by an earlier run"
            );
        }
        let (outbox_stop_tx, mut outbox_stop_rx) = watch::channel(false);
        let worker = tokio::spawn(shared.outbox.clone().run_worker(
            shared.sfn.clone(),
            shared.audit_table.clone(),
            self.policy,
            async move {
                let _ = outbox_stop_rx.wait_for(|stop| *stop).await;
            },
        ));

        let housekeeping = {
            let attempts = shared.attempts.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(HOUSEKEEPING_INTERVAL);
                loop {
                    every.tick().await;
                    let attempts = attempts.clone();
                    let _ = tokio::task::spawn_blocking(move || attempts.housekeeping()).await;
                }
            })
        };

        let (jobs_stop_tx, jobs_stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(shared.config.agent.max_concurrent_jobs));
        let mut jobs = JoinSet::new();
        tokio::pin!(shutdown);
        let mut receive_failures = 0u32;
        tracing::info!(
            queue_url = shared.sqs.queue_url(),
            max_concurrent_jobs = shared.config.agent.max_concurrent_jobs,
            "receiving jobs"
        );
        loop {
            while jobs.try_join_next().is_some() {}
            // Wait for a free slot first: never take a message there is no room to run.
            let first = tokio::select! {
                _ = &mut shutdown => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                Some(_) = jobs.join_next(), if !jobs.is_empty() => continue,
            };
            let free = 1 + slots.available_permits();
            let received = tokio::select! {
                _ = &mut shutdown => break,
                r = shared.sqs.receive(free) => r,
            };
            let deliveries = match received {
                Ok(d) => {
                    receive_failures = 0;
                    d
                }
                Err(e) => {
                    let delay = self.policy.delay(receive_failures);
                    receive_failures = receive_failures.saturating_add(1);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot receive jobs");
                    drop(first);
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            let mut first = Some(first);
            for delivery in deliveries {
                let permit = match first.take() {
                    Some(p) => p,
                    None => match slots.clone().try_acquire_owned() {
                        Ok(p) => p,
                        // Cannot happen (we asked for no more than were free), but a message
                        // without a slot is simply left to become visible again.
                        Err(_) => continue,
                    },
                };
                let shared = shared.clone();
                let stop = jobs_stop_rx.clone();
                jobs.spawn(async move {
                    handle(shared, delivery, stop, permit).await;
                });
            }
        }

        // Shutdown: intake is stopped; running jobs may finish within the grace period.
        let running = jobs.len();
        let grace = shared.config.agent.shutdown_grace;
        tracing::info!(
            running,
            grace_secs = grace.as_secs(),
            "shutting down: intake stopped, draining jobs"
        );
        let drained =
            tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                running = jobs.len(),
                "shutdown grace is over: stopping the remaining jobs (reported Rsql.Interrupted)"
            );
            let _ = jobs_stop_tx.send(true);
            while jobs.join_next().await.is_some() {}
        }
        // The final outcomes are in the outbox; give delivery a bounded last chance.
        let deadline = tokio::time::Instant::now() + OUTBOX_DRAIN_ON_EXIT;
        while shared.outbox.len().unwrap_or(0) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        housekeeping.abort();
        let _ = outbox_stop_tx.send(true);
        if let Ok(exit) = worker.await {
            if exit.pending > 0 {
                tracing::warn!(
                    pending = exit.pending,
                    "outcomes left in the outbox; they are delivered after the next start"
                );
            }
        }
        Ok(())
    }
}

/// A job-ending failure the agent itself produces (not from a script run).
fn failure(error: ErrorName, message: String) -> Outcome {
    Outcome::Failed(Failure {
        error,
        cause: FailureCause {
            message,
            ..FailureCause::default()
        },
    })
}

/// The life of one SQS delivery.
async fn handle(
    shared: Arc<Shared>,
    delivery: Delivery,
    shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let rules = JobRules {
        script_dir: &shared.config.jobs.script_dir,
        default_timeout: shared.config.jobs.default_timeout,
        require_token: true,
    };
    let spec = match JobSpec::parse(delivery.body.as_bytes(), &rules) {
        Ok(spec) => spec,
        Err(invalid) => {
            let reason = invalid.error.to_string();
            match invalid.task_token {
                Some(token) => {
                    tracing::warn!(
                        message_id = %delivery.message_id,
                        token_hash = %lock::token_hash(&token),
                        reason = %reason,
                        "rejected a job message: failing its task with Rsql.InvalidJob"
                    );
                    let outcome = failure(ErrorName::InvalidJob, reason);
                    let entry =
                        OutboxEntry::new(Some(token), Callback::from_outcome(&outcome), None);
                    if let Err(e) = shared.outbox.put(&entry) {
                        // Not durable: keep the message so it comes back and is tried again.
                        tracing::error!(error = %e, "cannot store the outcome of a rejected message; leaving it in the queue");
                        return;
                    }
                }
                None => tracing::warn!(
                    message_id = %delivery.message_id,
                    reason = %reason,
                    "rejected a job message with no usable task token: nobody can be told, deleting it"
                ),
            }
            delete(&shared, &delivery).await;
            return;
        }
    };
    let Some(token) = spec.task_token.clone() else {
        return;
    };
    let token_hash = lock::token_hash(&token);
    let span = tracing::info_span!(
        "job",
        job_name = %spec.job_name,
        workflow_execution_id = %spec.workflow_execution_id,
        token_hash = %token_hash,
    );
    run_delivery(shared, delivery, spec, token, token_hash, shutdown)
        .instrument(span)
        .await
}

async fn run_delivery(
    shared: Arc<Shared>,
    delivery: Delivery,
    spec: JobSpec,
    token: String,
    token_hash: String,
    shutdown: watch::Receiver<bool>,
) {
    let Acquired { mut held, decision } = match shared.attempts.acquire(&spec, &token_hash) {
        Ok(a) => a,
        Err(AttemptError::Busy { holder, .. }) => {
            // Another runner has it now; this copy comes back later to find it finished,
            // and then replays its outcome.
            tracing::info!(holder = %holder, receive_count = delivery.receive_count, "job is running elsewhere; leaving this copy");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot take the job's lock; leaving the message for a retry");
            return;
        }
    };
    let attempt = match decision {
        Decision::Run { attempt } => attempt,
        Decision::Replay(state) => {
            tracing::info!(state = ?state.state, "redelivered after the job finished: replaying its recorded outcome");
            let outcome = recorded_outcome(&state);
            finish(&shared, &delivery, Some(held), Some(&token), &outcome, None).await;
            return;
        }
        Decision::Interrupted(previous) => {
            let outcome = failure(
                ErrorName::Interrupted,
                format!(
                    "the agent running this job (host {}, pid {}, instance {}) stopped while it ran; last heartbeat {}",
                    previous.host, previous.pid, previous.instance_id, previous.heartbeat_at
                ),
            );
            tracing::warn!(
                "the job's previous runner died while it ran: reporting Rsql.Interrupted"
            );
            let mut state = previous.clone();
            state.state = RunState::Interrupted;
            state.outcome = serde_json::to_value(&outcome).ok();
            state.updated_at = crate::workflow::now_ts();
            if let Err(e) = held.write_state(&state) {
                tracing::warn!(error = %e, "cannot record the interruption in the lock state");
            }
            let record = interrupted_record(&shared, &spec, &previous, &outcome);
            finish(
                &shared,
                &delivery,
                Some(held),
                Some(&token),
                &outcome,
                Some(record),
            )
            .await;
            return;
        }
    };

    let env = match shared.database.job_env().await {
        Ok(env) => env,
        Err(e) => {
            let outcome = failure(ErrorName::ConnectionFailed, e.to_string());
            tracing::error!(error = %e, "cannot get the database credentials");
            finish(&shared, &delivery, Some(held), Some(&token), &outcome, None).await;
            return;
        }
    };
    let mut request = AttemptRequest::new(spec.clone());
    request.env = Some(env);

    let (stop_tx, stop_rx) = watch::channel(None);
    let tick = tick_for(
        spec.heartbeat,
        shared.config.jobs.heartbeat_interval,
        shared.sqs.visibility_timeout(),
    );
    let audit_table = shared.audit_table.clone();
    let outbox = shared.outbox.clone();
    let on_start = move |record: &JobAuditRecord| {
        tracing::info!(
            attempt,
            log_file = record.log_file.as_deref().unwrap_or("-"),
            "job started"
        );
        if let Some(table) = audit_table {
            let record = record.clone();
            tokio::spawn(async move {
                if let Err(e) = table.put(&record).await {
                    // The running record goes through the outbox too; a late `running` can
                    // never overwrite the final status (the write is conditional).
                    tracing::warn!(error = %e, "audit `running` write failed; queued in the outbox");
                    let _ = outbox.put(&OutboxEntry::new(None, None, Some(record)));
                }
            });
        }
    };
    let execute = shared
        .attempts
        .execute(held, &request, &token_hash, attempt, stop_rx, on_start);
    let heartbeats = heartbeat_loop(&shared, &token, &delivery, tick, &stop_tx);
    let on_shutdown = async {
        let mut shutdown = shutdown;
        if shutdown.wait_for(|s| *s).await.is_ok() {
            let _ = stop_tx.send(Some(StopReason::Shutdown));
        }
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        r = execute => r,
        _ = heartbeats => unreachable!("the heartbeat loop never ends"),
        _ = on_shutdown => unreachable!("the shutdown forwarder never ends"),
    };
    let (held, result) = match result {
        Ok(r) => r,
        Err(e) => {
            // The job could not be started or its files written (a script that cannot be
            // executed, a full disk). Say so now rather than let the task time out.
            tracing::error!(error = %e, "the job could not be run");
            let outcome = failure(
                ErrorName::ScriptFailed,
                format!("the agent could not run the job: {e}"),
            );
            finish(&shared, &delivery, None, Some(&token), &outcome, None).await;
            return;
        }
    };
    tracing::info!(
        status = result.outcome.status(),
        exit_code = result.outcome.exit_code(),
        duration_ms = result.duration.as_millis() as u64,
        "job finished"
    );
    let token = match result.outcome {
        // The task is closed upstream: no callback can be taken.
        Outcome::Cancelled { .. } => None,
        _ => Some(token.as_str()),
    };
    finish(
        &shared,
        &delivery,
        Some(held),
        token,
        &result.outcome,
        Some(result.audit),
    )
    .await;
}

/// Every tick: a Step Functions heartbeat (a closed task stops the job) and another
/// visibility timeout for the message. Never returns.
async fn heartbeat_loop(
    shared: &Shared,
    token: &str,
    delivery: &Delivery,
    tick: Duration,
    stop: &watch::Sender<Option<StopReason>>,
) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    let mut closed = false;
    loop {
        interval.tick().await;
        if !closed {
            match shared.sfn.heartbeat(token).await {
                Ok(()) => {}
                Err(e) if e.is_task_closed() => {
                    tracing::warn!(reason = %e, "the task is closed upstream: stopping the job");
                    closed = true;
                    let _ = stop.send(Some(StopReason::Cancelled));
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed; will try again next tick"),
            }
        }
        if let Err(e) = shared.sqs.keep_hidden(&delivery.receipt_handle).await {
            tracing::warn!(error = %e, "cannot extend the message's visibility");
        }
    }
}

/// Makes the outcome durable, then deletes the message and releases the lock, in that
/// order: a crash anywhere in between leaves a redelivery that replays, never a lost report.
async fn finish(
    shared: &Shared,
    delivery: &Delivery,
    held: Option<JobLock>,
    token: Option<&str>,
    outcome: &Outcome,
    audit: Option<JobAuditRecord>,
) {
    let callback = token.and_then(|_| Callback::from_outcome(outcome));
    let audit = audit.filter(|_| shared.audit_table.is_some());
    if callback.is_some() || audit.is_some() {
        let entry = OutboxEntry::new(token.map(str::to_string), callback, audit);
        if let Err(e) = shared.outbox.put(&entry) {
            tracing::error!(error = %e, "cannot store the outcome durably; leaving the message to be redelivered and replayed");
            drop(held);
            return;
        }
    }
    delete(shared, delivery).await;
    if let Some(held) = held {
        if let Err(e) = held.release() {
            tracing::warn!(error = %e, "cannot release the job's lock cleanly");
        }
    }
}

async fn delete(shared: &Shared, delivery: &Delivery) {
    let policy = RetryPolicy::default();
    for attempt in 0..5 {
        match shared.sqs.delete(&delivery.receipt_handle).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "cannot delete the message");
                tokio::time::sleep(policy.delay(attempt)).await;
            }
        }
    }
    // Harmless: the copy comes back and replays the recorded outcome.
    tracing::warn!(message_id = %delivery.message_id, "giving up deleting the message; its redelivery will replay the outcome");
}

/// The outcome a finished job recorded in its lock state.
fn recorded_outcome(state: &LockState) -> Outcome {
    state
        .outcome
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_else(|| {
            failure(
                ErrorName::Interrupted,
                format!(
                    "the job ended as {:?} but its outcome was not recorded",
                    state.state
                ),
            )
        })
}

fn interrupted_record(
    shared: &Shared,
    spec: &JobSpec,
    previous: &LockState,
    outcome: &Outcome,
) -> JobAuditRecord {
    JobAuditRecord {
        job_name: spec.job_name.clone(),
        workflow_execution_id: spec.workflow_execution_id.clone(),
        workflow_id: spec.workflow_id.clone(),
        execution_status: outcome.status().to_string(),
        execution_start_ts: previous.started_at.clone(),
        execution_end_ts: Some(crate::workflow::now_ts()),
        instance_id: shared.attempts.instance_id.clone(),
        exit_code: None,
        error_message: outcome.error_message(),
        sql_state: None,
        log_group: None,
        log_stream: None,
        log_file: None,
        attempt: previous.attempt,
        duration_ms: None,
        ssm_command_id: spec.ssm_command_id.clone(),
        stage: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_tick_is_a_third_and_bounded() {
        let vis = Duration::from_secs(120);
        let cfg = Duration::from_secs(20);
        assert_eq!(
            tick_for(Some(Duration::from_secs(60)), cfg, vis),
            Duration::from_secs(20)
        );
        assert_eq!(
            tick_for(Some(Duration::from_secs(2)), cfg, vis),
            Duration::from_secs(1)
        );
        assert_eq!(tick_for(None, cfg, vis), cfg);
        assert_eq!(
            tick_for(Some(Duration::from_secs(3600)), cfg, vis),
            Duration::from_secs(40)
        );
    }
}
