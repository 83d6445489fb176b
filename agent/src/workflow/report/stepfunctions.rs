//! The timeline of an execution of the generic state machine
//! (`packaging/aws/workflow.asl.json`), from Step Functions and the DynamoDB audit:
//! - the execution history (`GetExecutionHistory`, every page): each `TaskScheduled` of an
//!   SQS job task is one attempt (a Retry schedules the task again), named by the `job_name`
//!   of the message it sends; the event that closes it (`TaskSucceeded`, `TaskFailed`,
//!   `TaskTimedOut`, ...) is found by following `previousEventId` back to it, so the
//!   iterations of a parallel stage, interleaved in the history, never get mixed up;
//! - the workflow audit item: the stages, in config order;
//! - each job's audit item: the real start and end on the instance, the instance, exit code
//!   and `sql_state` of the attempt it holds (the last one). Earlier attempts keep what their
//!   task's output or cause says; their start on an instance is not recorded anywhere.
//!
//! An attempt whose task never closed was cancelled when the execution ended (a sibling
//! failed, or the execution was stopped), or is still running, unless its job audit says
//! how the job itself ended (a job can complete after its Map iteration was aborted).
//!
//! Must not touch: anything but reads.

use std::collections::HashMap;

use aws_sdk_sfn::error::ProvideErrorMetadata;
use aws_sdk_sfn::types::{HistoryEvent, HistoryEventType};
use serde_json::Value;

use super::{parse_ts, Attempt, JobRow, Ms, Outcome, Source, StageBlock, Timeline};
use crate::workflow::aws::{execution_arn, OrchestrateError, Orchestrator};
use crate::workflow::{ExecutionType, Stage};

/// One history event, reduced to what the timeline needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    pub previous: i64,
    pub at: Ms,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A job task was scheduled: its message names the job.
    Scheduled {
        job_name: String,
    },
    Succeeded {
        output: Option<String>,
    },
    Failed {
        error: String,
        cause: Option<String>,
    },
    Other,
}

impl Event {
    pub fn from_sdk(event: &HistoryEvent) -> Event {
        let kind = match event.r#type() {
            HistoryEventType::TaskScheduled => event
                .task_scheduled_event_details()
                .and_then(|d| job_name_of(d.parameters()))
                .map(|job_name| EventKind::Scheduled { job_name })
                .unwrap_or(EventKind::Other),
            HistoryEventType::TaskSucceeded => EventKind::Succeeded {
                output: event
                    .task_succeeded_event_details()
                    .and_then(|d| d.output().map(str::to_string)),
            },
            HistoryEventType::TaskFailed => {
                let d = event.task_failed_event_details();
                failed(
                    d.and_then(|d| d.error()),
                    d.and_then(|d| d.cause()),
                    "States.TaskFailed",
                )
            }
            HistoryEventType::TaskTimedOut => {
                let d = event.task_timed_out_event_details();
                failed(
                    d.and_then(|d| d.error()),
                    d.and_then(|d| d.cause()),
                    "States.Timeout",
                )
            }
            HistoryEventType::TaskSubmitFailed => {
                let d = event.task_submit_failed_event_details();
                failed(
                    d.and_then(|d| d.error()),
                    d.and_then(|d| d.cause()),
                    "States.TaskFailed",
                )
            }
            HistoryEventType::TaskStartFailed => {
                let d = event.task_start_failed_event_details();
                failed(
                    d.and_then(|d| d.error()),
                    d.and_then(|d| d.cause()),
                    "States.TaskFailed",
                )
            }
            _ => EventKind::Other,
        };
        Event {
            id: event.id(),
            previous: event.previous_event_id(),
            at: event.timestamp().to_millis().unwrap_or_default(),
            kind,
        }
    }
}

fn failed(error: Option<&str>, cause: Option<&str>, default: &str) -> EventKind {
    EventKind::Failed {
        error: error.unwrap_or(default).to_string(),
        cause: cause.map(str::to_string),
    }
}

/// The `job_name` of a job task's parameters (`{"QueueUrl": ..., "MessageBody": {...}}`,
/// the body an object or a JSON string).
fn job_name_of(parameters: &str) -> Option<String> {
    let parameters: Value = serde_json::from_str(parameters).ok()?;
    let body = &parameters["MessageBody"];
    let body = match body {
        Value::String(text) => serde_json::from_str(text).ok()?,
        other => other.clone(),
    };
    body["job_name"]
        .as_str()
        .or_else(|| body["script"].as_str())
        .map(str::to_string)
}

