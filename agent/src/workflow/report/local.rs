//! The timeline of a local execution (`rsql-agent workflow run`), from the local audit under
//! the config's `state_dir`.
//!
//! Each job record pair (`running`, then final) with the same start is one attempt; a
//! resumed execution adds attempts in later runs. The local runner records no scheduling
//! time, so it is derived from how the runner schedules, within the attempt's run: a job of
//! a parallel stage is ready when its stage starts (the run's start, or the end of the last
//! job of the earlier stages), a job of a sequential stage when the job before it ends.
//!
//! Must not touch: the audit files (read only).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{parse_ts, Attempt, JobRow, Ms, Outcome, Source, StageBlock, Timeline};
use crate::report::audit::{AuditError, JobAuditRecord, LocalAudit, WorkflowAuditRecord};
use crate::workflow::{ExecutionType, Stage};

#[derive(Debug, thiserror::Error)]
pub enum LocalReportError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("execution {execution_id:?} is not in the local audit at {audit} (is --config the config the workflow ran with?)")]
    NoExecution {
        execution_id: String,
        audit: PathBuf,
    },
}

/// The timeline of `execution_id` from the local audit under `state_dir`.
pub fn load(state_dir: &Path, execution_id: &str) -> Result<Timeline, LocalReportError> {
    let audit = LocalAudit::open(state_dir)?;
    let workflows = audit.workflow_records_of(execution_id)?;
    let jobs = audit.job_records_of(execution_id)?;
    if workflows.is_empty() && jobs.is_empty() {
        return Err(LocalReportError::NoExecution {
            execution_id: execution_id.to_string(),
            audit: audit.workflows_path(),
        });
    }
    Ok(build(execution_id, &workflows, &jobs))
}

