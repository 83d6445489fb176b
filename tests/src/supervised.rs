//! A job for the supervisor's own tests (`tests/tests/supervisor.rs` and the stand-in agent
//! it kills): its job log, and its launch with the tests' limits (30 s timeout, 1 s
//! `kill_grace`, 2 s pipe drain, no cgroup, no change of user).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rsql_agent::joblog::{JobLog, LogName};
use rsql_agent::supervisor::Launch;

/// `program args…` run in `cwd` as job `job_id`, logging under `log_dir` as `name`.
pub fn launch(
    log_dir: &Path,
    name: &str,
    job_id: String,
    program: PathBuf,
    args: Vec<String>,
    cwd: PathBuf,
) -> Launch {
    let log = JobLog::create(
        log_dir,
        &LogName {
            workflow_execution_id: "supervisor-tests".into(),
            job_name: name.into(),
            started_at: SystemTime::now(),
            attempt_id: job_id.clone(),
        },
    )
    .expect("job log");
    Launch {
        program,
        args,
        cwd,
        env: vec![],
        timeout: Duration::from_secs(30),
        kill_grace: Duration::from_secs(1),
        pipe_drain: Duration::from_secs(2),
        log,
        job_id,
        inherit_fd: None,
        cgroup: None,
        user: None,
    }
}
