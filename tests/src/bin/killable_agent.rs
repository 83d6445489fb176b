//! `rsql-test-killable-agent PID_FILE`: a stand-in agent for the agent-death test of
//! `tests/tests/supervisor.rs`, which SIGKILLs it.
//!
//! It starts one job under a supervisor of its own: a bash script that starts a background
//! `sleep` and then `exec`s another. The job writes its child's pid to `PID_FILE` with the
//! extension `child`; once that is there, this writes the job's (the leader's) pid to
//! `PID_FILE`, which the test takes as "ready". Then it waits to be killed: until its stdin
//! closes, which it does only when the test is gone, and then it fails. The script, the job
//! log and both pid files stay in `PID_FILE`'s directory.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rsql_agent::supervisor::Supervisor;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [pid_file] = args.as_slice() else {
        eprintln!("usage: rsql-test-killable-agent PID_FILE");
        return ExitCode::from(2);
    };
    let dir = pid_file
        .parent()
        .expect("the pid file has a directory")
        .to_path_buf();
    let child_file = pid_file.with_extension("child");
    let supervisor = Supervisor::new().expect("supervisor");
    let script = dir.join("doomed.sh");
    std::fs::write(
        &script,
        "#!/bin/bash\nsleep 1000 &\necho $! > \"$1\"\nexec sleep 1000\n",
    )
    .expect("write the job's script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the job's script");
    let job_id = format!("killable-agent-{}", std::process::id());
    let launch = rsql_agent_tests::supervised::launch(
        &dir.join("logs"),
        "doomed",
        job_id,
        script,
        vec![child_file.display().to_string()],
        dir.clone(),
    );
    let handle = supervisor.start(launch).expect("start the job");
    // The child's pid first: the test takes the job's pid file as "ready".
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&child_file).map_or(true, |t| t.trim().is_empty()) {
        if Instant::now() >= deadline {
            eprintln!("the job never wrote its child's pid");
            return ExitCode::FAILURE;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Written whole: a reader never sees part of the pid.
    let partial = pid_file.with_extension("partial");
    std::fs::write(&partial, handle.pid().to_string()).expect("pid file");
    std::fs::rename(&partial, pid_file).expect("pid file in place");
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await;
    eprintln!("the agent-death test should have killed this process");
    drop(handle);
    ExitCode::FAILURE
}
