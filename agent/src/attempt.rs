//! One job attempt, end to end: lock, audit `running`, supervised run with lease touches,
//! classification, final state and audit, unlock.
//!
//! Owns: the order of those steps, which is the same for every source of jobs. The local
//! workflow runner calls [`AttemptContext::run_local`].
//!
//! Must not touch: where the job came from or where its result goes beyond the lock state
//! and the local audit; callbacks belong to the reporters.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::job::JobSpec;
use crate::joblog::{self, JobLog, LogName};
use crate::lock::{self, Acquire, Decision, JobLock, LockDir, LockState};
use crate::outcome::Outcome;
use crate::report::audit::{AuditError, JobAuditRecord, JobNames, LocalAudit};
use crate::stop::StopReceiver;
use crate::supervisor::{self, Launch, Supervisor};

// Classifying and recording a finished run is the job owner's too; this path keeps working.
pub use rsql_agent_core::run::{classify_run, record_outcome, RunFacts};

#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("job {job_name} (lock key {lock_key:?}) is already running: {holder}")]
    Busy {
        job_name: String,
        lock_key: String,
        holder: String,
        /// The holder's record, when it could be read.
        state: Option<Box<LockState>>,
    },
    #[error("lock for job {job_name}: {source}")]
    Lock {
        job_name: String,
        #[source]
        source: lock::LockError,
    },
    #[error("job log for {job_name}: {source}")]
    Log {
        job_name: String,
        #[source]
        source: joblog::JobLogError,
    },
    #[error("cannot run job {job_name}: {source}")]
    Supervisor {
        job_name: String,
        #[source]
        source: supervisor::SupervisorError,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("a job task panicked: {0}")]
    Panicked(String),
    #[error("this process runs no jobs itself (they run under their owner processes)")]
    NoSupervisor,
}

/// A job to run, with what the audit should say about where it came from.
#[derive(Clone)]
pub struct AttemptRequest {
    pub spec: JobSpec,
    /// The stage description, for local workflow runs.
    pub stage: Option<String>,
    /// The database environment; `None` means `[database]` as configured.
    pub env: Option<Vec<(String, String)>>,
    /// Where the job's log is shipped, when CloudWatch is configured.
    pub log_group: Option<String>,
    pub log_stream: Option<String>,
}

impl AttemptRequest {
    pub fn new(spec: JobSpec) -> AttemptRequest {
        AttemptRequest {
            spec,
            stage: None,
            env: None,
            log_group: None,
            log_stream: None,
        }
    }
}

// Hand-written: `env` carries the database password.
impl std::fmt::Debug for AttemptRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptRequest")
            .field("spec", &self.spec)
            .field("stage", &self.stage)
            .field("log_group", &self.log_group)
            .field("log_stream", &self.log_stream)
            .finish_non_exhaustive()
    }
}

/// The lock, held, and what the earlier state says to do.
#[derive(Debug)]
pub struct Acquired {
    pub held: JobLock,
    pub decision: Decision,
}

/// What one attempt amounted to.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub job_name: String,
    pub outcome: Outcome,
    pub duration: Duration,
    pub log_file: PathBuf,
    pub attempt: u32,
    /// The final audit record, for the reporters.
    pub audit: JobAuditRecord,
}

/// Everything an attempt needs that outlives it; built once per process.
#[derive(Debug)]
pub struct AttemptContext {
    /// The config the process started with. Keys that a reload may change are read from
    /// [`AttemptContext::live`] instead.
    pub config: Arc<Config>,
    /// The config as last reloaded (see `reload`): what new jobs, housekeeping and the next
    /// shutdown use. Never held across an `.await`.
    live: std::sync::RwLock<Arc<Config>>,
    /// Runs jobs in this process (the local workflow runner). `None` in the daemon and a
    /// standalone run, whose jobs run under their own owner processes (`job_owner`).
    pub supervisor: Option<Arc<Supervisor>>,
    pub locks: LockDir,
    pub audit: LocalAudit,
    pub instance_id: String,
    /// Distinguishes this process's local runs from every earlier one in lock state, so a
    /// rerun of a failed job is a new attempt, never a replay.
    pub run_nonce: String,
}

