use super::termination::Cause;
use super::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;

fn status_code(code: i32) -> ExitStatus {
    ExitStatus::from_raw(code << 8)
}

fn status_signal(signal: i32) -> ExitStatus {
    ExitStatus::from_raw(signal)
}

#[test]
fn classification() {
    assert_eq!(classify(status_code(3), None), Ending::Exited { code: 3 });
    assert_eq!(
        classify(status_signal(11), None),
        Ending::Signaled { signal: 11 }
    );
    let timed_out = Termination {
        cause: Cause::TimedOut,
        last_signal: Signal::SIGTERM,
        kill_at: None,
    };
    assert_eq!(
        classify(status_signal(9), Some(timed_out)),
        Ending::TimedOut { signal: 9 }
    );
    // It trapped SIGTERM and exited: still our timeout, reported with our signal.
    assert_eq!(
        classify(status_code(0), Some(timed_out)),
        Ending::TimedOut { signal: 15 }
    );
    let stopped = Termination {
        cause: Cause::Stopped(StopReason::Cancelled),
        ..timed_out
    };
    assert_eq!(
        classify(status_signal(15), Some(stopped)),
        Ending::Stopped {
            reason: StopReason::Cancelled,
            signal: Some(15)
        }
    );
}

#[test]
fn scripts_run_directly_only_when_the_kernel_can_run_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bash = Path::new("/bin/bash");
    let write = |name: &str, body: &[u8], mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    };
    let shebang = write("a.sh", b"#!/bin/sh\necho hi\n", 0o755);
    let plain = write("b.sh", b"#!/bin/sh\necho hi\n", 0o644);
    let no_shebang = write("c.sh", b"echo hi\n", 0o755);
    assert_eq!(
        command_for_script(&shebang, bash),
        (shebang.clone(), vec![])
    );
    assert_eq!(
        command_for_script(&plain, bash),
        (bash.to_path_buf(), vec![plain.display().to_string()])
    );
    assert_eq!(
        command_for_script(&no_shebang, bash),
        (bash.to_path_buf(), vec![no_shebang.display().to_string()])
    );
    let missing = dir.path().join("missing.sh");
    assert_eq!(
        command_for_script(&missing, bash),
        (bash.to_path_buf(), vec![missing.display().to_string()])
    );
}

#[test]
fn debug_output_hides_env_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = JobLog::create(
        dir.path(),
        &crate::joblog::LogName {
            workflow_execution_id: "w".into(),
            job_name: "j".into(),
            started_at: SystemTime::now(),
            attempt_id: "1".into(),
        },
    )
    .expect("log");
    let launch = Launch {
        program: "/bin/true".into(),
        args: vec![],
        cwd: "/".into(),
        env: vec![("RSPASSWORD".into(), "hunter2-secret".into())],
        timeout: Duration::from_secs(1),
        kill_grace: Duration::from_secs(1),
        pipe_drain: DEFAULT_PIPE_DRAIN,
        log,
        job_id: "x".into(),
        inherit_fd: None,
        cgroup: None,
        user: None,
    };
    let shown = format!("{launch:?}");
    assert!(shown.contains("RSPASSWORD"));
    assert!(!shown.contains("hunter2"), "{shown}");
}