/// Every job attempt in the history, by job name, in scheduling order. `execution_end` is
/// the execution's end when it has ended: a task still open then was cancelled.
pub fn attempts_from_history(
    events: &[Event],
    execution_end: Option<Ms>,
) -> HashMap<String, Vec<Attempt>> {
    let by_id: HashMap<i64, &Event> = events.iter().map(|e| (e.id, e)).collect();
    // Scheduled event id -> (job, attempt).
    let mut open: Vec<(i64, String, Attempt)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Scheduled { job_name } => Some((
                e.id,
                job_name.clone(),
                Attempt {
                    number: 0,
                    scheduled: Some(e.at),
                    started: None,
                    ended: None,
                    outcome: Outcome::Running,
                    instance_id: None,
                    exit_code: None,
                    sql_state: None,
                    message: None,
                    log: None,
                },
            )),
            _ => None,
        })
        .collect();
    let index: HashMap<i64, usize> = open
        .iter()
        .enumerate()
        .map(|(i, (id, _, _))| (*id, i))
        .collect();
    for event in events {
        if !matches!(
            event.kind,
            EventKind::Succeeded { .. } | EventKind::Failed { .. }
        ) {
            continue;
        }
        let Some(attempt) = scheduling_of(event, &index, &by_id)
            .and_then(|id| index.get(&id))
            .map(|&i| &mut open[i].2)
        else {
            continue;
        };
        apply_end(attempt, event);
    }
    let mut out: HashMap<String, Vec<Attempt>> = HashMap::new();
    for (_, job, mut attempt) in open {
        if attempt.ended.is_none() {
            if let Some(end) = execution_end {
                attempt.outcome = Outcome::Cancelled;
                attempt.ended = Some(end);
            }
        }
        let list = out.entry(job).or_default();
        attempt.number = list.len() as u32 + 1;
        list.push(attempt);
    }
    out
}

/// The id of the event that scheduled the task `event` ends: back along previousEventId (a
/// few events at most; the bound only guards against a malformed history).
fn scheduling_of(
    event: &Event,
    scheduled: &HashMap<i64, usize>,
    by_id: &HashMap<i64, &Event>,
) -> Option<i64> {
    let mut at = event.previous;
    for _ in 0..64 {
        if scheduled.contains_key(&at) {
            return Some(at);
        }
        match by_id.get(&at) {
            Some(e)
                if !matches!(
                    e.kind,
                    EventKind::Succeeded { .. } | EventKind::Failed { .. }
                ) =>
            {
                at = e.previous
            }
            _ => return None,
        }
    }
    None
}

/// What the end of a task (its success output or its error and cause) says of its attempt.
fn apply_end(attempt: &mut Attempt, event: &Event) {
    attempt.ended = Some(event.at);
    match &event.kind {
        EventKind::Succeeded { output } => {
            attempt.outcome = Outcome::Completed;
            let output: Value = output
                .as_deref()
                .and_then(|o| serde_json::from_str(o).ok())
                .unwrap_or(Value::Null);
            attempt.instance_id = output["instance_id"].as_str().map(str::to_string);
            attempt.exit_code = output["exit_code"].as_i64();
            attempt.log = output["log_stream"].as_str().map(str::to_string);
            // The callback comes just after the job's end: its start, near enough.
            attempt.started = output["duration_ms"]
                .as_i64()
                .map(|d| (event.at - d).max(attempt.scheduled.unwrap_or(i64::MIN)));
        }
        EventKind::Failed { error, cause } => {
            attempt.outcome = Outcome::from_error(error);
            let cause_json: Value = cause
                .as_deref()
                .and_then(|c| serde_json::from_str(c).ok())
                .unwrap_or(Value::Null);
            attempt.exit_code = cause_json["exit_code"].as_i64();
            attempt.sql_state = cause_json["sql_state"].as_str().map(str::to_string);
            attempt.log = cause_json["log_stream"].as_str().map(str::to_string);
            attempt.message = cause_json["message"]
                .as_str()
                .map(str::to_string)
                .or_else(|| cause.clone().filter(|_| cause_json.is_null()));
        }
        _ => {}
    }
}