/// The timeline from the records (oldest first), without touching files.
pub fn build(
    execution_id: &str,
    workflows: &[WorkflowAuditRecord],
    jobs: &[JobAuditRecord],
) -> Timeline {
    let latest = workflows.last();
    let running = latest.is_none_or(|w| w.execution_status == "running");

    // Attempts by job, keyed by their start; a later record of the same attempt wins.
    let mut attempts: HashMap<&str, Vec<(&str, &JobAuditRecord)>> = HashMap::new();
    for record in jobs {
        let list = attempts.entry(&record.job_name).or_default();
        match list
            .iter_mut()
            .find(|(start, _)| *start == record.execution_start_ts)
        {
            Some(slot) => slot.1 = record,
            None => list.push((&record.execution_start_ts, record)),
        }
    }

    let stages = stages_of(workflows, jobs);
    let mut run_starts: Vec<Ms> = workflows
        .iter()
        .filter_map(|w| parse_ts(&w.execution_start_ts))
        .collect();
    run_starts.sort_unstable();
    run_starts.dedup();
    let run_of = |t: Ms| run_starts.iter().rev().find(|&&s| s <= t).copied();

    let mut blocks: Vec<StageBlock> = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let mut rows = Vec::new();
        for script in &stage.scripts {
            let mut list: Vec<Attempt> = attempts
                .get(script.as_str())
                .map(|l| {
                    l.iter()
                        .map(|(_, r)| attempt_of(r, running))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            list.sort_by_key(|a| a.started);
            for (n, a) in list.iter_mut().enumerate() {
                a.number = n as u32 + 1;
            }
            rows.push(JobRow {
                job_name: script.clone(),
                attempts: list,
            });
        }
        blocks.push(StageBlock {
            number: i + 1,
            description: stage.stage_description.clone(),
            execution_type: stage.execution_type,
            enabled: stage.enabled(),
            jobs: rows,
        });
    }
    derive_scheduling(&mut blocks, &run_of);

    let started = workflows
        .iter()
        .filter_map(|w| parse_ts(&w.execution_start_ts))
        .min();
    Timeline {
        source: Source::Local,
        workflow_id: latest
            .map(|w| w.workflow_id.clone())
            .or_else(|| jobs.first().map(|j| j.workflow_id.clone()))
            .unwrap_or_default(),
        execution_id: execution_id.to_string(),
        execution_arn: None,
        status: latest
            .map(|w| w.execution_status.clone())
            .unwrap_or_else(|| "unknown".to_string()),
        started,
        ended: latest
            .and_then(|w| w.execution_end_ts.as_deref())
            .and_then(parse_ts),
        // The runner's message is `<job>: <error name>: <message>`.
        error: latest
            .and_then(|w| w.error_message.as_deref())
            .and_then(|m| m.split(": ").find_map(error_name).map(str::to_string)),
        cause: latest.and_then(|w| w.error_message.clone()),
        stages: blocks,
    }
}

/// The stages the run recorded; for records that predate them, one stage per stage
/// description in the order the jobs appear.
fn stages_of(workflows: &[WorkflowAuditRecord], jobs: &[JobAuditRecord]) -> Vec<Stage> {
    if let Some(stages) = workflows
        .iter()
        .rev()
        .find_map(|w| w.workflow_stages.clone())
    {
        return stages;
    }
    let mut stages: Vec<Stage> = Vec::new();
    let names: Vec<&str> = match workflows.last() {
        Some(w) if !w.rsql_jobs.is_empty() => w.rsql_jobs.iter().map(String::as_str).collect(),
        _ => jobs.iter().map(|j| j.job_name.as_str()).collect(),
    };
    for name in names {
        let description = jobs
            .iter()
            .find(|j| j.job_name == name)
            .and_then(|j| j.stage.clone())
            .unwrap_or_default();
        if stages.iter().any(|s| s.scripts.iter().any(|x| x == name)) {
            continue;
        }
        match stages.last_mut() {
            Some(s) if s.stage_description == description => s.scripts.push(name.to_string()),
            _ => stages.push(Stage {
                execution_flag: "y".to_string(),
                execution_type: ExecutionType::Parallel,
                stage_description: description,
                scripts: vec![name.to_string()],
            }),
        }
    }
    stages
}

fn attempt_of(record: &JobAuditRecord, workflow_running: bool) -> Attempt {
    let error = record.error_message.as_deref().and_then(error_name);
    let outcome = match record.execution_status.as_str() {
        "completed" => Outcome::Completed,
        "cancelled" => Outcome::Cancelled,
        "running" if workflow_running => Outcome::Running,
        // The run ended (or died) with this attempt never recorded as ended: its runner died.
        "running" => Outcome::Interrupted,
        _ => Outcome::from_error(error.unwrap_or("Rsql.ScriptFailed")),
    };
    let started = parse_ts(&record.execution_start_ts);
    Attempt {
        number: record.attempt,
        scheduled: None,
        started,
        ended: record
            .execution_end_ts
            .as_deref()
            .and_then(parse_ts)
            .or_else(|| Some(started? + record.duration_ms? as Ms)),
        outcome,
        instance_id: Some(record.instance_id.clone()),
        exit_code: record.exit_code.map(i64::from),
        sql_state: record.sql_state.clone(),
        message: record.error_message.clone(),
        log: record
            .log_stream
            .clone()
            .or_else(|| record.log_file.clone()),
    }
}

/// `Rsql.ScriptFailed: [42P01] ...` -> `Rsql.ScriptFailed`.
fn error_name(message: &str) -> Option<&str> {
    let name = message.split(':').next()?.trim();
    (name.starts_with("Rsql.") || name.starts_with("States.")).then_some(name)
}

/// Sets each attempt's `scheduled` as the runner schedules (see the module doc).
fn derive_scheduling(blocks: &mut [StageBlock], run_of: &dyn Fn(Ms) -> Option<Ms>) {
    // The latest end so far per run, over the stages already walked.
    let mut ended_by_run: HashMap<Ms, Ms> = HashMap::new();
    for block in blocks.iter_mut() {
        let stage_ready = ended_by_run.clone();
        let mut previous_end: HashMap<Ms, Ms> = HashMap::new();
        let mut stage_ends: Vec<(Ms, Ms)> = Vec::new();
        for job in block.jobs.iter_mut() {
            for attempt in job.attempts.iter_mut() {
                let Some(started) = attempt.started else {
                    continue;
                };
                let Some(run) = run_of(started) else { continue };
                let ready = stage_ready.get(&run).copied().unwrap_or(run);
                let ready = match block.execution_type {
                    ExecutionType::Sequential => previous_end.get(&run).copied().unwrap_or(ready),
                    ExecutionType::Parallel => ready,
                };
                attempt.scheduled = Some(ready.min(started));
                if let Some(end) = attempt.ended {
                    previous_end.insert(run, end);
                    stage_ends.push((run, end));
                }
            }
        }
        for (run, end) in stage_ends {
            let slot = ended_by_run.entry(run).or_insert(end);
            *slot = (*slot).max(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, status: &str, start: &str, end: Option<&str>) -> JobAuditRecord {
        JobAuditRecord {
            job_name: name.into(),
            workflow_execution_id: "ex".into(),
            workflow_id: "wf".into(),
            execution_status: status.into(),
            execution_start_ts: format!("2026-01-01T00:00:{start}Z"),
            execution_end_ts: end.map(|e| format!("2026-01-01T00:00:{e}Z")),
            instance_id: "host-1".into(),
            exit_code: end.map(|_| if status == "completed" { 0 } else { 3 }),
            error_message: (status == "failed")
                .then(|| "Rsql.ScriptFailed: [42P01] relation \"nope\" does not exist".into()),
            sql_state: (status == "failed").then(|| "42P01".into()),
            log_group: None,
            log_stream: None,
            log_file: Some(format!("/logs/{name}.log")),
            attempt: 1,
            duration_ms: None,
            cpu_ms: None,
            max_rss_mb: None,
            log_complete: None,
            ssm_command_id: None,
            stage: None,
        }
    }

    fn workflow(status: &str, start: &str, end: Option<&str>) -> WorkflowAuditRecord {
        let stage = |kind: &str, scripts: &[&str]| {
            serde_json::from_value::<Stage>(serde_json::json!({
                "execution_flag": "y", "execution_type": kind, "stage_description": kind,
                "scripts": scripts,
            }))
            .unwrap()
        };
        WorkflowAuditRecord {
            workflow_execution_id: "ex".into(),
            workflow_id: "wf".into(),
            execution_status: status.into(),
            execution_start_ts: format!("2026-01-01T00:00:{start}Z"),
            execution_end_ts: end.map(|e| format!("2026-01-01T00:00:{e}Z")),
            rsql_jobs: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            error_message: None,
            workflow_stages: Some(vec![
                stage("sequential", &["a", "b"]),
                stage("parallel", &["c", "d"]),
            ]),
        }
    }

    #[test]
    fn records_become_stages_attempts_and_derived_queue_waits() {
        let workflows = [
            workflow("running", "00.000", None),
            workflow("failed", "00.000", Some("09.000")),
        ];
        let jobs = [
            job("a", "running", "00.100", None),
            job("a", "completed", "00.100", Some("02.000")),
            job("b", "running", "02.050", None),
            job("b", "completed", "02.050", Some("04.000")),
            // One slot: d waits for c.
            job("c", "running", "04.100", None),
            job("c", "completed", "04.100", Some("06.000")),
            job("d", "running", "06.100", None),
            job("d", "failed", "06.100", Some("09.000")),
        ];
        let t = build("ex", &workflows, &jobs);
        assert_eq!(t.status, "failed");
        assert_eq!(t.stages.len(), 2);
        assert_eq!(t.stages[0].execution_type, ExecutionType::Sequential);
        let wait = |stage: usize, job: usize| t.stages[stage].jobs[job].attempts[0].queue_wait();
        assert_eq!(wait(0, 0), Some(100));
        assert_eq!(wait(0, 1), Some(50));
        assert_eq!(wait(1, 0), Some(100));
        assert_eq!(wait(1, 1), Some(2100));
        let d = &t.stages[1].jobs[1].attempts[0];
        assert_eq!(
            d.outcome,
            Outcome::Failed {
                error: "Rsql.ScriptFailed".into()
            }
        );
        assert_eq!(d.sql_state.as_deref(), Some("42P01"));
        assert_eq!(d.exit_code, Some(3));
        assert_eq!(d.log.as_deref(), Some("/logs/d.log"));
        assert_eq!(d.run_time(), Some(2900));
        assert_eq!(t.duration_ms(), Some(9000));
        let path = t.critical_path();
        let path: Vec<&str> = path.jobs.iter().map(|(_, j)| j.as_str()).collect();
        assert_eq!(path, ["a", "b", "d"]);
    }

    #[test]
    fn a_resumed_run_adds_an_attempt_scheduled_in_its_own_run() {
        let workflows = [
            workflow("running", "00.000", None),
            workflow("failed", "00.000", Some("03.000")),
            workflow("running", "30.000", None),
            workflow("completed", "30.000", Some("32.000")),
        ];
        let jobs = [
            job("a", "completed", "00.100", Some("01.000")),
            job("b", "failed", "01.100", Some("03.000")),
            job("b", "running", "30.200", None),
            job("b", "completed", "30.200", Some("31.000")),
        ];
        let t = build("ex", &workflows, &jobs);
        let b = &t.stages[0].jobs[1];
        assert_eq!(b.attempts.len(), 2);
        assert_eq!(b.attempts[1].number, 2);
        assert_eq!(b.attempts[1].queue_wait(), Some(200));
        assert_eq!(b.outcome(), Some(&Outcome::Completed));
        assert!(t.stages[1].jobs.iter().all(|j| j.attempts.is_empty()));
    }

    #[test]
    fn an_attempt_left_running_by_a_finished_run_was_interrupted() {
        let workflows = [workflow("failed", "00.000", Some("05.000"))];
        let jobs = [job("a", "running", "00.100", None)];
        let t = build("ex", &workflows, &jobs);
        assert_eq!(
            t.stages[0].jobs[0].attempts[0].outcome,
            Outcome::Interrupted
        );
    }
}
