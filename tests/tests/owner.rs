//! Jobs outlive the agent: each job runs under its own owner process (`rsql-job-owner`),
//! which holds its lock, its pipes and its log. These tests SIGKILL and SIGTERM the real
//! `rsql-agent run` binary (and the owner itself) in the middle of jobs, against the moto
//! emulator with executing state machines, and check what an operator would see: the
//! execution's status, how many times the script ran, the log lines, the callbacks.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rsql_agent_tests::agent::{
    process_alive, start_time, wait_until, write_script, Agent, AgentConfig,
};
use rsql_agent_tests::moto;
use rsql_agent_tests::world::{eventually_with, World, WAIT};
use serde_json::json;

/// moto, the job queue and an empty script directory.
async fn world() -> World {
    World::builder("jobs").build().await
}

/// One job task; `catch`: failures end in a Pass state with the error in `$.error`.
async fn state_machine(world: &World, heartbeat: u64, catch: bool) -> String {
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": "owner_test",
        "workflow_execution_id.$": "$.execution_id",
        "job_name.$": "$.job_name",
        "timeout_seconds": 300,
        "heartbeat_seconds": heartbeat
    });
    let mut task = moto::JobTask::new(&world.queue_url, body, heartbeat);
    task.catch = catch;
    moto::create_state_machine(&world.sdk, &moto::unique_name("owner"), &task.definition()).await
}

async fn start(world: &World, sm: &str, execution_id: &str, job: &str) -> String {
    let input = json!({"execution_id": execution_id, "job_name": job});
    moto::start_execution(&world.sdk, sm, &input.to_string()).await
}

async fn count(world: &World, exec: &str, kind: HistoryEventType) -> usize {
    moto::count_events(&world.sdk, exec, kind).await
}

/// A job that records each start in `runs`, its own pid and its `sleep` child's pid in
/// `pids`, then prints `line 1` .. `line N` one second apart.
fn ticking_job(world: &World, name: &str, lines: u32) -> (PathBuf, PathBuf) {
    let runs = world.scripts.join(format!("{name}.runs"));
    let pids = world.scripts.join(format!("{name}.pids"));
    write_script(
        &world.scripts,
        name,
        &format!(
            "echo started >> {runs}\nsleep 600 &\necho \"$$ $!\" > {pids}\n\
             for i in $(seq 1 {lines}); do echo \"line $i\"; sleep 1; done\nkill $!",
            runs = runs.display(),
            pids = pids.display()
        ),
    );
    (runs, pids)
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn runs(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .count()
}

/// The job's log lines (the payload after the timestamp and stream tag).
fn log_lines(agent: &Agent) -> Vec<String> {
    let mut files = Vec::new();
    collect_logs(&agent.state_dir.join("jobs"), &mut files);
    assert_eq!(files.len(), 1, "one job log expected: {files:?}");
    payloads(&std::fs::read_to_string(&files[0]).expect("read job log"))
}

/// How many lines the job's log holds so far: none while there is no log yet.
fn logged_so_far(agent: &Agent) -> usize {
    let mut files = Vec::new();
    collect_logs(&agent.state_dir.join("jobs"), &mut files);
    files
        .iter()
        .map(|f| payloads(&std::fs::read_to_string(f).unwrap_or_default()).len())
        .sum()
}

fn payloads(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.splitn(3, ' ').nth(2).map(str::to_string))
        .collect()
}

/// The messages CloudWatch holds so far in the one stream of `group` whose name starts with
/// `prefix`; empty while there is no such group or stream.
async fn cloudwatch_lines(world: &World, group: &str, prefix: &str) -> Vec<String> {
    let logs = aws_sdk_cloudwatchlogs::Client::new(&world.sdk);
    let Ok(streams) = logs
        .describe_log_streams()
        .log_group_name(group)
        .log_stream_name_prefix(prefix)
        .send()
        .await
    else {
        return Vec::new();
    };
    let Some(stream) = streams
        .log_streams()
        .first()
        .and_then(|s| s.log_stream_name())
    else {
        return Vec::new();
    };
    logs.get_log_events()
        .log_group_name(group)
        .log_stream_name(stream)
        .start_from_head(true)
        .send()
        .await
        .map(|out| {
            out.events()
                .iter()
                .filter_map(|e| e.message().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn collect_logs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_logs(&path, out);
        } else if path.extension().is_some_and(|x| x == "log") {
            out.push(path);
        }
    }
}

fn expected_lines(n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("line {i}")).collect()
}

