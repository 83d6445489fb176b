//! The audit trail: one record per job attempt state change and per workflow run.
//!
//! Owns: the audit record shapes (the legacy DynamoDB attribute names of docs/contract.md,
//! "The audit") and the local audit, JSON lines under `state_dir/audit/`, which the local
//! workflow runner writes and `--resume` reads. Later records for the same key supersede earlier ones; the file is
//! append-only so a crash never loses an earlier record.
//!
//! Must not touch: processes or AWS clients; the DynamoDB job table is [`dynamodb`]'s.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod dynamodb;

/// One job attempt, as the legacy job audit table keys it: `job_name` + `workflow_execution_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAuditRecord {
    pub job_name: String,
    pub workflow_execution_id: String,
    pub workflow_id: String,
    /// `running`, `completed`, `failed` or `cancelled`.
    pub execution_status: String,
    pub execution_start_ts: String,
    #[serde(default)]
    pub execution_end_ts: Option<String>,
    pub instance_id: String,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub sql_state: Option<String>,
    #[serde(default)]
    pub log_group: Option<String>,
    #[serde(default)]
    pub log_stream: Option<String>,
    #[serde(default)]
    pub log_file: Option<String>,
    pub attempt: u32,
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// CPU time of the whole job in ms (see `outcome::SuccessOutput::cpu_ms`).
    #[serde(default)]
    pub cpu_ms: Option<u64>,
    /// Peak memory of the whole job in MiB, where the memory controller measured it.
    #[serde(default)]
    pub max_rss_mb: Option<u32>,
    /// `Some(false)` when the job's log could not be fully written (a full disk): the log
    /// the record points at is missing lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_complete: Option<bool>,
    #[serde(default)]
    pub ssm_command_id: Option<String>,
    /// The stage description, for local workflow runs.
    #[serde(default)]
    pub stage: Option<String>,
}

/// The names of one job, as every audit record of it carries them.
#[derive(Debug, Clone, Copy)]
pub struct JobNames<'a> {
    pub job_name: &'a str,
    pub workflow_execution_id: &'a str,
    pub workflow_id: &'a str,
    pub ssm_command_id: Option<&'a str>,
}

impl<'a> JobNames<'a> {
    pub fn of(spec: &'a crate::job::JobSpec) -> JobNames<'a> {
        JobNames {
            job_name: &spec.job_name,
            workflow_execution_id: &spec.workflow_execution_id,
            workflow_id: &spec.workflow_id,
            ssm_command_id: spec.ssm_command_id.as_deref(),
        }
    }
}

/// The one way an audit record is built: [`JobAuditRecord::running`] for an attempt that
/// started (with [`JobAuditRecord::with_log`] and [`JobAuditRecord::with_stage`]), then
/// [`JobAuditRecord::finish`] with its outcome for the final record.
impl JobAuditRecord {
    /// The `running` record of attempt `attempt`, started at `start_ts` on `instance_id`.
    pub fn running(
        names: JobNames<'_>,
        instance_id: &str,
        start_ts: String,
        attempt: u32,
    ) -> JobAuditRecord {
        JobAuditRecord {
            job_name: names.job_name.to_string(),
            workflow_execution_id: names.workflow_execution_id.to_string(),
            workflow_id: names.workflow_id.to_string(),
            execution_status: "running".to_string(),
            execution_start_ts: start_ts,
            execution_end_ts: None,
            instance_id: instance_id.to_string(),
            exit_code: None,
            error_message: None,
            sql_state: None,
            log_group: None,
            log_stream: None,
            log_file: None,
            attempt,
            duration_ms: None,
            cpu_ms: None,
            max_rss_mb: None,
            log_complete: None,
            ssm_command_id: names.ssm_command_id.map(str::to_string),
            stage: None,
        }
    }

    /// Where the job's log is: the CloudWatch group and stream, and the local file.
    pub fn with_log(
        mut self,
        log_group: Option<String>,
        log_stream: Option<String>,
        log_file: Option<String>,
    ) -> JobAuditRecord {
        self.log_group = log_group;
        self.log_stream = log_stream;
        self.log_file = log_file;
        self
    }

    /// The stage description, for local workflow runs.
    pub fn with_stage(mut self, stage: Option<String>) -> JobAuditRecord {
        self.stage = stage;
        self
    }

