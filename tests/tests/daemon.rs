//! The daemon's AWS path end to end: the real `rsql-agent run` binary against the moto
//! emulator with executing state machines, real PostgreSQL and the `rsql` stand-in.
//!
//! Each test drives one `sqs:sendMessage.waitForTaskToken` task and checks what an operator
//! would see: the execution's status, output or caught error, the audit item, the queue.

use std::time::{Duration, Instant};

use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use rsql_agent_tests::agent::{process_alive, wait_until, write_script, Agent};
use rsql_agent_tests::moto;
use rsql_agent_tests::pg::TestPg;
use rsql_agent_tests::proxy::Proxy;
use rsql_agent_tests::world::{s, World, WAIT};
use serde_json::{json, Value};

/// One task that hands the job to the agent's queue; errors are caught into `$.error`, so
/// a test can read the error and cause from the output.
fn definition(queue_url: &str, heartbeat: u64) -> String {
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": "daemon_test",
        "workflow_execution_id.$": "$.execution_id",
        "job_name.$": "$.job_name",
        "args.$": "$.args",
        "timeout_seconds.$": "$.timeout_seconds",
        "heartbeat_seconds": heartbeat
    });
    moto::JobTask::new(queue_url, body, heartbeat).definition()
}

/// moto, the job queue, the sample jobs and a job audit table.
async fn world() -> World {
    World::builder("jobs")
        .sample_scripts()
        .job_table()
        .build()
        .await
}

async fn state_machine(world: &World, heartbeat: u64) -> String {
    moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("job"),
        &definition(&world.queue_url, heartbeat),
    )
    .await
}