/// The live owner of the agent's one running job: (pid, the job's pid).
fn only_owner(agent: &Agent) -> (i32, i32) {
    let owners = agent.owners();
    assert_eq!(owners.len(), 1, "{owners:?}");
    (
        owners[0]["pid"].as_i64().expect("owner pid") as i32,
        owners[0]["job_pid"].as_i64().unwrap_or(0) as i32,
    )
}

async fn wait_started(agent: &Agent, pids: &Path) {
    eventually_with("the job to start", WAIT, || async move {
        if read_pids(pids).len() < 2 || agent.owners().is_empty() {
            Err(format!("agent log:\n{}", agent.log()))
        } else {
            Ok(())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_agent_costs_no_job_and_the_restarted_agent_reports_it_once() {
    let world = world().await;
    let (runs_file, pids) = ticking_job(&world, "tick.sh", 25);
    let mut config = world.config();
    let group = moto::unique_name("/rsql/owner");
    config.log_group = Some(group.clone());
    let mut agent = Agent::start(config.clone(), &world.moto.endpoint());
    // HeartbeatSeconds: shorter than the job (25 s), longer than the agent's absence (~3 s).
    let sm = state_machine(&world, 12, false).await;
    let exec = start(&world, &sm, "kill_1", "tick.sh").await;
    wait_started(&agent, &pids).await;
    // Shipping has begun, so the restarted agent has a place to resume from.
    eventually_with("the first lines in CloudWatch", WAIT, || async {
        let shipped = cloudwatch_lines(&world, &group, "kill_1/tick.sh/").await;
        if shipped.len() >= 2 {
            Ok(())
        } else {
            Err(format!("{shipped:?}\n{}", agent.log()))
        }
    })
    .await;

    agent.kill();
    // The job goes on without an agent: its owner keeps logging the lines it prints.
    let at_kill = logged_so_far(&agent);
    wait_until("the job to log two lines with no agent", WAIT, || {
        logged_so_far(&agent) >= at_kill + 2
    });
    for pid in read_pids(&pids) {
        assert!(
            process_alive(pid),
            "job process {pid} died with the agent:\n{}",
            agent.log()
        );
    }
    agent.restart();
    agent.wait_for_log("adopting a job left by an earlier agent", WAIT);

    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(runs(&runs_file), 1, "the script ran more than once");
    assert_eq!(
        count(&world, &exec, HistoryEventType::TaskSucceeded).await,
        1
    );
    assert_eq!(count(&world, &exec, HistoryEventType::TaskFailed).await, 0);
    assert_eq!(
        count(&world, &exec, HistoryEventType::TaskTimedOut).await,
        0
    );
    assert_eq!(log_lines(&agent), expected_lines(25), "the local log");

    // CloudWatch has every line once, in order: shipping resumed where it stopped.
    let output = moto::execution_output(&out);
    let group = output["log_group"].as_str().expect("log_group").to_string();
    let stream = output["log_stream"]
        .as_str()
        .expect("log_stream")
        .to_string();
    let logs = aws_sdk_cloudwatchlogs::Client::new(&world.sdk);
    let deadline = Instant::now() + WAIT;
    loop {
        let events = logs
            .get_log_events()
            .log_group_name(&group)
            .log_stream_name(&stream)
            .start_from_head(true)
            .send()
            .await
            .expect("GetLogEvents");
        let got: Vec<String> = events
            .events()
            .iter()
            .filter_map(|e| e.message().map(str::to_string))
            .collect();
        if got == expected_lines(25) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "CloudWatch has {got:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_ends_while_no_agent_runs_is_reported_soon_after_the_next_start() {
    let world = world().await;
    let (runs_file, pids) = ticking_job(&world, "short.sh", 3);
    let mut agent = world.agent(|_| {});
    let sm = state_machine(&world, 60, false).await;
    let exec = start(&world, &sm, "ended_1", "short.sh").await;
    wait_started(&agent, &pids).await;
    agent.kill();
    // The owner records the exit on its own.
    let owners_dir = agent.state_dir.join("owners");
    let exit_files = || {
        std::fs::read_dir(&owners_dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("exit.json").exists())
                    .count()
            })
            .unwrap_or(0)
    };
    wait_until("the owner's exit record", WAIT, || exit_files() == 1);
    let restarted = Instant::now();
    agent.restart();
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    let took = restarted.elapsed();
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert!(
        took < Duration::from_secs(10),
        "reported {took:?} after the start"
    );
    assert_eq!(runs(&runs_file), 1);
    wait_until("the reported job's directory is removed", WAIT, || {
        exit_files() == 0
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_the_job_off_within_5_s_and_the_next_agent_completes_it() {
    let world = world().await;
    let (runs_file, pids) = ticking_job(&world, "handoff.sh", 8);
    let mut agent = world.agent(|_| {});
    let sm = state_machine(&world, 30, false).await;
    let exec = start(&world, &sm, "term_1", "handoff.sh").await;
    wait_started(&agent, &pids).await;
    let asked = Instant::now();
    let status = agent.terminate(Duration::from_secs(5));
    assert!(status.success(), "{status:?}\n{}", agent.log());
    assert!(asked.elapsed() < Duration::from_secs(5));
    let (owner, job) = only_owner(&agent);
    assert!(
        process_alive(owner) && process_alive(job),
        "the job died with the agent"
    );
    // A job's owner is a small synchronous program: one thread, no runtime's workers.
    let status = std::fs::read_to_string(format!("/proc/{owner}/status")).expect("status");
    assert!(
        status.lines().any(|l| l == "Threads:\t1"),
        "the owner runs more than one thread:\n{status}"
    );
    agent.restart();
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(runs(&runs_file), 1);
    assert_eq!(
        count(&world, &exec, HistoryEventType::TaskSucceeded).await,
        1
    );
    assert_eq!(log_lines(&agent), expected_lines(8));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_owner_takes_its_whole_job_with_it_and_fails_the_task_interrupted() {
    let world = world().await;
    let (runs_file, pids) = ticking_job(&world, "victim.sh", 60);
    let agent = world.agent(|_| {});
    let sm = state_machine(&world, 30, true).await;
    let exec = start(&world, &sm, "owner_kill_1", "victim.sh").await;
    wait_started(&agent, &pids).await;
    let (owner, _) = only_owner(&agent);
    let job_pids = read_pids(&pids);
    kill(Pid::from_raw(owner), Signal::SIGKILL).expect("SIGKILL the owner");
    let killed_at = Instant::now();
    // kill_grace is 2 s in these tests.
    wait_until(
        "every process of the job is gone",
        Duration::from_secs(4),
        || job_pids.iter().all(|&p| !process_alive(p)),
    );
    assert!(killed_at.elapsed() <= Duration::from_secs(4));
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    let (error, cause) = moto::caught_error(&out);
    assert_eq!(error, "Rsql.Interrupted", "{cause}\n{}", agent.log());
    assert!(
        cause["message"]
            .as_str()
            .unwrap_or_default()
            .contains("owner process"),
        "{cause}"
    );
    assert_eq!(runs(&runs_file), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_seeing_a_job_whose_owner_lives_neither_runs_nor_fails_it() {
    let world = world().await;
    let (runs_file, pids) = ticking_job(&world, "shared.sh", 30);
    let lock_dir = tempfile::tempdir().expect("lock dir");
    let mut config = world.config();
    config.lock_dir = Some(lock_dir.path().to_path_buf());
    config.visibility_timeout = "10s".into();
    let mut a = Agent::start(
        AgentConfig {
            instance_id: "i-0a".into(),
            ..config.clone()
        },
        &world.moto.endpoint(),
    );
    // Longer than a visibility timeout plus a tick: B's heartbeats on the owner's behalf
    // are what keep the task alive while A is down.
    let sm = state_machine(&world, 20, false).await;
    let exec = start(&world, &sm, "two_hosts_1", "shared.sh").await;
    wait_started(&a, &pids).await;
    a.kill();
    // B starts only now, so the job is A's; then A stays down past the visibility timeout.
    let b = Agent::start(
        AgentConfig {
            instance_id: "i-0b".into(),
            ..config.clone()
        },
        &world.moto.endpoint(),
    );
    b.wait_for_log("job is running elsewhere; leaving this copy", WAIT);
    // B comes back to the copy a tick later and again heartbeats for the owner.
    wait_until("B to heartbeat twice on the owner's behalf", WAIT, || {
        b.log().matches("heartbeat sent on its behalf").count() >= 2
    });
    assert!(b.owners().is_empty(), "B started an owner of its own");
    assert_eq!(count(&world, &exec, HistoryEventType::TaskFailed).await, 0);
    a.restart();
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(
        *out.status(),
        ExecutionStatus::Succeeded,
        "A:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(
        runs(&runs_file),
        1,
        "the job's effect happened more than once"
    );
    assert_eq!(
        count(&world, &exec, HistoryEventType::TaskSucceeded).await,
        1
    );
    assert_eq!(
        count(&world, &exec, HistoryEventType::TaskTimedOut).await,
        0
    );
    // Nothing of the job is left.
    for pid in read_pids(&pids) {
        assert!(start_time(pid).is_none() || !process_alive(pid));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_wait_returns_once_the_running_job_completed_and_takes_no_new_job() {
    let world = world().await;
    let (first_runs, pids) = ticking_job(&world, "first.sh", 5);
    let (second_runs, _) = ticking_job(&world, "second.sh", 1);
    let agent = world.agent(|_| {});
    let sm = state_machine(&world, 30, false).await;
    let first = start(&world, &sm, "drain_1", "first.sh").await;
    wait_started(&agent, &pids).await;

    let asked = Instant::now();
    let drain = std::process::Command::new(rsql_agent_tests::bins::agent())
        .args(["drain", "--wait", "--config"])
        .arg(&agent.config_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("rsql-agent drain --wait");
    agent.wait_for_log("draining: intake stopped", Duration::from_secs(1));
    assert!(asked.elapsed() < Duration::from_secs(2));
    let second = start(&world, &sm, "drain_2", "second.sh").await;

    let status = tokio::task::spawn_blocking(move || drain.wait_with_output())
        .await
        .expect("join")
        .expect("drain output");
    assert!(status.status.success(), "{status:?}\n{}", agent.log());
    // It returned only after the job completed and its report was delivered.
    let out = moto::describe(&world.sdk, &first).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(runs(&first_runs), 1);
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(said.contains("drained"), "{said}");
    // The job sent after the drain began waits in the queue, taken by nobody.
    world.wait_queue((1, 0), WAIT).await;
    assert_eq!(runs(&second_runs), 0, "a drained agent ran a new job");
    let out = moto::describe(&world.sdk, &second).await;
    assert_eq!(*out.status(), ExecutionStatus::Running);
    assert!(agent.owners().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_cannot_start_says_why_instead_of_blaming_a_dead_runner() {
    let world = world().await;
    let (runs_file, _) = ticking_job(&world, "never.sh", 1);
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    // The job log directory cannot be created: a file sits where it should be.
    std::fs::write(state.join("jobs"), "not a directory").expect("block the log dir");
    let mut config = world.config();
    config.state_dir = Some(state);
    let agent = Agent::start(config, &world.moto.endpoint());
    let sm = state_machine(&world, 30, true).await;
    let exec = start(&world, &sm, "nostart_1", "never.sh").await;
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    let (error, cause) = moto::caught_error(&out);
    assert_eq!(error, "Rsql.Interrupted", "{cause}\n{}", agent.log());
    let message = cause["message"].as_str().unwrap_or_default();
    assert!(message.contains("the job was not started"), "{message}");
    assert!(
        message.contains("jobs"),
        "the message names the path: {message}"
    );
    assert!(!message.contains("stopped while"), "{message}");
    assert_eq!(runs(&runs_file), 0);
    assert!(agent.owners().is_empty());
}