    /// Makes this the final record: `outcome`'s status and what it measured, ended at
    /// `end_ts` after `duration_ms`.
    pub fn finish(
        &mut self,
        outcome: &crate::outcome::Outcome,
        end_ts: String,
        duration_ms: Option<u64>,
    ) {
        self.execution_status = outcome.status().to_string();
        self.execution_end_ts = Some(end_ts);
        self.exit_code = outcome.exit_code();
        self.error_message = outcome.error_message();
        self.sql_state = match outcome {
            crate::outcome::Outcome::Failed(f) => f.cause.sql_state.clone(),
            _ => None,
        };
        self.duration_ms = duration_ms;
        self.cpu_ms = outcome.cpu_ms();
        self.max_rss_mb = outcome.max_rss_mb();
        self.log_complete = outcome.log_complete();
    }

    /// [`JobAuditRecord::finish`], by value.
    pub fn finished(
        mut self,
        outcome: &crate::outcome::Outcome,
        end_ts: String,
        duration_ms: Option<u64>,
    ) -> JobAuditRecord {
        self.finish(outcome, end_ts, duration_ms);
        self
    }
}

/// One workflow run, keyed by `workflow_execution_id` + `workflow_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowAuditRecord {
    pub workflow_execution_id: String,
    pub workflow_id: String,
    pub execution_status: String,
    pub execution_start_ts: String,
    #[serde(default)]
    pub execution_end_ts: Option<String>,
    pub rsql_jobs: Vec<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    /// The workflow's stages as the run had them, so that `workflow report` can group the
    /// jobs by stage in config order (older records lack it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_stages: Option<Vec<crate::workflow::stage::Stage>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot write the audit file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the audit file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit file {path} line {line} is not an audit record: {source}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// The local audit under `state_dir/audit/`.
#[derive(Debug, Clone)]
pub struct LocalAudit {
    dir: PathBuf,
}

const JOBS_FILE: &str = "job_audit.jsonl";
const WORKFLOWS_FILE: &str = "workflow_audit.jsonl";

impl LocalAudit {
    pub fn open(state_dir: &Path) -> Result<LocalAudit, AuditError> {
        let dir = state_dir.join("audit");
        std::fs::create_dir_all(&dir).map_err(|source| AuditError::Write {
            path: dir.clone(),
            source,
        })?;
        Ok(LocalAudit { dir })
    }

    pub fn jobs_path(&self) -> PathBuf {
        self.dir.join(JOBS_FILE)
    }

    pub fn workflows_path(&self) -> PathBuf {
        self.dir.join(WORKFLOWS_FILE)
    }

    /// Appends a job's record. A job's end is fsynced: it is this host's record of how the
    /// job ended. Its `running` line is not: a crash ends that state anyway, and the agent
    /// that finds the job afterwards appends how it ended.
    pub fn record_job(&self, record: &JobAuditRecord) -> Result<(), AuditError> {
        let sync = record.execution_status != "running";
        append(&self.jobs_path(), record, sync)
    }

    pub fn record_workflow(&self, record: &WorkflowAuditRecord) -> Result<(), AuditError> {
        append(&self.workflows_path(), record, true)
    }

    /// The latest record of every job of one workflow execution, by job name.
    pub fn jobs_of(
        &self,
        workflow_execution_id: &str,
    ) -> Result<HashMap<String, JobAuditRecord>, AuditError> {
        let mut latest = HashMap::new();
        for record in read_all::<JobAuditRecord>(&self.jobs_path())? {
            if record.workflow_execution_id == workflow_execution_id {
                latest.insert(record.job_name.clone(), record);
            }
        }
        Ok(latest)
    }

    /// Every job record of one workflow execution, oldest first: each attempt's `running`
    /// record and its final one.
    pub fn job_records_of(
        &self,
        workflow_execution_id: &str,
    ) -> Result<Vec<JobAuditRecord>, AuditError> {
        Ok(read_all::<JobAuditRecord>(&self.jobs_path())?
            .into_iter()
            .filter(|r| r.workflow_execution_id == workflow_execution_id)
            .collect())
    }

    /// Every record of one workflow execution, oldest first (a resumed execution has one
    /// pair per run).
    pub fn workflow_records_of(
        &self,
        workflow_execution_id: &str,
    ) -> Result<Vec<WorkflowAuditRecord>, AuditError> {
        Ok(read_all::<WorkflowAuditRecord>(&self.workflows_path())?
            .into_iter()
            .filter(|r| r.workflow_execution_id == workflow_execution_id)
            .collect())
    }