async fn start(world: &World, sm: &str, execution_id: &str, job: &str, timeout: u64) -> String {
    let input = json!({
        "execution_id": execution_id, "job_name": job, "args": [], "timeout_seconds": timeout
    });
    world.start_execution(sm, input).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sample_script_succeeds_with_contract_output_and_audit() {
    // The sync PostgreSQL client runs its own runtime: keep it off this one's threads.
    let pg = tokio::task::block_in_place(TestPg::start);
    let world = world().await;
    let agent = Agent::start(world.config().database(&pg), &world.moto.endpoint());
    let sm = state_machine(&world, 30).await;
    let exec = start(&world, &sm, "ok_1", "rsql_blog_script_1.sh", 120).await;
    let out = world.wait_execution(&exec).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    let output = moto::execution_output(&out);
    for key in [
        "job_name",
        "workflow_execution_id",
        "status",
        "exit_code",
        "duration_ms",
        "instance_id",
        "log_group",
        "log_stream",
    ] {
        assert!(output.get(key).is_some(), "output lacks {key}: {output}");
    }
    assert_eq!(output["status"], "completed");
    assert_eq!(output["job_name"], "rsql_blog_script_1.sh");
    assert_eq!(output["workflow_execution_id"], "ok_1");
    assert_eq!(output["exit_code"], 0);
    assert_eq!(output["instance_id"], "i-0test");

    let item = world
        .wait_audit("rsql_blog_script_1.sh", "ok_1", "completed")
        .await;
    assert_eq!(s(&item, "workflow_id"), "daemon_test");
    assert!(s(&item, "execution_start_ts") <= s(&item, "execution_end_ts"));
    assert_eq!(s(&item, "instance_id"), "i-0test");
    world.wait_queue((0, 0), WAIT).await;
    assert_eq!(
        tokio::task::block_in_place(|| pg.query_i64(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'rsql_blog'"
        )),
        1
    );
    // One callback, not two.
    assert_eq!(
        moto::count_events(&world.sdk, &exec, HistoryEventType::TaskSucceeded).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_error_is_caught_as_script_failed_with_sql_state() {
    // The sync PostgreSQL client runs its own runtime: keep it off this one's threads.
    let pg = tokio::task::block_in_place(TestPg::start);
    let world = world().await;
    let agent = Agent::start(world.config().database(&pg), &world.moto.endpoint());
    let sm = state_machine(&world, 30).await;
    let exec = start(&world, &sm, "fail_1", "rsql_blog_script_fail.sh", 120).await;
    let out = world.wait_execution(&exec).await;
    let (error, cause) = moto::caught_error(&out);
    assert_eq!(error, "Rsql.ScriptFailed", "{}", agent.log());
    assert_eq!(cause["sql_state"], "42P01", "{cause}");
    assert!(
        cause["message"].as_str().unwrap().contains("no_such_table"),
        "{cause}"
    );
    assert_eq!(cause["exit_code"], 31, "{cause}");
    let item = world
        .wait_audit("rsql_blog_script_fail.sh", "fail_1", "failed")
        .await;
    assert!(s(&item, "error_message").contains("42P01"), "{item:?}");
}

/// A wrapper script whose rsql dies of SIGKILL (the OOM killer) exits 137; the workflow
/// must see the retryable Rsql.Killed, not a script failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_killed_under_the_script_is_caught_as_rsql_killed() {
    let world = world().await;
    write_script(
        &world.scripts,
        "oom.sh",
        "echo loading\nsh -c 'kill -KILL $$'\nstatus=$?\necho \"rsql ended with $status\"\nexit $status",
    );
    let agent = world.agent(|_| {});
    let sm = state_machine(&world, 30).await;
    let exec = start(&world, &sm, "oom_1", "oom.sh", 60).await;
    let out = world.wait_execution(&exec).await;
    let (error, cause) = moto::caught_error(&out);
    assert_eq!(error, "Rsql.Killed", "{cause} {}", agent.log());
    assert_eq!(cause["exit_code"], 137, "{cause}");
    assert_eq!(cause["signal"], "SIGKILL", "{cause}");
    assert!(
        cause["message"].as_str().unwrap().contains("OOM"),
        "{cause}"
    );
    let item = world.wait_audit("oom.sh", "oom_1", "failed").await;
    assert!(
        s(&item, "error_message").contains("Rsql.Killed"),
        "{item:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn job_over_its_timeout_ends_as_rsql_timeout_with_nothing_left() {
    let world = world().await;
    let pids = world.scripts.join("pids");
    write_script(
        &world.scripts,
        "slow.sh",
        &format!("sleep 300 &\necho \"$$ $!\" > {}\nwait", pids.display()),
    );
    let agent = world.agent(|_| {});
    let sm = state_machine(&world, 30).await;
    let exec = start(&world, &sm, "to_1", "slow.sh", 2).await;
    let out = world.wait_execution(&exec).await;
    let (error, cause) = moto::caught_error(&out);
    assert_eq!(error, "Rsql.Timeout", "{}", agent.log());
    assert!(cause["message"].as_str().unwrap().contains("2s"), "{cause}");
    let text = std::fs::read_to_string(&pids).unwrap();
    for pid in text.split_whitespace() {
        let pid: i32 = pid.parse().unwrap();
        assert!(!process_alive(pid), "process {pid} of the job survived");
    }
    world.wait_audit("slow.sh", "to_1", "failed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_keep_a_long_job_alive() {
    let world = world().await;
    // 4 x HeartbeatSeconds: without heartbeats the task would time out.
    write_script(&world.scripts, "long.sh", "sleep 12\necho done");
    let agent = world.agent(|_| {});
    let sm = state_machine(&world, 3).await;
    let exec = start(&world, &sm, "hb_1", "long.sh", 60).await;
    let out = world.wait_execution(&exec).await;
    assert_eq!(
        *out.status(),
        ExecutionStatus::Succeeded,
        "{:?} {}",
        out.output(),
        agent.log()
    );
    assert!(
        moto::execution_output(&out).get("error").is_none(),
        "{:?}",
        out.output()
    );
    assert!(
        moto::execution_output(&out)["duration_ms"]
            .as_u64()
            .unwrap()
            >= 12000
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_execution_kills_the_job_and_audits_cancelled() {
    let world = world().await;
    let pids = world.scripts.join("pids");
    write_script(
        &world.scripts,
        "forever.sh",
        &format!(
            "trap '' TERM\nsleep 300 &\necho \"$$ $!\" > {}\nwait",
            pids.display()
        ),
    );
    let mut config = world.config();
    config.kill_grace = "2s".into();
    let agent = Agent::start(config, &world.moto.endpoint());
    let sm = state_machine(&world, 3).await;
    let exec = start(&world, &sm, "stop_1", "forever.sh", 600).await;
    wait_until("the job to start", WAIT, || {
        pids.exists()
            && std::fs::read_to_string(&pids)
                .map(|t| t.split_whitespace().count() == 2)
                .unwrap_or(false)
    });
    aws_sdk_sfn::Client::new(&world.sdk)
        .stop_execution()
        .execution_arn(&exec)
        .send()
        .await
        .unwrap();
    let stopped = Instant::now();
    let text = std::fs::read_to_string(&pids).unwrap();
    let pids: Vec<i32> = text
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    // One heartbeat interval (1s for HeartbeatSeconds 3) plus kill_grace (2s), and slack
    // for a loaded machine.
    wait_until(
        "the job's processes to be gone",
        Duration::from_secs(10),
        || pids.iter().all(|p| !process_alive(*p)),
    );
    assert!(stopped.elapsed() < Duration::from_secs(10));
    world.wait_audit("forever.sh", "stop_1", "cancelled").await;
    world.wait_queue((0, 0), WAIT).await;
    assert!(agent.log().contains("closed upstream"), "{}", agent.log());
}

/// Builds a broken message body around a task token.
type BodyFor = Box<dyn Fn(&str) -> String>;

#[tokio::test(flavor = "multi_thread")]
async fn bad_messages_with_a_token_fail_as_invalid_job_and_the_agent_keeps_running() {
    let world = world().await;
    // The state machine sends its messages to a queue of the test's own; the test takes the
    // token from there and sends the agent a broken message carrying it.
    let capture = moto::create_queue(&world.sdk, &moto::unique_name("capture")).await;
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("bad"),
        &definition(&capture, 60),
    )
    .await;
    let mut agent = world.agent(|_| {});
    let sqs = aws_sdk_sqs::Client::new(&world.sdk);
    let cases: Vec<(&str, BodyFor, &str)> = vec![
        (
            "bad JSON",
            Box::new(|t: &str| {
                format!(r#"{{"task_token": "{t}", "job_name": "rsql_blog_script_1.sh", oops"#)
            }),
            "not valid JSON",
        ),
        (
            "missing job_name",
            Box::new(|t: &str| {
                json!({"task_token": t, "workflow_id": "w", "workflow_execution_id": "e"})
                    .to_string()
            }),
            "job_name",
        ),
        (
            "path escape",
            Box::new(|t: &str| {
                json!({"task_token": t, "workflow_id": "w", "workflow_execution_id": "e", "job_name": "../../etc/passwd"}).to_string()
            }),
            "outside the script directory",
        ),
        (
            "unknown script",
            Box::new(|t: &str| {
                json!({"task_token": t, "workflow_id": "w", "workflow_execution_id": "e", "job_name": "nope.sh"}).to_string()
            }),
            "no such script",
        ),
        (
            "wrong type",
            Box::new(|t: &str| {
                json!({"task_token": t, "workflow_id": "w", "workflow_execution_id": "e", "job_name": "rsql_blog_script_1.sh", "timeout_seconds": "soon"}).to_string()
            }),
            "timeout_seconds",
        ),
    ];
    for (i, (what, body, needle)) in cases.iter().enumerate() {
        let exec = start(
            &world,
            &sm,
            &format!("bad_{i}"),
            "rsql_blog_script_1.sh",
            60,
        )
        .await;
        let message = moto::receive_one(&world.sdk, &capture, WAIT).await;
        let sent: Value = serde_json::from_str(message.body().unwrap()).unwrap();
        let token = sent["task_token"].as_str().unwrap();
        sqs.send_message()
            .queue_url(&world.queue_url)
            .message_body(body(token))
            .send()
            .await
            .unwrap();
        let out = world.wait_execution(&exec).await;
        let (error, cause) = moto::caught_error(&out);
        assert_eq!(error, "Rsql.InvalidJob", "{what}: {}", agent.log());
        // The log names the task by a short hash, never by the token itself.
        let log = agent.log();
        assert!(
            !log.contains(token),
            "{what}: the full task token is in the agent's log"
        );
        assert!(
            log.contains(&rsql_agent::lock::token_hash(token)),
            "{what}: no token hash in the log"
        );
        let message = cause["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{what}: cause {cause}");
        assert!(
            agent.is_running(),
            "{what}: the agent died:\n{}",
            agent.log()
        );
    }
    // A message with no token at all is logged and dropped, and the agent goes on.
    sqs.send_message()
        .queue_url(&world.queue_url)
        .message_body("not even json")
        .send()
        .await
        .unwrap();
    agent.wait_for_log("no usable task token", WAIT);
    world.wait_queue((0, 0), WAIT).await;
    assert!(agent.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn outage_during_a_job_loses_nothing_and_reports_once() {
    let world = world().await;
    write_script(&world.scripts, "short.sh", "echo start\nsleep 3\necho end");
    let proxy = Proxy::start(world.moto.addr());
    let mut config = world.config();
    config.visibility_timeout = "20s".into();
    let agent = Agent::start(config, &proxy.url());
    let sm = state_machine(&world, 120).await;
    let exec = start(&world, &sm, "out_1", "short.sh", 120).await;
    agent.wait_for_log("job started", WAIT);
    proxy.cut();
    // The job ends during the outage; keep the outage for 20 s past its end.
    agent.wait_for_log("job finished", WAIT);
    let cut_until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < cut_until {
        assert_ne!(
            *aws_sdk_sfn::Client::new(&world.sdk)
                .describe_execution()
                .execution_arn(&exec)
                .send()
                .await
                .unwrap()
                .status(),
            ExecutionStatus::Succeeded,
            "a callback got through a cut proxy"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        agent.pending_callbacks(),
        1,
        "the outcome must wait in the outbox"
    );
    // It waits there because its delivery was tried and failed, not because none was tried.
    wait_until("a failed attempt to deliver the outcome", WAIT, || {
        agent
            .outbox_entries()
            .iter()
            .any(|e| e["attempts"].as_u64().is_some_and(|n| n >= 1))
    });
    assert_eq!(agent.pending_callbacks(), 1);
    proxy.restore();
    let out = world.wait_execution(&exec).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    world.wait_audit("short.sh", "out_1", "completed").await;
    world.wait_queue((0, 0), WAIT).await;
    wait_until("the outbox to empty", WAIT, || agent.outbox_len() == 0);
    assert_eq!(
        moto::count_events(&world.sdk, &exec, HistoryEventType::TaskSucceeded).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn outcome_survives_an_agent_killed_before_its_callback() {
    let world = world().await;
    // Long enough for the test to cut the network before the job ends.
    write_script(&world.scripts, "quick.sh", "sleep 2\necho quick");
    let proxy = Proxy::start(world.moto.addr());
    let mut agent = Agent::start(world.config(), &proxy.url());
    let sm = state_machine(&world, 120).await;
    let exec = start(&world, &sm, "kill_1", "quick.sh", 60).await;
    agent.wait_for_log("job started", WAIT);
    proxy.cut();
    agent.wait_for_log("job finished", WAIT);
    // The callback waits in the outbox (the `running` audit write may wait there too).
    wait_until("the outcome in the outbox", WAIT, || {
        agent.pending_callbacks() == 1
    });
    agent.kill();
    // Nothing got out before the kill: the task is still waiting for its callback.
    let status = aws_sdk_sfn::Client::new(&world.sdk)
        .describe_execution()
        .execution_arn(&exec)
        .send()
        .await
        .unwrap();
    assert_eq!(*status.status(), ExecutionStatus::Running);
    proxy.restore();
    agent.restart();
    let out = world.wait_execution(&exec).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(moto::execution_output(&out)["job_name"], "quick.sh");
    world.wait_audit("quick.sh", "kill_1", "completed").await;
    assert_eq!(
        moto::count_events(&world.sdk, &exec, HistoryEventType::TaskSucceeded).await,
        1
    );
}

/// A redelivery that finds the job finished replays what the job recorded, even when it
/// reaches Step Functions before the runner's own callback: the workflow sees the job's
/// success, from the instance that ran it, once, and the job runs once.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivery_ahead_of_the_runners_callback_replays_its_success() {
    let world = world().await;
    let runs = world.scripts.join("runs");
    write_script(
        &world.scripts,
        "once.sh",
        &format!("echo run >> {}\nsleep 2\necho once", runs.display()),
    );
    let locks = tempfile::tempdir().expect("lock dir");
    let config = |instance: &str| {
        let mut config = world.config();
        config.instance_id = instance.into();
        config.lock_dir = Some(locks.path().to_path_buf());
        config.visibility_timeout = "10s".into();
        config
    };
    let proxy = Proxy::start(world.moto.addr());
    let runner = Agent::start(config("i-0runner"), &proxy.url());
    let sm = state_machine(&world, 120).await;
    let exec = start(&world, &sm, "replay_1", "once.sh", 60).await;
    runner.wait_for_log("job started", WAIT);
    // The runner finishes cut off: its callback waits in its outbox, and the message it
    // could not delete comes back, to another agent.
    proxy.cut();
    runner.wait_for_log("job finished", WAIT);
    wait_until("the outcome in the outbox", WAIT, || {
        runner.pending_callbacks() == 1
    });
    let other = Agent::start(config("i-0other"), &world.moto.endpoint());
    let out = world.wait_execution(&exec).await;
    assert_eq!(
        *out.status(),
        ExecutionStatus::Succeeded,
        "{}\n{}",
        runner.log(),
        other.log()
    );
    let output = moto::execution_output(&out);
    assert!(output.get("error").is_none(), "{output}");
    assert_eq!(output["status"], "completed", "{output}");
    assert_eq!(output["instance_id"], "i-0runner", "{output}");
    assert_eq!(output["job_name"], "once.sh", "{output}");
    assert!(
        other.log().contains("replaying its recorded outcome"),
        "{}",
        other.log()
    );
    assert_eq!(
        runner.pending_callbacks(),
        1,
        "the runner's callback got out"
    );

    // Back online, the runner's own callback finds the task closed and is dropped.
    proxy.restore();
    wait_until("the runner's outbox to empty", WAIT, || {
        runner.pending_callbacks() == 0
    });
    world.wait_queue((0, 0), WAIT).await;
    let runs = std::fs::read_to_string(&runs).expect("the job ran");
    assert_eq!(runs.lines().count(), 1, "the job ran more than once");
    assert_eq!(
        moto::count_events(&world.sdk, &exec, HistoryEventType::TaskSucceeded).await,
        1
    );
    assert_eq!(
        moto::count_events(&world.sdk, &exec, HistoryEventType::TaskFailed).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_feeds_the_connection_and_never_reaches_a_log() {
    // The sync PostgreSQL client runs its own runtime: keep it off this one's threads.
    let pg = tokio::task::block_in_place(TestPg::start);
    let world = world().await;
    let secret_id = moto::unique_name("redshift-etl");
    aws_sdk_secretsmanager::Client::new(&world.sdk)
        .create_secret()
        .name(&secret_id)
        .secret_string(
            json!({
                "username": pg.user(), "password": pg.password(), "host": pg.host(),
                "port": pg.port(), "dbname": pg.database(), "engine": "redshift"
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let mut config = world.config();
    config.extra = format!("[database]\nsecret_id = \"{secret_id}\"\n");
    let agent = Agent::start(config, &world.moto.endpoint());
    let sm = state_machine(&world, 30).await;
    let exec = start(&world, &sm, "sec_1", "rsql_blog_script_1.sh", 120).await;
    let out = world.wait_execution(&exec).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(
        tokio::task::block_in_place(|| pg.query_i64(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'rsql_blog'"
        )),
        1
    );
    let item = world
        .wait_audit("rsql_blog_script_1.sh", "sec_1", "completed")
        .await;

    let password = pg.password();
    let log = agent.log();
    assert!(log.contains("job finished"), "{log}");
    assert!(
        !log.contains(password),
        "the password is in the agent's log"
    );
    assert!(
        !format!("{item:?}").contains(password),
        "the password is in the audit"
    );
    assert!(!out.output().unwrap_or_default().contains(password));
    for record in agent.local_audit() {
        assert!(!record.to_string().contains(password));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_timed_out_while_its_message_waited_for_a_slot_never_runs_its_job() {
    let world = world().await;
    let marks = tempfile::tempdir().unwrap();
    let ran = marks.path().join("ran");
    write_script(&world.scripts, "hold.sh", "sleep 8");
    write_script(
        &world.scripts,
        "late.sh",
        &format!("echo ran > '{}'", ran.display()),
    );
    let mut config = world.config();
    config.max_concurrent_jobs = 1;
    let agent = Agent::start(config, &world.moto.endpoint());
    let hold = start(
        &world,
        &state_machine(&world, 30).await,
        "hold_1",
        "hold.sh",
        120,
    )
    .await;
    agent.wait_for_log("job started", WAIT);
    // The only slot is taken: the second job's message waits in the queue, nobody can
    // heartbeat it, and its task's 3 s heartbeat timeout closes the task meanwhile.
    let late = start(
        &world,
        &state_machine(&world, 3).await,
        "late_1",
        "late.sh",
        120,
    )
    .await;
    let timed_out = world.wait_execution(&late).await;
    let output = moto::execution_output(&timed_out);
    assert_eq!(
        output["error"]["Error"],
        "States.Timeout",
        "{output}\n{}",
        agent.log()
    );
    assert_eq!(world.queue_depth().await, (1, 1), "{}", agent.log());
    let out = world.wait_execution(&hold).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    // Once the slot frees, the agent takes the message, asks Step Functions, finds the task
    // closed and deletes the message: the job never starts.
    agent.wait_for_log("deleted this message without running the job", WAIT);
    world.wait_queue((0, 0), WAIT).await;
    assert!(!ran.exists(), "the closed task's job ran:\n{}", agent.log());
    assert_eq!(
        agent.log().matches("job started").count(),
        1,
        "{}",
        agent.log()
    );
    // Its owner was started while the task was checked (dispatch overlaps the two), and
    // withdrawn: it exited having run nothing, and its directory and log file are gone.
    agent.wait_for_log(
        "withdrew the owner started while the task was checked",
        WAIT,
    );
    let owners = agent.state_dir.join("owners");
    let mut left = Vec::new();
    for _ in 0..100 {
        left = owner_processes_under(&owners);
        if left.is_empty() && std::fs::read_dir(&owners).map_or(0, |d| d.count()) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(left.is_empty(), "owner processes left: {left:?}");
    assert_eq!(
        std::fs::read_dir(&owners).map_or(0, |d| d.count()),
        0,
        "an owner directory is left in {}",
        owners.display()
    );
    let logs = rsql_agent_tests::agent::files_under(&agent.state_dir.join("jobs"));
    assert!(
        !logs.iter().any(|p| p.to_string_lossy().contains("late.sh")),
        "the withdrawn job left a log file: {logs:?}"
    );
}

/// The live `rsql-job-owner` processes whose command line names a directory under `dir`.
fn owner_processes_under(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmd| cmd.contains("rsql-job-owner") && cmd.contains(&needle))
        .collect()
}