/// A job audit item (as JSON) applied to the attempt it belongs to: the last one scheduled
/// before the job started. Its times are the job's own on the instance.
pub fn apply_audit(attempts: &mut [Attempt], item: &Value) {
    let s = |k: &str| item[k].as_str().map(str::to_string);
    let Some(started) = s("execution_start_ts").as_deref().and_then(parse_ts) else {
        return;
    };
    let target = attempts
        .iter()
        .rposition(|a| a.scheduled.is_none_or(|t| t <= started))
        .or(attempts.len().checked_sub(1));
    let Some(attempt) = target.map(|i| &mut attempts[i]) else {
        return;
    };
    attempt.started = Some(started);
    if let Some(end) = s("execution_end_ts").as_deref().and_then(parse_ts) {
        attempt.ended = Some(end);
    }
    attempt.instance_id = s("instance_id").or(attempt.instance_id.take());
    attempt.exit_code = item["exit_code"].as_i64().or(attempt.exit_code);
    attempt.sql_state = s("sql_state").or(attempt.sql_state.take());
    attempt.message = s("error_message").or(attempt.message.take());
    attempt.log = s("log_stream").or(attempt.log.take());
    // A task the history never closed (its Map iteration was aborted when a sibling failed,
    // or the execution was stopped): what the job itself did is the audit's to say.
    if matches!(attempt.outcome, Outcome::Running | Outcome::Cancelled) {
        match s("execution_status").as_deref() {
            Some("completed") => attempt.outcome = Outcome::Completed,
            Some("cancelled") => attempt.outcome = Outcome::Cancelled,
            Some("failed") => {
                attempt.outcome = Outcome::from_error(
                    s("error_message")
                        .as_deref()
                        .and_then(|m| m.split(':').next())
                        .filter(|e| e.starts_with("Rsql.") || e.starts_with("States."))
                        .unwrap_or("Rsql.ScriptFailed"),
                )
            }
            _ => {}
        }
    }
}

/// The stages and their jobs: the workflow audit's stages in config order, with any job of
/// the history they do not name in a last stage of its own.
pub fn assemble(
    stages: &[Stage],
    mut attempts: HashMap<String, Vec<Attempt>>,
    history_order: &[String],
) -> Vec<StageBlock> {
    let mut blocks: Vec<StageBlock> = stages
        .iter()
        .enumerate()
        .map(|(i, stage)| StageBlock {
            number: i + 1,
            description: stage.stage_description.clone(),
            execution_type: stage.execution_type,
            enabled: stage.enabled(),
            jobs: stage
                .scripts
                .iter()
                .map(|job| JobRow {
                    job_name: job.clone(),
                    attempts: attempts.remove(job).unwrap_or_default(),
                })
                .collect(),
        })
        .collect();
    let rest: Vec<JobRow> = history_order
        .iter()
        .filter_map(|job| {
            attempts.remove(job).map(|a| JobRow {
                job_name: job.clone(),
                attempts: a,
            })
        })
        .collect();
    if !rest.is_empty() {
        blocks.push(StageBlock {
            number: blocks.len() + 1,
            description: if stages.is_empty() {
                "jobs (the workflow audit has no stages)".to_string()
            } else {
                "jobs not in the workflow's stages".to_string()
            },
            execution_type: ExecutionType::Parallel,
            enabled: true,
            jobs: rest,
        });
    }
    blocks
}

/// Each job the history schedules, once, in the order of its first scheduling.
fn scheduling_order(history: &[Event]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for event in history {
        if let EventKind::Scheduled { job_name } = &event.kind {
            if !order.contains(job_name) {
                order.push(job_name.clone());
            }
        }
    }
    order
}

/// The attempt of a job audit item the history does not schedule; `execution_ended` says a
/// "running" item can no longer be running.
fn audited_only(item: &Value, execution_ended: bool) -> Attempt {
    Attempt {
        number: item["attempt"].as_u64().unwrap_or(1) as u32,
        scheduled: None,
        started: None,
        ended: None,
        outcome: match item["execution_status"].as_str() {
            Some("completed") => Outcome::Completed,
            Some("running") if !execution_ended => Outcome::Running,
            Some("cancelled") => Outcome::Cancelled,
            _ => Outcome::from_error(
                item["error_message"]
                    .as_str()
                    .and_then(|m| m.split(':').next())
                    .unwrap_or("Rsql.ScriptFailed"),
            ),
        },
        instance_id: None,
        exit_code: None,
        sql_state: None,
        message: None,
        log: None,
    }
}

