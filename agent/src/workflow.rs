//! The local workflow runner: the embedded default, `rsql-agent workflow run FILE`.
//!
//! Owns: the legacy workflow config format (`workflow_stages[]` with `execution_flag`,
//! `execution_type`, `scripts`, `stage_description`), stage ordering, stop-at-first-failure,
//! `--resume`, progress events and the summary table.
//!
//! Must not touch: AWS. It runs every job through the same [`crate::attempt`] path as the
//! daemon (lock, supervisor, job log, outcome, audit), with no task token.
//!
//! The workflow commands live here, one folder: `workflow run` is this module; the AWS
//! workflow's `put-config`, `start` and `status` are [`aws`] (the operator's side of the
//! generic state machine); `workflow report`, the timeline of either kind of run, is
//! [`report`].

pub mod aws;
pub mod report;
pub mod stage;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::attempt::{AttemptContext, AttemptError, AttemptRequest, AttemptResult};
use crate::config::Config;
use crate::job::{JobRules, JobSpec};
use crate::outcome::Outcome;
use crate::report::audit::{AuditError, JobAuditRecord, LocalAudit, WorkflowAuditRecord};
use crate::signals::{Control, Controls};
use crate::stop::{self, StopLevel, StopReason, StopReceiver, StopSender};

pub use stage::{ExecutionType, Stage};