    /// The latest record of one workflow execution.
    pub fn workflow(
        &self,
        workflow_execution_id: &str,
    ) -> Result<Option<WorkflowAuditRecord>, AuditError> {
        Ok(read_all::<WorkflowAuditRecord>(&self.workflows_path())?
            .into_iter()
            .rfind(|r| r.workflow_execution_id == workflow_execution_id))
    }
}

fn append<T: Serialize>(path: &Path, record: &T, sync: bool) -> Result<(), AuditError> {
    let err = |source| AuditError::Write {
        path: path.to_path_buf(),
        source,
    };
    // Masked value by value, never as serialized text (see `secrets::mask_json`).
    let mut value = serde_json::to_value(record).map_err(|e| err(std::io::Error::other(e)))?;
    crate::secrets::mask_json(&mut value);
    let mut line = serde_json::to_string(&value)
        .map_err(|e| err(std::io::Error::other(e)))?
        .into_bytes();
    line.push(b'\n');
    // Never through a name planted in the state directory.
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(err)?;
    // One write of a whole line on an O_APPEND file: concurrent jobs never interleave.
    file.write_all(&line).map_err(err)?;
    if sync {
        file.sync_data().map_err(err)?;
    }
    Ok(())
}

fn read_all<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, AuditError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AuditError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    let lines: Vec<_> = BufReader::new(file).lines().collect();
    let last = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        let line = line.map_err(|source| AuditError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(record) => out.push(record),
            // A torn final line is what a crash mid-append leaves; everything before it is
            // intact, so it is skipped rather than failing the whole audit.
            Err(_) if i + 1 == last => {}
            Err(source) => {
                return Err(AuditError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    source,
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(job: &str, status: &str) -> JobAuditRecord {
        let names = JobNames {
            job_name: job,
            workflow_execution_id: "ex",
            workflow_id: "wf",
            ssm_command_id: None,
        };
        JobAuditRecord {
            execution_status: status.into(),
            ..JobAuditRecord::running(names, "i", "2026-01-01T00:00:00.000Z".into(), 1)
        }
    }

    #[test]
    fn latest_record_wins_and_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let audit = LocalAudit::open(dir.path()).unwrap();
        audit.record_job(&record("a", "running")).unwrap();
        audit.record_job(&record("a", "completed")).unwrap();
        audit.record_job(&record("b", "failed")).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(audit.jobs_path())
            .unwrap();
        f.write_all(b"{\"job_name\":\"c\",\"workf").unwrap();
        let jobs = audit.jobs_of("ex").unwrap();
        assert_eq!(jobs["a"].execution_status, "completed");
        assert_eq!(jobs["b"].execution_status, "failed");
        assert!(!jobs.contains_key("c"));
    }

    #[test]
    fn the_final_record_is_the_running_one_with_the_outcome() {
        let names = JobNames {
            job_name: "load.sh",
            workflow_execution_id: "ex",
            workflow_id: "wf",
            ssm_command_id: Some("cmd"),
        };
        let running = JobAuditRecord::running(names, "i-1", "t0".into(), 2).with_log(
            Some("/g".into()),
            None,
            Some("/f".into()),
        );
        assert_eq!(running.execution_status, "running");
        assert_eq!(running.execution_end_ts, None);
        let failed = crate::outcome::Outcome::Failed(crate::outcome::Failure {
            error: crate::outcome::ErrorName::ScriptFailed,
            cause: crate::outcome::FailureCause {
                message: "exit 3".into(),
                sql_state: Some("42P01".into()),
                ..Default::default()
            },
        });
        let done = running.clone().finished(&failed, "t1".into(), Some(5));
        assert_eq!(done.execution_status, "failed");
        assert_eq!(done.execution_end_ts.as_deref(), Some("t1"));
        assert_eq!(done.sql_state.as_deref(), Some("42P01"));
        assert_eq!(done.duration_ms, Some(5));
        assert_eq!(
            (
                done.log_group,
                done.log_file,
                done.ssm_command_id,
                done.attempt
            ),
            (running.log_group, running.log_file, Some("cmd".into()), 2),
            "what the running record said stays"
        );
    }
}
