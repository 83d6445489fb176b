//! Before a job's owner starts: the owners' directory, the job file (`job.json`) with its
//! log file created, the environment an owner inherits, and the job's `running` audit
//! record.

use std::path::Path;
use std::time::SystemTime;

use super::{Shared, Source};
use crate::job::JobSpec;
use crate::job_owner::{JobDir, JobFile, LaunchPlan, SqsReceipt, OWNERS_DIR, PROTOCOL};
use crate::joblog::{self, JobLog, LogName};
use crate::report::audit::{JobAuditRecord, JobNames};
use crate::supervisor::{self, INHERITED_ENV};

/// The agent's handle on the owners' directory and how to start owners.
#[derive(Debug)]
pub(super) struct Owners {
    pub(super) dir: std::path::PathBuf,
    pub(super) launcher: crate::job_owner::launch::Launcher,
    pub(super) program: std::path::PathBuf,
    /// `[jobs] user`, resolved at start (`job_owner::launch::Launcher::job_user`).
    pub(super) job_user: Option<crate::supervisor::JobUser>,
}

impl Owners {
    pub(super) fn open(
        state_dir: &Path,
        launcher: crate::job_owner::launch::Launcher,
        job_user: Option<crate::supervisor::JobUser>,
    ) -> std::io::Result<Owners> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = state_dir.join(OWNERS_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Owners {
            dir,
            launcher,
            program: crate::job_owner::launch::owner_program(),
            job_user,
        })
    }

    /// The job directories left by earlier agents (and this one), oldest name first.
    pub(super) fn scan(&self) -> Vec<JobDir> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut dirs: Vec<JobDir> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| JobDir::new(e.path()))
            .collect();
        dirs.sort_by_key(|d| d.job_id());
        dirs
    }
}

/// The environment an owner process starts with: the agent's inherited variables (the owner
/// passes them on to the job) and its log filter.
pub(super) fn owner_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = INHERITED_ENV
        .iter()
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect();
    if let Ok(filter) = std::env::var("RSQL_AGENT_LOG") {
        env.push(("RSQL_AGENT_LOG".into(), filter));
    }
    env
}

/// Builds `job.json` and creates the job's log file (so a full or unwritable log directory
/// fails here, before anything runs).
pub(super) fn prepare(
    shared: &Shared,
    source: &Source,
    spec: &JobSpec,
    token: &str,
    token_hash: &str,
    attempt: u32,
) -> Result<JobFile, String> {
    let config = shared.attempts.live();
    let started_at = SystemTime::now();
    let attempt_id = format!("{}{attempt}", token_hash.get(..8).unwrap_or(token_hash));
    let log = JobLog::create(
        &config.jobs.log_dir,
        &LogName {
            workflow_execution_id: spec.workflow_execution_id.clone(),
            job_name: spec.job_name.clone(),
            started_at,
            attempt_id: attempt_id.clone(),
        },
    )
    .map_err(|e| crate::error_chain(&e))?;
    let log_file = log.path().to_path_buf();
    drop(log);
    let (log_group, log_stream) = match &shared.shipper {
        Some(shipper) => (
            Some(shipper.log_group().to_string()),
            Some(joblog::cloudwatch::stream_name(
                &spec.workflow_execution_id,
                &spec.job_name,
                started_at,
                &attempt_id,
            )),
        ),
        None => (None, None),
    };
    let (program, mut args) =
        supervisor::command_for_script(&spec.script, &config.jobs.interpreter);
    args.extend(crate::job::script_args(spec, config.jobs.legacy.as_ref()));
    let outbox_id = crate::report::outbox::new_entry_id();
    Ok(JobFile {
        protocol: PROTOCOL,
        job_name: spec.job_name.clone(),
        workflow_id: spec.workflow_id.clone(),
        workflow_execution_id: spec.workflow_execution_id.clone(),
        lock_key: spec.lock_key.clone(),
        lock_dir: shared.attempts.locks.dir().to_path_buf(),
        task_token: token.to_string(),
        token_hash: token_hash.to_string(),
        attempt,
        instance_id: shared.attempts.instance_id.clone(),
        heartbeat_ms: spec.heartbeat.map(|d| d.as_millis() as u64),
        lease_interval_ms: config.jobs.heartbeat_interval.as_millis() as u64,
        ssm_command_id: spec.ssm_command_id.clone(),
        sqs: match (source, &shared.sqs) {
            (Source::Sqs(d), Some(sqs)) => Some(SqsReceipt {
                queue_url: sqs.queue_url().to_string(),
                receipt_handle: d.receipt_handle.clone(),
                message_id: d.message_id.clone(),
                receive_count: d.receive_count,
                sent_at_ms: d.sent_at_ms,
            }),
            _ => None,
        },
        log_file,
        log_group,
        log_stream,
        outbox_id,
        started_at: humantime::format_rfc3339_millis(started_at).to_string(),
        launch: LaunchPlan {
            program,
            args,
            cwd: config.jobs.script_dir.clone(),
            env: vec![
                ("RSQL_WORKFLOW_ID".into(), spec.workflow_id.clone()),
                (
                    "RSQL_WORKFLOW_EXECUTION_ID".into(),
                    spec.workflow_execution_id.clone(),
                ),
                ("RSQL_JOB_NAME".into(), spec.job_name.clone()),
            ],
            inherited_env: owner_env()
                .into_iter()
                .filter(|(k, _)| INHERITED_ENV.contains(&k.as_str()))
                .collect(),
            timeout_ms: spec.timeout.as_millis() as u64,
            kill_grace_ms: config.jobs.kill_grace.as_millis() as u64,
            pipe_drain_ms: config.jobs.pipe_drain.as_millis() as u64,
            // `<lock key hash>-<nonce><attempt id>`: it still ends in the attempt number.
            job_id: crate::attempt::job_id(spec, &format!("{}{attempt_id}", delivery_nonce())),
            cgroup: shared
                .owners
                .launcher
                .cgroup_plan(&config.jobs, spec.memory_max),
            user: shared.owners.job_user.clone(),
        },
    })
}

/// Eight hex digits that set apart the owners of two copies of one message handled at once
/// by this agent: each copy starts its owner while its task is checked, before the lock
/// says which copy runs, so their job ids (the owner's directory, its cgroup, the marker)
/// must differ. Distinct within this process; started from the clock, so a restarted
/// agent does not begin where the last one did.
fn delivery_nonce() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32)
    });
    format!(
        "{:08x}",
        start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
    )
}

pub(super) fn running_record(shared: &Shared, job: &JobFile) -> JobAuditRecord {
    JobAuditRecord::running(
        JobNames {
            job_name: &job.job_name,
            workflow_execution_id: &job.workflow_execution_id,
            workflow_id: &job.workflow_id,
            ssm_command_id: job.ssm_command_id.as_deref(),
        },
        &shared.attempts.instance_id,
        job.started_at.clone(),
        job.attempt,
    )
    .with_log(
        job.log_group.clone(),
        job.log_stream.clone(),
        Some(job.log_file.display().to_string()),
    )
}
