//! The SSM Run Command path end to end: `rsql-wrapper` hands jobs to the real `rsql-agent
//! run` over its Unix socket, or runs them itself with `rsql-wrapper run` where no agent
//! runs, with moto's executing state machines (the jobs here need no database).
//!
//! A real task token comes from a state machine whose task sends its message to a queue of
//! the test's own (the agent takes nothing from SQS here: it is a socket-only agent); the test
//! takes the token from there and submits the job with it, as SSM Run Command would.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_sfn::types::ExecutionStatus;
use rsql_agent_tests::agent::{process_alive, wait_until, write_script};
use rsql_agent_tests::bins;
use rsql_agent_tests::moto;
use rsql_agent_tests::world::{s, StateMachine, World, WAIT};

/// A socket-only world with the job audit table and a state machine whose one task sends
/// its message to the test's capture queue; the scripts the tests run.
async fn world() -> World {
    let world = World::builder("ssm")
        .job_table()
        .socket_only()
        .state_machine(StateMachine::Capture)
        .build()
        .await;
    let scripts = &world.scripts;
    write_script(scripts, "hello.sh", "echo \"hello $*\"");
    // Fails unless its arguments arrive exactly, spaces included.
    std::fs::create_dir(scripts.join("etl")).unwrap();
    std::fs::set_permissions(scripts.join("etl"), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The old trigger's `$instance_code_dir $secret_id`, then the extra arguments.
    write_script(
        &scripts.join("etl"),
        "legacy.sh",
        "[ \"$#\" = 4 ] || { echo \"bad args: $*\" >&2; exit 7; }\n\
         case \"$2\" in arn:aws:secretsmanager:*redshift-abc) ;; *) echo \"bad secret: $2\" >&2; exit 7;; esac\n\
         [ \"$3\" = alpha ] && [ \"$4\" = \"beta two\" ] || { echo \"bad args: $*\" >&2; exit 7; }\n\
         [ -d \"$1\" ] || { echo \"no code dir: $1\" >&2; exit 7; }\necho legacy ok",
    );
    write_script(scripts, "sleepy.sh", "sleep 30");
    world
}

/// The old invoke Lambda's 11 `rsql_trigger.sh` arguments for `etl/legacy.sh`, then the
/// script's own two.
fn legacy_call(world: &World, token: &str, execution_id: &str) -> Vec<String> {
    let script = world.scripts.join("etl").join("legacy.sh");
    [
        token,
        "legacy_wf",
        execution_id,
        script.to_str().unwrap(),
        "i-0legacy",
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:redshift-abc",
        "/var/log/rsql/legacy.log",
        "rsql-job-audit",
        "/rsql/jobs",
        world.scripts.to_str().unwrap(),
        "us-east-1",
        "alpha",
        "beta two",
    ]
    .map(str::to_string)
    .to_vec()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn wrapper(args: &[&str], socket: Option<&Path>) -> Output {
    let mut command = Command::new(bins::wrapper());
    command.args(args);
    match socket {
        Some(path) => command.env("RSQL_AGENT_SOCKET", path),
        None => command.env_remove("RSQL_AGENT_SOCKET"),
    };
    command.output().expect("run rsql-wrapper")
}

/// `rsql-wrapper run --config CONFIG` against moto, with no agent anywhere, for the job
/// `[token, workflow id, workflow execution id, job name]`, then `more` arguments.
fn standalone(world: &World, config: &Path, job: [&str; 4], more: &[&str]) -> Command {
    let [token, workflow_id, execution_id, job_name] = job;
    let mut command = Command::new(bins::wrapper());
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .args(["--task-token", token, "--workflow-id", workflow_id])
        .args([
            "--workflow-execution-id",
            execution_id,
            "--job-name",
            job_name,
        ])
        .args(more)
        .envs(moto::aws_env(&world.moto.endpoint()))
        .stdin(Stdio::null());
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_runs_a_job_to_its_callback_with_the_ssm_command_id_in_the_audit() {
    let world = world().await;
    let agent = world.start_agent(world.config());
    let (exec, token) = world.execution("ssm_ok_1").await;
    let started = Instant::now();
    let out = wrapper(
        &[
            "submit",
            "--task-token",
            &token,
            "--workflow-id",
            "ssm_test",
            "--workflow-execution-id",
            "ssm_ok_1",
            "--job-name",
            "hello.sh",
            "--ssm-command-id",
            "cmd-0123456789abcdef",
            "--timeout-seconds",
            "120",
            "--heartbeat-seconds",
            "60",
            "--socket",
            world.socket().to_str().unwrap(),
            "--",
            "world",
        ],
        None,
    );
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {} stderr {}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        agent.log()
    );
    assert!(
        text(&out.stdout).contains("accepted"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains(&rsql_agent::lock::token_hash(&token)),
        "{}",
        text(&out.stdout)
    );
    assert!(took < Duration::from_secs(2), "submit took {took:?}");

    let done = world.wait_execution(&exec).await;
    assert_eq!(
        *done.status(),
        ExecutionStatus::Succeeded,
        "{}",
        agent.log()
    );
    let output = moto::execution_output(&done);
    assert_eq!(output["status"], "completed", "{output}");
    assert_eq!(output["job_name"], "hello.sh");
    assert_eq!(output["workflow_execution_id"], "ssm_ok_1");

    let item = world.wait_audit("hello.sh", "ssm_ok_1", "completed").await;
    assert_eq!(
        s(&item, "ssm_command_id"),
        "cmd-0123456789abcdef",
        "{item:?}"
    );
    assert_eq!(s(&item, "workflow_id"), "ssm_test");
    let log = agent.log();
    assert!(
        !log.contains(&token),
        "the full task token is in the agent's log"
    );
    assert!(log.contains("accepted a socket submission"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_job_is_rejected_and_its_task_failed_as_invalid_job() {
    let world = world().await;
    let agent = world.start_agent(world.config());
    let (exec, token) = world.execution("ssm_bad_1").await;
    let out = wrapper(
        &[
            "submit",
            "--task-token",
            &token,
            "--workflow-id",
            "ssm_test",
            "--workflow-execution-id",
            "ssm_bad_1",
            "--job-name",
            "../../etc/passwd",
        ],
        Some(world.socket()),
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("outside the script directory"),
        "{}",
        text(&out.stderr)
    );
    let done = world.wait_execution(&exec).await;
    let output = moto::execution_output(&done);
    assert_eq!(
        output["error"]["Error"],
        "Rsql.InvalidJob",
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_is_not_allowed_is_refused_and_the_agent_logs_why() {
    let world = world().await;
    let agent = world.start_agent(world.config());
    // The file mode is the first gate; open it so the SO_PEERCRED check is what refuses.
    std::fs::set_permissions(world.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(bins::wrapper())
        .args([
            "submit",
            "--task-token",
            "not-a-real-token",
            "--workflow-id",
            "w",
            "--workflow-execution-id",
            "e",
            "--job-name",
            "hello.sh",
            "--socket",
            world.socket().to_str().unwrap(),
        ])
        .output()
        .expect("runuser");
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("not authorized"), "{stderr}");
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody")
        .uid
        .as_raw();
    assert!(stderr.contains(&format!("uid {nobody}")), "{stderr}");
    agent.wait_for_log(
        "refused a socket submission from an unauthorized peer",
        WAIT,
    );
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("refused a socket submission"))
        .unwrap_or_default();
    // Fields may carry colour codes in the log file: look for the values.
    assert!(line.contains(&nobody.to_string()), "{line}");
    assert!(line.contains("pid"), "{line}");
    assert!(!log.contains("job started"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_legacy_trigger_arguments_run_a_job_to_a_correct_callback() {
    let world = world().await;
    let agent = world.start_agent(world.config());
    let (exec, token) = world.execution("legacy_1").await;
    let args = legacy_call(&world, &token, "legacy_1");
    let out = wrapper(&strs(&args), Some(world.socket()));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{}", agent.log());
    assert!(stderr.contains("(secret id)"), "{stderr}");
    assert!(stderr.contains("ignored"), "{stderr}");
    assert!(!stderr.contains(&token), "the token is echoed: {stderr}");

    let done = world.wait_execution(&exec).await;
    assert_eq!(
        *done.status(),
        ExecutionStatus::Succeeded,
        "{}",
        agent.log()
    );
    let output = moto::execution_output(&done);
    assert_eq!(output["status"], "completed", "{output}");
    assert_eq!(output["job_name"], "etl/legacy.sh");
    assert_eq!(output["exit_code"], 0);
    let item = world
        .wait_audit("etl/legacy.sh", "legacy_1", "completed")
        .await;
    assert_eq!(s(&item, "workflow_id"), "legacy_wf");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_agent_says_busy() {
    let world = world().await;
    let mut config = world.config();
    config.max_concurrent_jobs = 1;
    let agent = world.start_agent(config);
    let submit = |id: &str, job: &str| {
        wrapper(
            &[
                "submit",
                "--task-token",
                &format!("token-{id}"),
                "--workflow-id",
                "w",
                "--workflow-execution-id",
                id,
                "--job-name",
                job,
            ],
            Some(world.socket()),
        )
    };
    // The first job's task is real and open, so it runs and holds the only slot (a job
    // whose task is closed is never started, and would free the slot at once).
    let (_exec, token) = world.execution("busy_1").await;
    let first = wrapper(
        &[
            "submit",
            "--task-token",
            &token,
            "--workflow-id",
            "w",
            "--workflow-execution-id",
            "busy_1",
            "--job-name",
            "sleepy.sh",
        ],
        Some(world.socket()),
    );
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    agent.wait_for_log("job started", WAIT);
    let second = submit("busy_2", "hello.sh");
    assert_eq!(second.status.code(), Some(75), "{}", text(&second.stderr));
    assert!(text(&second.stderr).contains("busy"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_legacy_call_waits_for_a_busy_agent_and_then_its_job_runs_once() {
    let world = world().await;
    write_script(&world.scripts, "four.sh", "sleep 4");
    let mut config = world.config();
    config.max_concurrent_jobs = 1;
    let agent = world.start_agent(config);
    let (first_exec, first_token) = world.execution("busy_first").await;
    let first = wrapper(
        &[
            "submit",
            "--task-token",
            &first_token,
            "--workflow-id",
            "w",
            "--workflow-execution-id",
            "busy_first",
            "--job-name",
            "four.sh",
        ],
        Some(world.socket()),
    );
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    agent.wait_for_log("job started", WAIT);
    // The old invoke Lambda's call while the only slot is taken: it never retries, so the
    // wrapper must, until the agent takes the job.
    let (exec, token) = world.execution("legacy_busy").await;
    let args = legacy_call(&world, &token, "legacy_busy");
    let out = tokio::task::block_in_place(|| wrapper(&strs(&args), Some(world.socket())));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{}", agent.log());
    assert!(stderr.contains("busy; asking again"), "{stderr}");
    for exec in [&first_exec, &exec] {
        let done = world.wait_execution(exec).await;
        assert_eq!(
            *done.status(),
            ExecutionStatus::Succeeded,
            "{}",
            agent.log()
        );
    }
    let item = world
        .wait_audit("etl/legacy.sh", "legacy_busy", "completed")
        .await;
    assert_eq!(s(&item, "workflow_id"), "legacy_wf");
}

#[test]
fn bad_arguments_give_a_usage_error_naming_the_argument() {
    let out = wrapper(&["submit", "--task-token", "T", "--job-name", "x.sh"], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--workflow-id"), "{stderr}");

    let out = wrapper(&["submit", "--bogus"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--bogus"));

    let out = wrapper(
        &[
            "submit",
            "--task-token",
            "T",
            "--workflow-id",
            "w",
            "--workflow-execution-id",
            "e",
            "--job-name",
            "x.sh",
            "--timeout-seconds",
            "soon",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--timeout-seconds"),
        "{}",
        text(&out.stderr)
    );

    // Too few for the legacy form: the first missing argument is named.
    let out = wrapper(&["tok", "wf", "exec", "/opt/scripts/a.sh", "i-1"], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("missing argument 6 (secret id)"),
        "{stderr}"
    );

    // No agent listening: its own exit code.
    let dir = tempfile::tempdir().unwrap();
    let out = wrapper(
        &[
            "submit",
            "--task-token",
            "T",
            "--workflow-id",
            "w",
            "--workflow-execution-id",
            "e",
            "--job-name",
            "x.sh",
        ],
        Some(&dir.path().join("none.sock")),
    );
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not reachable"));
}

#[tokio::test(flavor = "multi_thread")]
async fn run_completes_a_job_with_no_agent_and_reports_it_before_exiting() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, state_dir, _) = world.config().write(dir.path());
    let (exec, token) = world.execution("standalone_ok_1").await;
    let out = standalone(
        &world,
        &config,
        [&token, "ssm_test", "standalone_ok_1", "hello.sh"],
        &[
            "--ssm-command-id",
            "cmd-standalone",
            "--",
            "standalone world",
        ],
    )
    .output()
    .expect("rsql-wrapper run");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {stdout}\nstderr {stderr}"
    );
    assert!(stdout.contains("completed: job hello.sh"), "{stdout}");
    assert!(stdout.contains("reported"), "{stdout}");
    assert!(
        !stderr.contains(&token),
        "the token is in the log: {stderr}"
    );

    // The callback went out before the process exited: nothing is left to deliver.
    let outbox: Vec<_> = std::fs::read_dir(state_dir.join("outbox"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .collect();
    assert!(outbox.is_empty(), "undelivered: {outbox:?}");
    let done = world.wait_execution(&exec).await;
    assert_eq!(*done.status(), ExecutionStatus::Succeeded, "{stderr}");
    let output = moto::execution_output(&done);
    assert_eq!(output["status"], "completed", "{output}");
    assert_eq!(output["job_name"], "hello.sh");
    assert_eq!(output["exit_code"], 0);
    let item = world
        .wait_audit("hello.sh", "standalone_ok_1", "completed")
        .await;
    assert_eq!(s(&item, "ssm_command_id"), "cmd-standalone", "{item:?}");
    assert_eq!(s(&item, "workflow_id"), "ssm_test");

    // The job's own log is where the output says, with the script's output in it.
    let log_file = output["log_file"].as_str().expect("log_file in the output");
    let log = std::fs::read_to_string(log_file).expect("the job log");
    assert!(log.contains("hello standalone world"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_fails_an_invalid_job_as_invalid_job_and_says_why() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = world.config().write(dir.path());
    let (exec, token) = world.execution("standalone_bad_1").await;
    let out = standalone(
        &world,
        &config,
        [&token, "ssm_test", "standalone_bad_1", "no_such_script.sh"],
        &[],
    )
    .output()
    .expect("rsql-wrapper run");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no_such_script.sh"), "{stderr}");
    let done = world.wait_execution(&exec).await;
    let (error, cause) = moto::caught_error(&done);
    assert_eq!(error, "Rsql.InvalidJob", "{stderr}");
    assert!(cause.to_string().contains("no_such_script.sh"), "{cause}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_standalone_job_kills_it_and_reports_it_interrupted() {
    let world = world().await;
    write_script(
        &world.scripts,
        "long.sh",
        "echo $$ > \"$1\"\necho started\nsleep 300",
    );
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = world.config().write(dir.path());
    let (exec, token) = world.execution("standalone_term_1").await;
    let pid_file = dir.path().join("job.pid");
    let stderr_path = dir.path().join("wrapper.log");
    let child = standalone(
        &world,
        &config,
        [&token, "ssm_test", "standalone_term_1", "long.sh"],
        &["--", pid_file.to_str().unwrap()],
    )
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&stderr_path).unwrap())
    .spawn()
    .expect("start rsql-wrapper run");
    wait_until("the job to write its pid", WAIT, || {
        std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim().parse::<i32>().is_ok())
    });
    let job_pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_alive(job_pid));

    // What SSM does when the command is cancelled.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "stdout {}\nstderr {stderr}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("Rsql.Interrupted"),
        "{}",
        text(&out.stdout)
    );
    assert!(!process_alive(job_pid), "the job outlived rsql-wrapper run");
    let done = world.wait_execution(&exec).await;
    let (error, _) = moto::caught_error(&done);
    assert_eq!(error, "Rsql.Interrupted", "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_is_refused_beside_a_running_agent_and_touches_nothing() {
    let world = world().await;
    let agent = world.start_agent(world.config());
    let out = standalone(
        &world,
        &agent.config_path,
        ["token-beside", "w", "beside_1", "hello.sh"],
        &[],
    )
    .output()
    .expect("rsql-wrapper run");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    assert!(stderr.contains("rsql-agent run"), "{stderr}");
    assert!(stderr.contains("rsql-wrapper submit"), "{stderr}");
    // Nothing of the job reached the agent's state: no job record, no outbox entry.
    assert!(!agent.state_dir.join("jobs").join("beside_1").exists());
    let outbox = std::fs::read_dir(agent.state_dir.join("outbox"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(outbox, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_as_root_refuses_a_state_dir_that_belongs_to_the_service_user() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, state_dir, _) = world.config().write(dir.path());
    std::fs::create_dir_all(&state_dir).unwrap();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    nix::unistd::chown(&state_dir, Some(nobody.uid), None).unwrap();
    // `nobody` plays the service user here: named as such, its state directory passes the
    // config's trust rule, and it is the wrapper's own check that refuses root.
    let out = standalone(&world, &config, ["T", "w", "e", "hello.sh"], &[])
        .env("RSQL_AGENT_USER", "nobody")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("belongs to uid {}", nobody.uid)),
        "{stderr}"
    );
    assert!(stderr.contains("runuser -u rsql"), "{stderr}");
    // Refused before anything was written there.
    assert_eq!(std::fs::read_dir(&state_dir).unwrap().count(), 0);
}

#[test]
fn run_names_a_missing_config_and_a_missing_argument() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let out = Command::new(bins::wrapper())
        .args(["run", "--config", missing.to_str().unwrap()])
        .args(["--task-token", "T", "--workflow-id", "w"])
        .args(["--workflow-execution-id", "e", "--job-name", "x.sh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("nowhere.toml"));

    let out = Command::new(bins::wrapper())
        .args(["run", "--task-token", "T", "--job-name", "x.sh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--workflow-id"),
        "{}",
        text(&out.stderr)
    );
}