impl AttemptContext {
    pub fn new(
        config: Arc<Config>,
        supervisor: Option<Arc<Supervisor>>,
        instance_id: String,
    ) -> Result<AttemptContext, AttemptError> {
        let locks = LockDir::open(&config.lock.dir).map_err(|source| AttemptError::Lock {
            job_name: String::new(),
            source,
        })?;
        let audit = LocalAudit::open(&config.agent.state_dir)?;
        let run_nonce = format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        Ok(AttemptContext {
            live: std::sync::RwLock::new(config.clone()),
            config,
            supervisor,
            locks,
            audit,
            instance_id,
            run_nonce,
        })
    }

    /// The config as last reloaded; see [`AttemptContext::set_live`].
    pub fn live(&self) -> Arc<Config> {
        match self.live.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the live config (a reload). Jobs already running keep what they started
    /// with; keys that need a restart must already carry their running values (see
    /// `reload::plan`).
    pub fn set_live(&self, config: Arc<Config>) {
        match self.live.write() {
            Ok(mut live) => *live = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    /// Removes old job logs (by age, then by total size) and old finished lock entries.
    /// Blocking file work: call it from a blocking thread. Failures are logged, not fatal:
    /// a full log directory must not stop jobs from running.
    pub fn housekeeping(&self) {
        let config = self.live();
        let jobs = &config.jobs;
        match joblog::cleanup(&jobs.log_dir, jobs.log_retention, jobs.log_max_total_bytes) {
            Ok(report) => tracing::debug!(?report, "old job logs removed"),
            Err(e) => tracing::warn!(error = %e, "cannot clean up old job logs"),
        }
        match self.locks.cleanup(config.lock.retention) {
            Ok(removed) => tracing::debug!(removed, "old lock entries removed"),
            Err(e) => tracing::warn!(error = %e, "cannot clean up old lock entries"),
        }
    }

    /// Takes the job's fleet-wide lock and decides, from the state left by earlier holders,
    /// whether this delivery runs, replays a recorded outcome, or reports an interruption.
    pub fn acquire(&self, spec: &JobSpec, token_hash: &str) -> Result<Acquired, AttemptError> {
        let held =
            match self
                .locks
                .try_acquire(&spec.lock_key)
                .map_err(|source| AttemptError::Lock {
                    job_name: spec.job_name.clone(),
                    source,
                })? {
                Acquire::Acquired(held) => held,
                Acquire::Busy { holder } => {
                    return Err(AttemptError::Busy {
                        job_name: spec.job_name.clone(),
                        lock_key: spec.lock_key.clone(),
                        holder: holder
                            .as_ref()
                            .map(|h| {
                                format!("host {} pid {} since {}", h.host, h.pid, h.started_at)
                            })
                            .unwrap_or_else(|| "holder unknown".to_string()),
                        state: holder.map(Box::new),
                    })
                }
            };
        let decision = lock::decide(held.previous(), token_hash, self.live().jobs.on_interrupted);
        Ok(Acquired { held, decision })
    }

    /// Runs a job with no task token (the local workflow runner). Each request on `stop` is
    /// passed on as in [`AttemptContext::execute`] (the first stops the job, a later one
    /// kills it; reported `Rsql.Interrupted` for [`crate::stop::StopReason::Interrupted`]). `on_start` is told
    /// the log file once the job has started.
    pub async fn run_local(
        &self,
        request: AttemptRequest,
        stop: StopReceiver,
        on_start: impl FnOnce(&Path) + Send,
    ) -> Result<AttemptResult, AttemptError> {
        // Every local run is a new attempt: a rerun after a failure must run, never replay.
        let token_hash = lock::token_hash(&format!(
            "local:{}:{}",
            self.run_nonce, request.spec.lock_key
        ));
        let Acquired { held, .. } = self.acquire(&request.spec, &token_hash)?;
        let attempt = held.previous().map(|p| p.attempt + 1).unwrap_or(1);
        let (held, result) = self
            .execute(held, &request, &token_hash, attempt, stop, |record| {
                on_start(Path::new(record.log_file.as_deref().unwrap_or_default()))
            })
            .await?;
        held.release().map_err(|source| AttemptError::Lock {
            job_name: result.job_name.clone(),
            source,
        })?;
        Ok(result)
    }

    /// Runs one attempt under a lock already held: state `running`, local audit, supervised
    /// run with lease touches, classification, final state with the outcome to replay, local
    /// audit. The lock is handed back so the caller releases it only once the outcome is
    /// durable wherever it must go. Each request on `stop` is passed on to the supervisor
    /// (see [`crate::stop::StopSender::stop`]).
    pub async fn execute(
        &self,
        mut held: JobLock,
        request: &AttemptRequest,
        token_hash: &str,
        attempt: u32,
        mut stop: StopReceiver,
        on_start: impl FnOnce(&JobAuditRecord) + Send,
    ) -> Result<(JobLock, AttemptResult), AttemptError> {
        let spec = &request.spec;
        let job_name = spec.job_name.clone();
        let lock_err = |source| AttemptError::Lock {
            job_name: job_name.clone(),
            source,
        };
        let mut state =
            LockState::new_running(&spec.lock_key, &self.instance_id, token_hash, attempt);
        held.write_state(&state).map_err(lock_err)?;

        let started_at = SystemTime::now();
        let attempt_id = format!("{}{attempt}", &token_hash[..8.min(token_hash.len())]);
        let log = JobLog::create(
            &self.config.jobs.log_dir,
            &LogName {
                workflow_execution_id: spec.workflow_execution_id.clone(),
                job_name: spec.job_name.clone(),
                started_at,
                attempt_id: attempt_id.clone(),
            },
        )
        .map_err(|source| AttemptError::Log {
            job_name: job_name.clone(),
            source,
        })?;
        let log_file = log.path().to_path_buf();
        let mut record = self.running_record(request, started_at, attempt, &log_file);
        self.audit.record_job(&record)?;

        let env = match &request.env {
            Some(env) => env.clone(),
            None => self.config.database.job_env(),
        };
        let handle = self
            .supervisor
            .as_ref()
            .ok_or(AttemptError::NoSupervisor)?
            .start(self.launch(spec, env, log, &attempt_id))
            .map_err(|source| AttemptError::Supervisor {
                job_name: job_name.clone(),
                source,
            })?;
        on_start(&record);
        let run = self
            .wait_holding_lease(handle, &mut held, &mut stop, &job_name)
            .await
            .map_err(|source| AttemptError::Supervisor {
                job_name: job_name.clone(),
                source,
            })?;

        let outcome = classify_run(
            &RunFacts {
                job_name: &spec.job_name,
                workflow_execution_id: &spec.workflow_execution_id,
                instance_id: &self.instance_id,
                timeout: spec.timeout,
                log_group: request.log_group.clone(),
                log_stream: request.log_stream.clone(),
            },
            &run,
        );

        record_outcome(&mut state, &outcome);
        held.write_state(&state).map_err(lock_err)?;
        finish_record(&mut record, request, &run, &outcome);
        self.audit.record_job(&record)?;

        Ok((
            held,
            AttemptResult {
                job_name,
                outcome,
                duration: run.duration,
                log_file,
                attempt,
                audit: record,
            },
        ))
    }

    /// The audit record of an attempt that has just started.
    fn running_record(
        &self,
        request: &AttemptRequest,
        started_at: SystemTime,
        attempt: u32,
        log_file: &Path,
    ) -> JobAuditRecord {
        JobAuditRecord::running(
            JobNames::of(&request.spec),
            &self.instance_id,
            humantime::format_rfc3339_millis(started_at).to_string(),
            attempt,
        )
        .with_log(None, None, Some(log_file.display().to_string()))
        .with_stage(request.stage.clone())
    }

    /// Waits for the supervised run, touching the lock's lease every heartbeat and passing
    /// each stop request on to the supervisor.
    async fn wait_holding_lease(
        &self,
        handle: supervisor::JobHandle,
        held: &mut JobLock,
        stop: &mut StopReceiver,
        job_name: &str,
    ) -> Result<supervisor::RunOutcome, supervisor::SupervisorError> {
        let stopper = handle.stopper();
        let wait = handle.wait();
        tokio::pin!(wait);
        let mut lease = tokio::time::interval(self.live().jobs.heartbeat_interval);
        lease.tick().await;
        let mut stop_open = true;
        loop {
            tokio::select! {
                run = &mut wait => return run,
                _ = lease.tick() => {
                    // A failed lease touch is logged, not fatal: the OFD lock itself still
                    // excludes other runners; the lease is for people and crash forensics.
                    if let Err(e) = held.touch() {
                        tracing::warn!(job_name, error = %e, "cannot touch the lock lease");
                    }
                }
                changed = stop.changed(), if stop_open => {
                    match changed {
                        Ok(()) => {
                            let requests = *stop.borrow_and_update();
                            if let Some(level) = requests.level() {
                                stopper.stop_at(requests.reason(), level);
                            }
                        }
                        Err(_) => stop_open = false,
                    }
                }
            }
        }
    }

    fn launch(
        &self,
        spec: &JobSpec,
        env: Vec<(String, String)>,
        log: JobLog,
        attempt_id: &str,
    ) -> Launch {
        build_launch(&self.live().jobs, spec, env, log, attempt_id)
    }
}

/// The [`Launch`] of one attempt of `spec`: its program (the script, or the interpreter with
/// the script), arguments, environment (`env` plus the job's names), limits and marker. The
/// daemon's job owner process and the local runner build it the same way.
pub fn build_launch(
    jobs: &crate::config::JobSettings,
    spec: &JobSpec,
    mut env: Vec<(String, String)>,
    log: JobLog,
    attempt_id: &str,
) -> Launch {
    let (program, mut args) = supervisor::command_for_script(&spec.script, &jobs.interpreter);
    args.extend(crate::job::script_args(spec, jobs.legacy.as_ref()));
    env.push(("RSQL_WORKFLOW_ID".into(), spec.workflow_id.clone()));
    env.push((
        "RSQL_WORKFLOW_EXECUTION_ID".into(),
        spec.workflow_execution_id.clone(),
    ));
    env.push(("RSQL_JOB_NAME".into(), spec.job_name.clone()));
    Launch {
        program,
        args,
        cwd: jobs.script_dir.clone(),
        env,
        timeout: spec.timeout,
        kill_grace: jobs.kill_grace,
        pipe_drain: jobs.pipe_drain,
        log,
        job_id: job_id(spec, attempt_id),
        inherit_fd: None,
        // The job's owner process sets one up where the host offers it (see `job_owner`).
        cgroup: None,
        // The daemon's job owner sets it from `[jobs] user`; the local runner runs jobs as
        // whoever runs it.
        user: None,
    }
}

/// The marker id of one attempt (see `supervisor::JOB_ID_ENV`).
pub fn job_id(spec: &JobSpec, attempt_id: &str) -> String {
    format!("{}-{attempt_id}", lock::token_hash(&spec.lock_key))
}

/// Completes an attempt's audit record with how it ended.
fn finish_record(
    record: &mut JobAuditRecord,
    request: &AttemptRequest,
    run: &supervisor::RunOutcome,
    outcome: &Outcome,
) {
    record.finish(
        outcome,
        humantime::format_rfc3339_millis(run.ended_at).to_string(),
        Some(run.duration.as_millis() as u64),
    );
    record.log_group = request.log_group.clone();
    record.log_stream = request.log_stream.clone();
}