impl Orchestrator {
    /// The timeline of one execution of `state_machine_arn`: `execution` is its name (the
    /// execution id) or its ARN.
    pub async fn timeline(
        &self,
        state_machine_arn: &str,
        execution: &str,
        job_table: &str,
        workflow_table: Option<&str>,
    ) -> Result<Timeline, OrchestrateError> {
        let arn = if execution.starts_with("arn:") {
            execution.to_string()
        } else {
            execution_arn(state_machine_arn, execution)?
        };
        let described = self.describe_execution(&arn).await?;
        let input = crate::workflow::aws::execution_input(&described);
        let workflow_id = input["workflow_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // The audit is keyed by the workflow execution id: the input's, else the name.
        let execution_id = input["workflow_execution_id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| described.name().unwrap_or(execution).to_string());

        let history = self.history(&arn).await?;
        let ended = described.stop_date().and_then(|d| d.to_millis().ok());
        let mut attempts = attempts_from_history(&history, ended);
        let history_order = scheduling_order(&history);

        let stages: Vec<Stage> = if workflow_id.is_empty() {
            Vec::new()
        } else {
            self.workflow_audit(
                state_machine_arn,
                &execution_id,
                &workflow_id,
                workflow_table,
            )
            .await?
            .and_then(|a| serde_json::from_value(a["workflow_stages"].clone()).ok())
            .unwrap_or_default()
        };
        let mut names: Vec<String> = stages.iter().flat_map(|s| s.scripts.clone()).collect();
        names.extend(history_order.iter().cloned());
        names.dedup();
        for job in &names {
            let Some(item) = self.job_item(job_table, job, &execution_id).await? else {
                continue;
            };
            let list = attempts.entry(job.clone()).or_default();
            if list.is_empty() {
                // Audited but not in the history (an older execution's item): its own run.
                list.push(audited_only(&item, ended.is_some()));
            }
            apply_audit(list, &item);
        }

        Ok(Timeline {
            source: Source::StepFunctions,
            workflow_id,
            execution_id,
            execution_arn: Some(arn),
            status: described.status().as_str().to_string(),
            started: described.start_date().to_millis().ok(),
            ended,
            error: described.error().map(str::to_string),
            cause: described.cause().map(str::to_string),
            stages: assemble(&stages, attempts, &history_order),
        })
    }

    async fn history(&self, arn: &str) -> Result<Vec<Event>, OrchestrateError> {
        let mut events = Vec::new();
        let mut next = None;
        loop {
            let out = self
                .sfn()
                .get_execution_history()
                .execution_arn(arn)
                .set_next_token(next)
                .max_results(1000)
                .send()
                .await
                .map_err(|e| {
                    let detail = match (e.code(), e.message()) {
                        (Some(c), Some(m)) => format!("{c}: {m}"),
                        _ => aws_sdk_sfn::error::DisplayErrorContext(&e).to_string(),
                    };
                    match e.code() {
                        Some("ExecutionDoesNotExist") => OrchestrateError::NoExecution {
                            execution: arn.to_string(),
                            detail,
                        },
                        _ => OrchestrateError::Aws {
                            what: format!("GetExecutionHistory {arn}"),
                            detail,
                        },
                    }
                })?;
            events.extend(out.events().iter().map(Event::from_sdk));
            next = out.next_token;
            if next.is_none() {
                return Ok(events);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64, previous: i64, at: Ms, kind: EventKind) -> Event {
        Event {
            id,
            previous,
            at,
            kind,
        }
    }

    fn scheduled(job: &str) -> EventKind {
        EventKind::Scheduled {
            job_name: job.into(),
        }
    }

    #[test]
    fn job_name_from_the_sqs_parameters() {
        assert_eq!(
            job_name_of(r#"{"QueueUrl":"q","MessageBody":{"task_token":"t","job_name":"a.sh"}}"#)
                .as_deref(),
            Some("a.sh")
        );
        assert_eq!(
            job_name_of(r#"{"QueueUrl":"q","MessageBody":"{\"job_name\":\"b.sh\"}"}"#).as_deref(),
            Some("b.sh")
        );
        assert_eq!(job_name_of(r#"{"TableName":"t"}"#), None);
    }

    /// Two parallel iterations interleaved; `b` times out once and is retried.
    fn history() -> Vec<Event> {
        vec![
            ev(10, 9, 1_000, scheduled("a")),
            ev(11, 9, 1_000, scheduled("b")),
            ev(12, 10, 1_001, EventKind::Other), // TaskStarted a
            ev(13, 11, 1_001, EventKind::Other), // TaskStarted b
            ev(14, 12, 1_002, EventKind::Other), // TaskSubmitted a
            ev(15, 13, 1_002, EventKind::Other), // TaskSubmitted b
            ev(
                16,
                15,
                7_000,
                EventKind::Failed {
                    error: "States.Timeout".into(),
                    cause: None,
                },
            ),
            ev(
                17,
                14,
                9_000,
                EventKind::Succeeded {
                    output: Some(
                        r#"{"status":"completed","exit_code":0,"duration_ms":3000,"instance_id":"i-0a","log_stream":"s-a"}"#.into(),
                    ),
                },
            ),
            ev(18, 16, 12_000, scheduled("b")),
            ev(19, 18, 12_001, EventKind::Other),
            ev(
                20,
                19,
                15_000,
                EventKind::Failed {
                    error: "Rsql.ScriptFailed".into(),
                    cause: Some(
                        r#"{"exit_code":3,"sql_state":"42P01","message":"relation nope","log_stream":"s-b2"}"#
                            .into(),
                    ),
                },
            ),
        ]
    }

    #[test]
    fn history_attempts_close_by_previous_event_chain() {
        let attempts = attempts_from_history(&history(), Some(15_500));
        let a = &attempts["a"];
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].outcome, Outcome::Completed);
        assert_eq!(a[0].scheduled, Some(1_000));
        assert_eq!(a[0].started, Some(6_000));
        assert_eq!(a[0].ended, Some(9_000));
        assert_eq!(a[0].instance_id.as_deref(), Some("i-0a"));
        let b = &attempts["b"];
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].outcome.key(), "timed_out");
        assert_eq!(b[0].ended, Some(7_000));
        assert_eq!(b[1].number, 2);
        assert_eq!(
            b[1].outcome,
            Outcome::Failed {
                error: "Rsql.ScriptFailed".into()
            }
        );
        assert_eq!(b[1].sql_state.as_deref(), Some("42P01"));
        assert_eq!(b[1].exit_code, Some(3));
    }

    #[test]
    fn an_open_task_is_cancelled_when_the_execution_ended_and_running_before() {
        let events = vec![ev(10, 9, 1_000, scheduled("a"))];
        let mut ended = attempts_from_history(&events, Some(5_000));
        assert_eq!(ended["a"][0].outcome, Outcome::Cancelled);
        // Unless its job completed before the agent heard the task was closed.
        let item = serde_json::json!({
            "execution_start_ts": "1970-01-01T00:00:01.200Z",
            "execution_end_ts": "1970-01-01T00:00:01.900Z",
            "execution_status": "completed",
        });
        apply_audit(ended.get_mut("a").unwrap(), &item);
        assert_eq!(ended["a"][0].outcome, Outcome::Completed);
        assert_eq!(ended["a"][0].ended, Some(1_900));
        let running = attempts_from_history(&events, None);
        assert_eq!(running["a"][0].outcome, Outcome::Running);
        assert_eq!(running["a"][0].ended, None);
    }

    #[test]
    fn the_audit_item_lands_on_the_attempt_it_ran_under() {
        let mut attempts = attempts_from_history(&history(), Some(15_500));
        let start = super::super::format_utc(0); // only to check the format parses
        assert!(parse_ts(&start.replace(' ', "T")).is_some());
        let item = serde_json::json!({
            "execution_start_ts": "1970-01-01T00:00:12.500Z",
            "execution_end_ts": "1970-01-01T00:00:14.900Z",
            "execution_status": "failed",
            "instance_id": "i-0b",
            "exit_code": 3,
            "log_stream": "s-b2",
        });
        let b = attempts.get_mut("b").unwrap();
        apply_audit(b, &item);
        assert_eq!(b[0].started, None, "the first attempt's start is unknown");
        assert_eq!(b[1].started, Some(12_500));
        assert_eq!(b[1].queue_wait(), Some(500));
        assert_eq!(b[1].ended, Some(14_900));
        assert_eq!(b[1].instance_id.as_deref(), Some("i-0b"));
    }

    #[test]
    fn stages_in_config_order_and_strays_last() {
        let stages: Vec<Stage> = serde_json::from_value(serde_json::json!([
            {"execution_flag":"y","execution_type":"sequential","stage_description":"one","scripts":["b"]},
            {"execution_flag":"n","execution_type":"parallel","stage_description":"two","scripts":["c"]},
        ]))
        .unwrap();
        let attempts = attempts_from_history(&history(), Some(15_500));
        let blocks = assemble(&stages, attempts, &["a".to_string(), "b".to_string()]);
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[0].jobs[0].job_name, "b");
        assert_eq!(blocks[0].jobs[0].attempts.len(), 2);
        assert!(!blocks[1].enabled);
        assert!(blocks[1].jobs[0].attempts.is_empty());
        assert_eq!(blocks[2].jobs[0].job_name, "a");
    }
}