/// The legacy workflow config item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowConfig {
    pub workflow_id: String,
    #[serde(default)]
    pub workflow_description: Option<String>,
    pub workflow_stages: Vec<Stage>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("cannot read workflow file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workflow file {path} is not a valid workflow config: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("workflow file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("workflow {workflow_id}, stage {stage} ({description:?}): {source}")]
    Job {
        workflow_id: String,
        stage: usize,
        description: String,
        #[source]
        source: Box<crate::job::InvalidJob>,
    },
    #[error("--resume {execution_id}: no run of workflow {workflow_id} with that execution id in the audit at {audit}")]
    NothingToResume {
        execution_id: String,
        workflow_id: String,
        audit: PathBuf,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Attempt(#[from] AttemptError),
}

impl WorkflowConfig {
    pub fn load(path: &Path) -> Result<WorkflowConfig, WorkflowError> {
        let text = std::fs::read(path).map_err(|source| WorkflowError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: WorkflowConfig =
            serde_json::from_slice(&text).map_err(|source| WorkflowError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), WorkflowError> {
        let invalid = |reason: String| WorkflowError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if self.workflow_id.trim().is_empty() {
            return Err(invalid("workflow_id is empty".to_string()));
        }
        if self.workflow_stages.is_empty() {
            return Err(invalid("workflow_stages is empty".to_string()));
        }
        let mut seen = HashMap::new();
        for (i, stage) in self.workflow_stages.iter().enumerate() {
            let flag = stage.execution_flag.trim().to_ascii_lowercase();
            if flag != "y" && flag != "n" {
                return Err(invalid(format!(
                    "stage {}: execution_flag must be \"y\" or \"n\", got {:?}",
                    i + 1,
                    stage.execution_flag
                )));
            }
            if stage.scripts.is_empty() {
                return Err(invalid(format!("stage {}: scripts is empty", i + 1)));
            }
            for script in &stage.scripts {
                if let Some(first) = seen.insert(script.clone(), i + 1) {
                    return Err(invalid(format!(
                        "script {script:?} appears in stage {first} and stage {}; a job runs once per execution",
                        i + 1
                    )));
                }
            }
        }
        Ok(())
    }
}

/// What happened to one job of the workflow, for progress and the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Completed,
    Failed,
    /// Completed in an earlier run of the same execution (`--resume`).
    CompletedEarlier,
    /// Its stage has `execution_flag` `n`.
    Disabled,
    /// Not started because an earlier job failed or the run was interrupted.
    NotRun,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Completed => "completed",
            JobStatus::Failed => "FAILED",
            JobStatus::CompletedEarlier => "completed earlier",
            JobStatus::Disabled => "disabled",
            JobStatus::NotRun => "not run",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    pub stage: usize,
    pub stage_description: String,
    pub job_name: String,
    pub status: JobStatus,
    pub exit_code: Option<i32>,
    pub duration: Option<Duration>,
    pub log_file: Option<PathBuf>,
    pub error_message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkflowReport {
    pub workflow_id: String,
    pub workflow_execution_id: String,
    pub jobs: Vec<JobReport>,
    pub interrupted: bool,
}

impl WorkflowReport {
    pub fn succeeded(&self) -> bool {
        !self.interrupted
            && self
                .jobs
                .iter()
                .all(|j| !matches!(j.status, JobStatus::Failed | JobStatus::NotRun))
    }

    /// The summary table printed at the end of a run.
    pub fn table(&self) -> String {
        let headers = ["stage", "job", "status", "exit", "duration", "log file"];
        let rows: Vec<[String; 6]> = self
            .jobs
            .iter()
            .map(|j| {
                [
                    j.stage.to_string(),
                    j.job_name.clone(),
                    j.status.as_str().to_string(),
                    j.exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    j.duration
                        .map(|d| format!("{:.1}s", d.as_secs_f64()))
                        .unwrap_or_else(|| "-".into()),
                    j.log_file
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        render_table(&headers, &rows)
    }
}

/// Progress as the run goes, for the CLI to print.
#[derive(Debug, Clone)]
pub enum Progress {
    Started {
        workflow_id: String,
        workflow_execution_id: String,
        resumed: bool,
    },
    Stage {
        stage: usize,
        of: usize,
        description: String,
        execution_type: ExecutionType,
        enabled: bool,
    },
    JobStarted {
        stage: usize,
        job_name: String,
        log_file: PathBuf,
    },
    JobFinished(JobReport),
    JobSkipped(JobReport),
    /// A stop was requested: the running jobs are being stopped (`now`: killed at once) and
    /// nothing more starts.
    Stopping {
        now: bool,
    },
}

pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How to run: a fresh execution (optionally with a given id) or a resumed one.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub execution_id: Option<String>,
    pub resume: Option<String>,
}

/// Runs workflows on this host.
pub struct Runner {
    config: Arc<Config>,
    attempts: Arc<AttemptContext>,
    audit: LocalAudit,
    progress: ProgressFn,
    /// The database environment of every job, when the caller resolved it (`[database]
    /// secret_id`); `None`: `[database]` as configured.
    database_env: Option<Vec<(String, String)>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .finish()
    }
}

impl Runner {
    pub fn new(
        config: Arc<Config>,
        attempts: Arc<AttemptContext>,
        progress: ProgressFn,
    ) -> Result<Runner, WorkflowError> {
        let audit = LocalAudit::open(&config.agent.state_dir)?;
        Ok(Runner {
            config,
            attempts,
            audit,
            progress,
            database_env: None,
        })
    }

    /// Gives every job `env` as its database environment (the credentials of `[database]
    /// secret_id`, resolved by the caller, which holds the AWS clients).
    pub fn with_database_env(mut self, env: Vec<(String, String)>) -> Runner {
        self.database_env = Some(env);
        self
    }

    /// Runs the workflow. The first stop request from `controls` (the first SIGINT or
    /// SIGTERM) stops the running jobs (SIGTERM to each job's process group, `kill_grace`,
    /// SIGKILL), reports them `Rsql.Interrupted` and starts nothing more; a later one kills
    /// them at once. A reload request is ignored: a run keeps the config it started with.
    pub async fn run(
        &self,
        workflow: &WorkflowConfig,
        options: &RunOptions,
        controls: Controls,
    ) -> Result<WorkflowReport, WorkflowError> {
        let (stop_tx, stop) = stop::channel();
        let forward = forward_stops(controls, stop_tx, self.progress.clone());
        tokio::select! {
            report = self.run_execution(workflow, options, stop) => report,
            never = forward => match never {},
        }
    }

    /// [`Runner::run`] with the stop requests as a channel every job watches.
    async fn run_execution(
        &self,
        workflow: &WorkflowConfig,
        options: &RunOptions,
        stop: StopReceiver,
    ) -> Result<WorkflowReport, WorkflowError> {
        let (execution_id, earlier) = self.execution(workflow, options)?;
        let specs = self.validate(workflow, &execution_id)?;
        {
            let attempts = self.attempts.clone();
            let _ = tokio::task::spawn_blocking(move || attempts.housekeeping()).await;
        }
        let record = ExecutionRecord::new(workflow, &execution_id);
        self.audit
            .record_workflow(&record.workflow("running", None, None))?;
        (self.progress)(Progress::Started {
            workflow_id: workflow.workflow_id.clone(),
            workflow_execution_id: execution_id.clone(),
            resumed: options.resume.is_some(),
        });

        let mut reports = Vec::new();
        let failed = Arc::new(AtomicBool::new(false));
        for (i, (stage, stage_specs)) in workflow.workflow_stages.iter().zip(specs).enumerate() {
            let at = StageAt {
                number: i + 1,
                of: workflow.workflow_stages.len(),
                stage,
            };
            self.run_stage(at, stage_specs, &earlier, &failed, &stop, &mut reports)
                .await?;
        }

        let report = WorkflowReport {
            workflow_id: workflow.workflow_id.clone(),
            workflow_execution_id: execution_id,
            jobs: in_config_order(workflow, reports),
            interrupted: stopping(&stop),
        };
        let first_error = report
            .jobs
            .iter()
            .find(|j| j.status == JobStatus::Failed)
            .map(|j| {
                format!(
                    "{}: {}",
                    j.job_name,
                    j.error_message.clone().unwrap_or_default()
                )
            });
        let status = if report.succeeded() {
            "completed"
        } else {
            "failed"
        };
        self.audit
            .record_workflow(&record.workflow(status, Some(now_ts()), first_error))?;
        Ok(report)
    }

    /// The execution id to run under, and (for `--resume`) what its earlier runs recorded.
    fn execution(
        &self,
        workflow: &WorkflowConfig,
        options: &RunOptions,
    ) -> Result<(String, HashMap<String, JobAuditRecord>), WorkflowError> {
        let Some(id) = &options.resume else {
            let id = options
                .execution_id
                .clone()
                .unwrap_or_else(|| new_execution_id(&workflow.workflow_id));
            return Ok((id, HashMap::new()));
        };
        let earlier = self.audit.jobs_of(id)?;
        if earlier.is_empty() && self.audit.workflow(id)?.is_none() {
            return Err(WorkflowError::NothingToResume {
                execution_id: id.clone(),
                workflow_id: workflow.workflow_id.clone(),
                audit: self.audit.jobs_path(),
            });
        }
        Ok((id.clone(), earlier))
    }

    /// Every enabled job as a spec, stage by stage (`None` for a disabled stage's jobs),
    /// validated before anything runs: a typo in stage 3 must not be found after stages 1
    /// and 2 have changed the database.
    fn validate(
        &self,
        workflow: &WorkflowConfig,
        execution_id: &str,
    ) -> Result<Vec<Vec<Option<JobSpec>>>, WorkflowError> {
        let rules = JobRules {
            script_dir: &self.config.jobs.script_dir,
            default_timeout: self.config.jobs.default_timeout,
            require_token: false,
        };
        let mut specs = Vec::new();
        for (i, stage) in workflow.workflow_stages.iter().enumerate() {
            let mut stage_specs = Vec::new();
            for script in &stage.scripts {
                if !stage.enabled() {
                    stage_specs.push(None);
                    continue;
                }
                let spec = JobSpec::local(&workflow.workflow_id, execution_id, script, &rules)
                    .map_err(|source| WorkflowError::Job {
                        workflow_id: workflow.workflow_id.clone(),
                        stage: i + 1,
                        description: stage.stage_description.clone(),
                        source: Box::new(source),
                    })?;
                stage_specs.push(Some(spec));
            }
            specs.push(stage_specs);
        }
        Ok(specs)
    }

    /// Runs one stage's jobs (one at a time, or up to `max_concurrent_jobs` at once) and adds
    /// a report for each, run or not. Once a job has failed or a stop was requested, nothing
    /// more starts.
    async fn run_stage(
        &self,
        at: StageAt<'_>,
        specs: Vec<Option<JobSpec>>,
        earlier: &HashMap<String, JobAuditRecord>,
        failed: &Arc<AtomicBool>,
        stop: &StopReceiver,
        reports: &mut Vec<(usize, String, JobReport)>,
    ) -> Result<(), WorkflowError> {
        let stage = at.stage;
        let stop_now = failed.load(Ordering::SeqCst) || stopping(stop);
        if !stop_now {
            (self.progress)(Progress::Stage {
                stage: at.number,
                of: at.of,
                description: stage.stage_description.clone(),
                execution_type: stage.execution_type,
                enabled: stage.enabled(),
            });
        }
        let concurrency = match stage.execution_type {
            ExecutionType::Sequential => 1,
            ExecutionType::Parallel => self.config.agent.max_concurrent_jobs,
        };
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut running = tokio::task::JoinSet::new();
        for (script, spec) in stage.scripts.iter().zip(specs) {
            let Some(spec) = spec else {
                let report = at.skipped(script, JobStatus::Disabled, None);
                (self.progress)(Progress::JobSkipped(report.clone()));
                reports.push((at.number, script.clone(), report));
                continue;
            };
            if let Some(record) = earlier.get(script) {
                if record.execution_status == "completed" {
                    let report = at.skipped(script, JobStatus::CompletedEarlier, Some(record));
                    (self.progress)(Progress::JobSkipped(report.clone()));
                    reports.push((at.number, script.clone(), report));
                    continue;
                }
            }
            if stop_now {
                let report = at.skipped(script, JobStatus::NotRun, None);
                reports.push((at.number, script.clone(), report));
                continue;
            }
            let job = StageJob {
                number: at.number,
                description: stage.stage_description.clone(),
                not_run: at.skipped(script, JobStatus::NotRun, None),
                spec,
            };
            running.spawn(self.run_job(job, permits.clone(), failed.clone(), stop.clone()));
            // A sequential stage runs its scripts in the order given: each one ends
            // before the next is even spawned.
            if stage.execution_type == ExecutionType::Sequential {
                collect(&mut running, reports).await?;
            }
        }
        collect(&mut running, reports).await
    }

    /// One job of a stage, once it has a slot: its attempt, its progress and its report.
    fn run_job(
        &self,
        job: StageJob,
        permits: Arc<Semaphore>,
        failed: Arc<AtomicBool>,
        mut stop: StopReceiver,
    ) -> impl std::future::Future<Output = Result<JobReport, AttemptError>> + Send + 'static {
        let attempts = self.attempts.clone();
        let progress = self.progress.clone();
        let database_env = self.database_env.clone();
        async move {
            let StageJob {
                number,
                description,
                not_run,
                spec,
            } = job;
            // A job waiting for a slot does not start once a sibling has failed or the run
            // is being stopped.
            let permit = tokio::select! {
                permit = permits.acquire_owned() => permit,
                _ = stop.wait_for(|r| r.count > 0) => return Ok(not_run),
            };
            let Ok(_permit) = permit else {
                return Ok(not_run);
            };
            if failed.load(Ordering::SeqCst) || stopping(&stop) {
                return Ok(not_run);
            }
            let mut request = AttemptRequest::new(spec);
            request.stage = Some(description.clone());
            request.env = database_env;
            let progress_started = progress.clone();
            let result: AttemptResult = attempts
                .run_local(request, stop, move |log_file: &Path| {
                    progress_started(Progress::JobStarted {
                        stage: number,
                        job_name: not_run.job_name.clone(),
                        log_file: log_file.to_path_buf(),
                    })
                })
                .await?;
            let ok = matches!(result.outcome, Outcome::Completed(_));
            if !ok {
                failed.store(true, Ordering::SeqCst);
            }
            let report = JobReport {
                stage: number,
                stage_description: description,
                job_name: result.job_name.clone(),
                status: if ok {
                    JobStatus::Completed
                } else {
                    JobStatus::Failed
                },
                exit_code: result.outcome.exit_code(),
                duration: Some(result.duration),
                log_file: Some(result.log_file.clone()),
                error_message: result.outcome.error_message(),
            };
            progress(Progress::JobFinished(report.clone()));
            Ok(report)
        }
    }
}

/// Passes the stop requests among `controls` on to every job of the run, and tells the
/// caller. Never ends: a closed `controls` only means no more requests.
async fn forward_stops(
    mut controls: Controls,
    stop: StopSender,
    progress: ProgressFn,
) -> std::convert::Infallible {
    let mut stopping = false;
    while let Some(control) = controls.recv().await {
        match control {
            Control::Reload => {
                tracing::warn!("a workflow run keeps the config it started with; reload ignored")
            }
            Control::Stop(level) => {
                // The first request stops the jobs at its level, any later one kills them.
                let level = if stopping { StopLevel::Kill } else { level };
                stopping = true;
                stop.stop_at(StopReason::Interrupted, level);
                progress(Progress::Stopping {
                    now: level == StopLevel::Kill,
                });
            }
        }
    }
    std::future::pending().await
}

/// Whether a stop was requested.
fn stopping(stop: &StopReceiver) -> bool {
    stop.borrow().count > 0
}

/// A stage and where it stands in the workflow.
#[derive(Clone, Copy)]
struct StageAt<'a> {
    number: usize,
    of: usize,
    stage: &'a Stage,
}

impl StageAt<'_> {
    /// The report of a job of this stage that does not run now.
    fn skipped(
        &self,
        script: &str,
        status: JobStatus,
        earlier: Option<&JobAuditRecord>,
    ) -> JobReport {
        JobReport {
            stage: self.number,
            stage_description: self.stage.stage_description.clone(),
            job_name: script.to_string(),
            status,
            exit_code: earlier.and_then(|r| r.exit_code),
            duration: earlier
                .and_then(|r| r.duration_ms)
                .map(Duration::from_millis),
            log_file: earlier.and_then(|r| r.log_file.clone()).map(PathBuf::from),
            error_message: None,
        }
    }
}

/// A job handed to [`Runner::run_job`].
struct StageJob {
    number: usize,
    description: String,
    /// Its report should it not start.
    not_run: JobReport,
    spec: JobSpec,
}

/// The workflow audit record of one execution, as it goes from `running` to its end.
struct ExecutionRecord {
    workflow_execution_id: String,
    workflow_id: String,
    started: String,
    rsql_jobs: Vec<String>,
    stages: Vec<Stage>,
}

impl ExecutionRecord {
    fn new(workflow: &WorkflowConfig, execution_id: &str) -> ExecutionRecord {
        ExecutionRecord {
            workflow_execution_id: execution_id.to_string(),
            workflow_id: workflow.workflow_id.clone(),
            started: now_ts(),
            rsql_jobs: workflow
                .workflow_stages
                .iter()
                .flat_map(|s| s.scripts.iter().cloned())
                .collect(),
            stages: workflow.workflow_stages.clone(),
        }
    }

    fn workflow(
        &self,
        status: &str,
        end: Option<String>,
        error: Option<String>,
    ) -> WorkflowAuditRecord {
        WorkflowAuditRecord {
            workflow_execution_id: self.workflow_execution_id.clone(),
            workflow_id: self.workflow_id.clone(),
            execution_status: status.to_string(),
            execution_start_ts: self.started.clone(),
            execution_end_ts: end,
            rsql_jobs: self.rsql_jobs.clone(),
            error_message: error,
            workflow_stages: Some(self.stages.clone()),
        }
    }
}

/// The reports in config order, whatever order the jobs finished in.
fn in_config_order(
    workflow: &WorkflowConfig,
    mut reports: Vec<(usize, String, JobReport)>,
) -> Vec<JobReport> {
    let order: HashMap<(usize, String), usize> = workflow
        .workflow_stages
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.scripts.iter().map(move |j| (i + 1, j.clone())))
        .enumerate()
        .map(|(n, key)| (key, n))
        .collect();
    reports.sort_by_key(|(stage, job, _)| order.get(&(*stage, job.clone())).copied());
    reports.into_iter().map(|(_, _, r)| r).collect()
}

