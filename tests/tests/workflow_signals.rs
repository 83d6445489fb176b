//! `rsql-agent workflow run` and the process's signals, as the README's signal table says:
//! the first SIGINT stops the running jobs (SIGTERM to the job's process group, `kill_grace`,
//! SIGKILL) and reports them `Rsql.Interrupted`, starting nothing more; a second one kills
//! them at once. Real processes: the agent and bash jobs that say what they received.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rsql_agent_tests::agent::wait_until;
use rsql_agent_tests::bins;
use serde_json::Value;

/// Generous: the machine is shared, and every wait ends as soon as its event happens.
const WAIT: Duration = Duration::from_secs(90);

struct Run {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    child: Child,
}

/// A workflow of two sequential stages: `long.sh` (the given body, `ROOT` in it naming the
/// run's directory, after it has written its pid to `ROOT/pid`), then `after.sh`, which
/// leaves `ROOT/after_ran` should it run. Started with `kill_grace`, execution id
/// `signals_1`.
fn start(long_body: &str, kill_grace: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let scripts = root.join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = |name: &str, body: String| {
        let path = scripts.join(name);
        std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(
        "long.sh",
        format!("echo $$ > ROOT/pid\n{long_body}").replace("ROOT", &root.display().to_string()),
    );
    script("after.sh", format!("touch {}/after_ran", root.display()));
    let workflow = root.join("wf.json");
    std::fs::write(
        &workflow,
        r#"{"workflow_id": "signals", "workflow_stages": [
            {"execution_flag": "y", "execution_type": "sequential", "scripts": ["long.sh"]},
            {"execution_flag": "y", "execution_type": "sequential", "scripts": ["after.sh"]}]}"#,
    )
    .unwrap();
    let state = root.join("state");
    let config = root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{state}\"\n\
             [jobs]\nscript_dir = \"{scripts}\"\nlog_dir = \"{state}/jobs\"\nkill_grace = \"{kill_grace}\"\n",
            state = state.display(),
            scripts = scripts.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let child = Command::new(bins::agent())
        .args(["workflow", "run"])
        .arg(&workflow)
        .arg("--config")
        .arg(&config)
        .args(["--execution-id", "signals_1"])
        .stdout(std::fs::File::create(root.join("stdout")).unwrap())
        .stderr(std::fs::File::create(root.join("stderr")).unwrap())
        .spawn()
        .expect("start rsql-agent workflow run");
    Run {
        _dir: dir,
        root,
        state,
        child,
    }
}

impl Run {
    /// The job's pid, once it has started.
    fn job_pid(&self) -> Pid {
        let file = self.root.join("pid");
        wait_until("long.sh to start", WAIT, || {
            std::fs::read_to_string(&file).is_ok_and(|p| p.trim().parse::<i32>().is_ok())
        });
        Pid::from_raw(
            std::fs::read_to_string(&file)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        )
    }

    fn interrupt(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT).expect("SIGINT the agent");
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for rsql-agent")
    }

    /// Waits for the agent to exit, then gives its status and what it printed.
    fn end(&mut self) -> (ExitStatus, String) {
        let mut status = None;
        wait_until("rsql-agent workflow run to exit", WAIT, || {
            status = self.exited();
            status.is_some()
        });
        let read = |name: &str| std::fs::read_to_string(self.root.join(name)).unwrap();
        let output = format!(
            "--- stdout\n{}\n--- stderr\n{}",
            read("stdout"),
            read("stderr")
        );
        (status.unwrap(), output)
    }

    /// The last job audit record of `job` in this run.
    fn audit(&self, job: &str) -> Option<Value> {
        std::fs::read_to_string(self.state.join("audit/job_audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .rev()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| r["job_name"] == job && r["workflow_execution_id"] == "signals_1")
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gone(pid: Pid) -> bool {
    kill(pid, None).is_err()
}

/// The interrupted job's report and the stage after it, as a user reads them.
fn assert_interrupted(run: &Run, output: &str) {
    let record = run
        .audit("long.sh")
        .unwrap_or_else(|| panic!("no audit\n{output}"));
    assert_eq!(record["execution_status"], "failed", "{record}\n{output}");
    let message = record["error_message"].as_str().unwrap_or_default();
    assert!(message.contains("Rsql.Interrupted"), "{record}\n{output}");
    assert!(run.audit("after.sh").is_none(), "{output}");
    assert!(!run.root.join("after_ran").exists(), "{output}");
    assert!(
        output.contains("workflow signals execution signals_1: INTERRUPTED"),
        "{output}"
    );
    assert!(output.contains("--resume signals_1"), "{output}");
}

#[test]
fn first_sigint_stops_the_running_job_with_sigterm_and_reports_it_interrupted() {
    let mut run = start(
        "trap 'touch ROOT/got_term; exit 143' TERM\nsleep 600 &\nwait",
        "1m",
    );
    let job = run.job_pid();
    run.interrupt();
    let (status, output) = run.end();
    assert_eq!(status.code(), Some(130), "{output}");
    // It was asked with SIGTERM (the trap ran) before any SIGKILL, and nothing of it is left.
    assert!(run.root.join("got_term").exists(), "{output}");
    assert!(gone(job), "the job outlived the run\n{output}");
    assert!(output.contains("stopping the running jobs"), "{output}");
    assert_interrupted(&run, &output);
}

#[test]
fn second_sigint_kills_a_job_that_ignores_sigterm_at_once() {
    // The job ignores SIGTERM; only a SIGKILL ends it, and kill_grace would wait 10 minutes.
    let mut run = start(
        "trap 'touch ROOT/got_term' TERM\nwhile :; do sleep 0.2; done",
        "10m",
    );
    let job = run.job_pid();
    run.interrupt();
    let got_term = run.root.join("got_term");
    wait_until("the job to get SIGTERM", WAIT, || got_term.exists());
    assert!(run.exited().is_none(), "the run ended before kill_grace");
    assert!(!gone(job), "the job ended on SIGTERM, which it ignores");
    run.interrupt();
    let (status, output) = run.end();
    assert_eq!(status.code(), Some(130), "{output}");
    assert!(gone(job), "the job outlived the run\n{output}");
    assert!(output.contains("killing the running jobs now"), "{output}");
    assert_interrupted(&run, &output);
}