/// `text` made safe for a terminal: every control character but newline and tab (escape,
/// carriage return, the C1 controls) written as a Rust escape, so that text from a job, a
/// database or a message cannot move the cursor, recolour or retitle the operator's
/// terminal. Lines stay lines. Everything the CLI prints that it did not write itself goes
/// through here.
pub fn terminal_text(text: &str) -> String {
    text.split('\n')
        .map(crate::logging::escape_controls)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A plain-text table: a header row, a rule, then the rows, columns padded to their widest
/// cell, the last column left unpadded. Shared by every table the CLI prints; each cell is
/// escaped as one line ([`crate::logging::escape_controls`]), so the columns stay aligned.
pub fn render_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) -> String {
    let rows: Vec<[String; N]> = rows
        .iter()
        .map(|row| {
            row.clone()
                .map(|cell| crate::logging::escape_controls(&cell).into_owned())
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}", width = widths[i]));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&headers.map(String::from));
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

/// Waits for every spawned job and adds its report.
async fn collect(
    running: &mut tokio::task::JoinSet<Result<JobReport, AttemptError>>,
    reports: &mut Vec<(usize, String, JobReport)>,
) -> Result<(), WorkflowError> {
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok(Ok(report)) => reports.push((report.stage, report.job_name.clone(), report)),
            Ok(Err(e)) => return Err(e.into()),
            Err(join) => {
                return Err(WorkflowError::Attempt(AttemptError::Panicked(
                    join.to_string(),
                )))
            }
        }
    }
    Ok(())
}

/// An execution id a person can read and sort: `<workflow_id>-<UTC timestamp>-<suffix>`.
pub fn new_execution_id(workflow_id: &str) -> String {
    let now = SystemTime::now();
    let stamp: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let nanos = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let suffix = (nanos ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{workflow_id}-{stamp}-{suffix:04x}")
}

pub(crate) fn now_ts() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests;
