//! Fleet safety end to end: several real `rsql-agent run` processes on one queue and one lock
//! directory, the moto emulator with executing state machines, and a real PostgreSQL that the
//! jobs write to.
//!
//! - duplicates: every message delivered twice, each job still runs once and each task gets
//!   one outcome;
//! - crashes: agents SIGKILLed at random while a Map of jobs runs; every item succeeds, no
//!   two runs of one job overlap, and no job process outlives its agent;
//! - SIGTERM: intake stops at once and the running jobs are handed off to their owners (the
//!   next agent adopts them); a second SIGTERM exits at once and loses no outcome;
//! - start-up after a crash: a `running` state file whose owner is dead is reported
//!   `Rsql.Interrupted`, or rerun with `on_interrupted = "rerun"`;
//! - systemd: READY, STATUS, WATCHDOG, (a SIGHUP reload,) STOPPING, in that order.
//!
//! Why one file of about 900 lines: each scenario above is one test on the shared fixture at
//! the top (agents, queue, lock directory, PostgreSQL); the fixture is what they have in common.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use nix::sys::signal::Signal;
use rsql_agent_tests::agent::{process_alive, wait_until, write_script, Agent};
use rsql_agent_tests::moto;
use rsql_agent_tests::pg::TestPg;
use rsql_agent_tests::proxy::Proxy;
use rsql_agent_tests::world::{eventually_with, World, WAIT};
use serde_json::{json, Value};

/// A waitForTaskToken task that sends the job message to `queue_url`; errors are caught into
/// `$.error` unless `retry` is given, in which case the listed errors are retried (20 times,
/// a second apart) and nothing is caught.
fn job_task<'a>(queue_url: &'a str, heartbeat: u64, retry: Option<&[&str]>) -> moto::JobTask<'a> {
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": "fleet_test",
        "workflow_execution_id.$": "$.execution_id",
        "job_name.$": "$.job_name",
        "args.$": "$.args",
        "timeout_seconds": 300,
        "heartbeat_seconds": heartbeat
    });
    let mut task = moto::JobTask {
        timeout_seconds: 600,
        ..moto::JobTask::new(queue_url, body, heartbeat)
    };
    if let Some(errors) = retry {
        task.catch = false;
        task.retry = Some(moto::Retrier {
            errors: errors.iter().map(|e| e.to_string()).collect(),
            interval_seconds: 1,
            max_attempts: 20,
            backoff_rate: Some(1.0),
        });
    }
    task
}

fn task_state(queue_url: &str, heartbeat: u64, retry: Option<&[&str]>) -> Value {
    job_task(queue_url, heartbeat, retry).state()
}

fn single_task(queue_url: &str, heartbeat: u64) -> String {
    job_task(queue_url, heartbeat, None).definition()
}

/// moto, the job queue and an empty script directory.
async fn world() -> World {
    World::builder("jobs").build().await
}

async fn start(world: &World, sm: &str, execution_id: &str, job: &str, args: &[&str]) -> String {
    let input = json!({"execution_id": execution_id, "job_name": job, "args": args});
    moto::start_execution(&world.sdk, sm, &input.to_string()).await
}

fn count_in(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Whether `pid` is alive and still a process of the job `job_id` (not a reused pid).
fn job_process_alive(pid: i32, job_id: &str) -> bool {
    if !process_alive(pid) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => {
            let marker = format!("RSQL_AGENT_JOB_ID={job_id}");
            env.split(|b| *b == 0).any(|v| v == marker.as_bytes())
        }
        // Gone between the two reads, or not ours to read: not the job's.
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL: the rows the jobs write.

/// A job that records its run in PostgreSQL: a row at start (job, attempt id, its pid, the
/// pid of its `sleep` child, its agent), the end time when it finishes or is stopped with
/// SIGTERM. Arguments: job name, seconds of work.
const RECORDING_JOB: &str = r#"set -u
job="$1"
sleep "$2" &
child=$!
sql() {
  rsql -h "$RSQL_HOST" -p "$RSQL_PORT" -U "$RSQL_USER" -d "$RSQL_DB" <<RSQL
$1
\if :ERROR <> 0
  \exit 3
\endif
RSQL
}
finish() {
  sql "UPDATE runs SET ended_at = clock_timestamp(), ending = '$1' WHERE job_id = '$RSQL_AGENT_JOB_ID' AND pid = $$;"
}
trap 'kill $child 2>/dev/null; finish sigterm; exit 143' TERM
sql "INSERT INTO runs (job, job_id, pid, child_pid, agent, started_at) VALUES ('$job', '$RSQL_AGENT_JOB_ID', $$, $child, '${RSQL_AGENT_SUPERVISOR%%:*}', clock_timestamp());" || exit 3
wait $child
finish done
"#;

fn create_runs_table(pg: &TestPg) {
    pg.client()
        .batch_execute(
            "CREATE TABLE runs (job text NOT NULL, job_id text NOT NULL, pid int NOT NULL, \
             child_pid int NOT NULL, agent int NOT NULL, started_at timestamptz NOT NULL, \
             ended_at timestamptz, ending text)",
        )
        .expect("create table runs");
}

#[derive(Debug, Clone)]
struct Run {
    job: String,
    job_id: String,
    pid: i32,
    child_pid: i32,
    agent: i32,
    started_ms: i64,
    ended_ms: Option<i64>,
    ending: Option<String>,
}

fn runs(client: &mut postgres::Client) -> Vec<Run> {
    client
        .query(
            "SELECT job, job_id, pid, child_pid, agent, \
             (extract(epoch FROM started_at) * 1000)::bigint, \
             (extract(epoch FROM ended_at) * 1000)::bigint, ending FROM runs ORDER BY started_at",
            &[],
        )
        .expect("select runs")
        .iter()
        .map(|r| Run {
            job: r.get(0),
            job_id: r.get(1),
            pid: r.get(2),
            child_pid: r.get(3),
            agent: r.get(4),
            started_ms: r.get(5),
            ended_ms: r.get(6),
            ending: r.get(7),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Duplicates

#[tokio::test(flavor = "multi_thread")]
async fn every_message_twice_to_three_agents_runs_each_job_once() {
    let pg = tokio::task::block_in_place(TestPg::start);
    tokio::task::block_in_place(|| create_runs_table(&pg));
    let world = world().await;
    write_script(&world.scripts, "record.sh", RECORDING_JOB);
    // The state machine hands its messages to a queue of the test's own; the test delivers
    // each of them twice to the agents' queue, as SQS's at-least-once delivery may.
    let capture = moto::create_queue(&world.sdk, &moto::unique_name("capture")).await;
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("dup"),
        &single_task(&capture, 60),
    )
    .await;
    let locks = tempfile::tempdir().expect("lock dir");
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let mut config = world.config().database(&pg);
            config.instance_id = format!("i-dup{i}");
            config.lock_dir = Some(locks.path().to_path_buf());
            config.visibility_timeout = "10s".into();
            Agent::start(config, &world.moto.endpoint())
        })
        .collect();

    const JOBS: usize = 40;
    let mut executions = Vec::new();
    for i in 0..JOBS {
        let job = format!("dup_{i}");
        executions.push((
            job.clone(),
            start(&world, &sm, &job, "record.sh", &[&job, "1"]).await,
        ));
    }
    let sqs = aws_sdk_sqs::Client::new(&world.sdk);
    let mut bodies = Vec::new();
    let deadline = Instant::now() + WAIT;
    while bodies.len() < JOBS {
        assert!(
            Instant::now() < deadline,
            "only {} of {JOBS} messages reached the capture queue",
            bodies.len()
        );
        let out = sqs
            .receive_message()
            .queue_url(&capture)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive from capture");
        for message in out.messages.unwrap_or_default() {
            bodies.push(message.body().expect("body").to_string());
            sqs.delete_message()
                .queue_url(&capture)
                .receipt_handle(message.receipt_handle().expect("handle"))
                .send()
                .await
                .expect("delete from capture");
        }
    }
    // Half the copies side by side (two agents likely take them at once), half far apart
    // (the second finds the job finished).
    let (near, far): (Vec<_>, Vec<_>) = bodies.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let mut order: Vec<&String> = Vec::new();
    for (_, body) in &near {
        order.push(body);
        order.push(body);
    }
    order.extend(far.iter().map(|(_, b)| *b));
    order.extend(far.iter().map(|(_, b)| *b));
    for body in order {
        sqs.send_message()
            .queue_url(&world.queue_url)
            .message_body(body)
            .send()
            .await
            .expect("send a copy");
    }

    for (job, exec) in &executions {
        let out = moto::wait_execution(&world.sdk, exec, WAIT).await;
        assert_eq!(
            *out.status(),
            ExecutionStatus::Succeeded,
            "{job}: {:?}",
            out.output()
        );
        let output = moto::execution_output(&out);
        assert!(output.get("error").is_none(), "{job}: {output}");
    }
    // Every copy is dealt with: the duplicates come back after the visibility timeout, find
    // the job finished and replay its outcome, which Step Functions no longer takes.
    world.wait_queue((0, 0), WAIT).await;

    let rows = tokio::task::block_in_place(|| runs(&mut pg.client()));
    let mut per_job: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &rows {
        *per_job.entry(row.job.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = per_job.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "jobs that did not run exactly once: {twice:?}"
    );
    assert_eq!(per_job.len(), JOBS, "jobs with a row: {per_job:?}");
    for (job, exec) in &executions {
        assert_eq!(
            moto::count_events(&world.sdk, exec, HistoryEventType::TaskSucceeded).await,
            1,
            "{job}: not exactly one TaskSucceeded"
        );
        assert_eq!(
            moto::count_events(&world.sdk, exec, HistoryEventType::TaskFailed).await,
            0,
            "{job}: a TaskFailed"
        );
    }
    let logs: String = agents.iter().map(Agent::log).collect();
    println!(
        "duplicates: {} rows for {JOBS} jobs; copies left to their runner: {}, outcomes replayed: {}, stale copies dropped: {}",
        rows.len(),
        count_in(&logs, "job is running elsewhere"),
        count_in(&logs, "replaying its recorded outcome"),
        count_in(&logs, "deleting this stale copy"),
    );
}

// ---------------------------------------------------------------------------------------
// Crashes

/// What the chaos loop saw when it killed an agent.
#[derive(Debug, Clone)]
struct Kill {
    agent_pid: i32,
    at_ms: i64,
    /// job_id -> when all its recorded processes were seen gone.
    gone_ms: HashMap<String, i64>,
    /// The longest any job process lived on after the kill.
    longest: Duration,
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_killed_at_random_lose_no_job_and_never_overlap_a_run() {
    let pg = tokio::task::block_in_place(TestPg::start);
    tokio::task::block_in_place(|| create_runs_table(&pg));
    let world = world().await;
    write_script(&world.scripts, "record.sh", RECORDING_JOB);
    const JOBS: usize = 60;
    const HEARTBEAT: u64 = 5;
    let kill_grace = Duration::from_secs(5);
    let definition = json!({
        "StartAt": "Jobs",
        "States": {
            "Jobs": {
                "Type": "Map",
                "ItemsPath": "$.items",
                "MaxConcurrency": 12,
                "Iterator": {
                    "StartAt": "Job",
                    "States": {
                        "Job": task_state(&world.queue_url, HEARTBEAT, Some(&["Rsql.Interrupted", "States.Timeout"]))
                    }
                },
                "End": true
            }
        }
    });
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("crash"),
        &definition.to_string(),
    )
    .await;
    let locks = tempfile::tempdir().expect("lock dir");
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let mut config = world.config().database(&pg);
            config.instance_id = format!("i-crash{i}");
            config.lock_dir = Some(locks.path().to_path_buf());
            config.kill_grace = format!("{}s", kill_grace.as_secs());
            Agent::start(config, &world.moto.endpoint())
        })
        .collect();
    for agent in &agents {
        agent.wait_for_log("receiving jobs", WAIT);
    }
    let agents = Arc::new(Mutex::new(agents));
    let nonce = now_ms();
    let items: Vec<Value> = (0..JOBS)
        .map(|i| {
            let job = format!("crash_{i}");
            json!({"execution_id": format!("{job}_{nonce}"), "job_name": "record.sh", "args": [job, "2"]})
        })
        .collect();
    let exec = moto::start_execution(&world.sdk, &sm, &json!({ "items": items }).to_string()).await;

    // The chaos loop: every 2-4 s, SIGKILL a random agent, start it again at once, and
    // check that the processes of the jobs it was running are gone.
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (agents, stop) = (agents.clone(), stop.clone());
        let mut client = tokio::task::block_in_place(|| pg.client());
        std::thread::spawn(move || {
            let mut seed = (now_ms() as u64) | 1;
            println!("chaos seed {seed}");
            let mut rand = move |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            let mut kills = Vec::new();
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
                let pause = Instant::now() + Duration::from_millis(2000 + rand(2000));
                while Instant::now() < pause && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut agents = agents.lock().unwrap_or_else(|e| e.into_inner());
                let agent = &mut agents[rand(3) as usize];
                let starts = count_in(&agent.log(), "rsql-agent started");
                let agent_pid = agent.pid() as i32;
                let at_ms = now_ms();
                let killed = Instant::now();
                agent.kill();
                agent.restart();
                // The new process kills what the dead one's jobs left behind, before it
                // says it started; from then on no row of the dead agent can appear.
                let deadline = Instant::now() + Duration::from_secs(30);
                while count_in(&agent.log(), "rsql-agent started") <= starts {
                    assert!(
                        Instant::now() < deadline,
                        "agent did not restart:\n{}",
                        agent.log()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                drop(agents);
                let orphans: Vec<Run> = runs(&mut client)
                    .into_iter()
                    .filter(|r| r.agent == agent_pid && r.ended_ms.is_none())
                    .collect();
                let mut gone_ms = HashMap::new();
                let mut longest = Duration::ZERO;
                for run in &orphans {
                    let deadline = killed + kill_grace + Duration::from_secs(10);
                    while job_process_alive(run.pid, &run.job_id)
                        || job_process_alive(run.child_pid, &run.job_id)
                    {
                        assert!(
                            Instant::now() < deadline,
                            "job {} (pids {} {}) outlived its agent by 10 s more than kill_grace",
                            run.job,
                            run.pid,
                            run.child_pid
                        );
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    longest = longest.max(killed.elapsed());
                    gone_ms.insert(run.job_id.clone(), now_ms());
                }
                kills.push(Kill {
                    agent_pid,
                    at_ms,
                    gone_ms,
                    longest,
                });
            }
            kills
        })
    };

    let out = moto::wait_execution(&world.sdk, &exec, Duration::from_secs(150)).await;
    stop.store(true, Ordering::SeqCst);
    let kills = tokio::task::block_in_place(|| chaos.join()).expect("chaos loop panicked");
    let logs: String = agents
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(Agent::log)
        .collect();
    assert_eq!(
        *out.status(),
        ExecutionStatus::Succeeded,
        "{:?}\n{}",
        out.cause(),
        moto::format_history(&moto::execution_history(&world.sdk, &exec).await)
    );
    let output = moto::execution_output(&out);
    let results = output.as_array().expect("Map output is an array");
    assert_eq!(results.len(), JOBS);
    for result in results {
        assert_eq!(result["status"], "completed", "{result}");
    }
    assert!(
        kills.len() >= 3,
        "the chaos loop killed only {} agents",
        kills.len()
    );

    // No job process outlived its agent for longer than kill_grace.
    for kill in &kills {
        assert!(
            kill.longest <= kill_grace,
            "a job process of agent {} lived {:?} after it was killed (kill_grace {kill_grace:?})",
            kill.agent_pid,
            kill.longest
        );
    }

    // No two runs of one job overlap. A run killed with its agent has no end in its row;
    // it ended when the chaos loop saw its processes gone.
    let rows = tokio::task::block_in_place(|| runs(&mut pg.client()));
    let killed_end: HashMap<&str, i64> = kills
        .iter()
        .flat_map(|k| k.gone_ms.iter().map(|(id, at)| (id.as_str(), *at)))
        .collect();
    let killed_agents: HashSet<i32> = kills.iter().map(|k| k.agent_pid).collect();
    let mut per_job: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for row in &rows {
        per_job.entry(row.job.as_str()).or_default().push(row);
    }
    assert_eq!(per_job.len(), JOBS, "jobs that never ran");
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for (job, runs) in &per_job {
        assert!(
            runs.iter().any(|r| r.ending.as_deref() == Some("done")),
            "{job} never finished a run: {runs:?}"
        );
        for pair in runs.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            let end = earlier
                .ended_ms
                .or_else(|| killed_end.get(earlier.job_id.as_str()).copied())
                .unwrap_or_else(|| {
                    panic!("{job}: run {earlier:?} never ended and its agent was not killed")
                });
            assert!(
                end <= later.started_ms,
                "{job}: runs overlap: {earlier:?} (ended {end}) and {later:?}"
            );
            let reason = match (
                earlier.ending.as_deref(),
                killed_agents.contains(&earlier.agent),
            ) {
                (None, true) => "its agent was SIGKILLed while it ran",
                (Some("done"), true) => {
                    "it finished, but its agent was SIGKILLed before the task heard of it"
                }
                (Some("sigterm"), _) => "the agent stopped it (the task was closed upstream)",
                _ => "other",
            };
            *reasons.entry(reason.to_string()).or_default() += 1;
        }
    }
    let history = moto::execution_history(&world.sdk, &exec).await;
    let timed_out = history
        .iter()
        .filter(|e| *e.r#type() == HistoryEventType::TaskTimedOut)
        .count();
    let interrupted = history
        .iter()
        .filter(|e| {
            *e.r#type() == HistoryEventType::TaskFailed
                && e.task_failed_event_details()
                    .and_then(|d| d.error())
                    .is_some_and(|err| err == "Rsql.Interrupted")
        })
        .count();
    let reruns: usize = reasons.values().sum();
    println!(
        "crashes: {} agents killed; {JOBS} jobs, {} runs, {reruns} jobs ran again: {reasons:?}; \
         tasks timed out (States.Timeout): {timed_out}, failed Rsql.Interrupted: {interrupted}; \
         stale copies dropped: {}; longest a job process outlived its agent: {:?}",
        kills.len(),
        rows.len(),
        count_in(&logs, "deleting this stale copy"),
        kills.iter().map(|k| k.longest).max().unwrap_or_default(),
    );
    let first_kill = kills.iter().map(|k| k.at_ms).min().unwrap_or_default();
    assert!(first_kill > 0);
}

// ---------------------------------------------------------------------------------------
// Drain

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_the_jobs_off_and_takes_no_new_message() {
    let world = world().await;
    write_script(&world.scripts, "short.sh", "sleep 4\necho done");
    let proxy = Proxy::start_recording(world.moto.addr());
    let mut config = world.config();
    // Free slots left over: a daemon that kept its intake open would keep polling.
    config.max_concurrent_jobs = 4;
    let mut agent = Agent::start(config, &proxy.url());
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("drain"),
        &single_task(&world.queue_url, 60),
    )
    .await;
    let a = start(&world, &sm, "drain_a", "short.sh", &[]).await;
    let b = start(&world, &sm, "drain_b", "short.sh", &[]).await;
    let agent_ref = &agent;
    eventually_with("both jobs to start", WAIT, || async move {
        let log = agent_ref.log();
        let started = log
            .lines()
            .filter(|l| l.contains("job started") && l.contains("rsql_agent::daemon"))
            .count();
        if started >= 2 {
            Ok(())
        } else {
            Err(format!("agent log:\n{log}"))
        }
    })
    .await;
    let signalled = SystemTime::now();
    agent.signal(Signal::SIGTERM);
    // A message that arrives after the signal must stay in the queue.
    aws_sdk_sqs::Client::new(&world.sdk)
        .send_message()
        .queue_url(&world.queue_url)
        .message_body(r#"{"task_token":"after-the-signal","workflow_id":"w","workflow_execution_id":"late","job_name":"short.sh"}"#)
        .send()
        .await
        .expect("send the late message");
    // A hand-off: the agent is gone within 5 s, before the 4 s jobs could end.
    let status = agent.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("shutting down: intake stopped"), "{log}");
    // Intake stopped at the signal: no ReceiveMessage went out after it (a request already
    // on its way when the signal came may arrive a moment later).
    let late: Vec<_> = proxy
        .requests_for("ReceiveMessage")
        .into_iter()
        .filter(|r| r.at > signalled + Duration::from_millis(500))
        .map(|r| r.at)
        .collect();
    assert!(
        late.is_empty(),
        "ReceiveMessage after the signal at {signalled:?}: {late:?}\n{}",
        agent.log()
    );
    // The late message waits; the two handed-off jobs' messages are still in flight.
    world.wait_queue((1, 2), Duration::from_secs(10)).await;
    // The next agent adopts both jobs and reports them.
    agent.restart();
    for exec in [&a, &b] {
        let out = moto::wait_execution(&world.sdk, exec, WAIT).await;
        assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
        assert_eq!(
            moto::execution_output(&out)["status"],
            "completed",
            "{:?}",
            out.output()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_exits_at_once_and_loses_no_outcome() {
    let world = world().await;
    let go = world.scripts.join("go");
    write_script(
        &world.scripts,
        "quick.sh",
        &format!(
            "while [ ! -e {go} ]; do sleep 0.05; done\necho done",
            go = go.display()
        ),
    );
    // AWS is unreachable during the shutdown, so the outbox cannot deliver: the first
    // SIGTERM gives it a few seconds, the second ends the wait.
    let proxy = Proxy::start(world.moto.addr());
    let mut agent = Agent::start(world.config(), &proxy.url());
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("stuck"),
        &single_task(&world.queue_url, 60),
    )
    .await;
    agent.wait_for_log("receiving jobs", WAIT);
    let exec = start(&world, &sm, "stuck_1", "quick.sh", &[]).await;
    agent.wait_for_log("job started", WAIT);
    // Cut first, then let the job end: its outcome cannot be delivered.
    proxy.cut();
    std::fs::write(&go, "").expect("let the job end");
    wait_until("the outcome in the outbox", WAIT, || {
        agent.pending_callbacks() == 1
    });
    agent.signal(Signal::SIGTERM);
    agent.wait_for_log("shutting down: intake stopped", WAIT);
    assert!(
        agent.is_running(),
        "the agent should still be trying to deliver"
    );
    let second = Instant::now();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(2));
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", agent.log());
    assert!(second.elapsed() < Duration::from_secs(2));
    // Nothing is lost: the next start delivers what the outbox holds.
    assert_eq!(agent.pending_callbacks(), 1);
    proxy.restore();
    agent.restart();
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
}

// ---------------------------------------------------------------------------------------
// Start-up after a crash

/// Runs a job that blocks on its first run, SIGKILLs the agent mid-run, checks that the lock
/// directory holds a `running` record of the dead agent, and starts the agent again on the
/// same state and lock directories. Returns the agent, the execution and the runs file.
async fn crash_mid_run(world: &World, on_interrupted: Option<&str>) -> (Agent, String, PathBuf) {
    let runs_file = world.scripts.join("runs");
    let first = world.scripts.join("first");
    write_script(
        &world.scripts,
        "once.sh",
        &format!(
            "echo \"$RSQL_AGENT_JOB_ID\" >> {runs}\nif [ ! -e {first} ]; then touch {first}; sleep 300; fi\necho done",
            runs = runs_file.display(),
            first = first.display()
        ),
    );
    let mut config = world.config();
    // The dead agent's copy of the message comes back this soon.
    config.visibility_timeout = "10s".into();
    config.on_interrupted = on_interrupted.map(str::to_string);
    let mut agent = Agent::start(config, &world.moto.endpoint());
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("crash1"),
        &single_task(&world.queue_url, 120),
    )
    .await;
    let exec = start(world, &sm, "crashed_1", "once.sh", &[]).await;
    wait_until("the first run", WAIT, || first.exists());
    wait_until("the job's owner", WAIT, || {
        agent
            .owners()
            .first()
            .is_some_and(|o| o["job_pid"].is_u64())
    });
    // The whole host goes: the agent and the job's owner process (a job outlives its agent
    // alone).
    let dead_pid = agent.owners()[0]["pid"].as_i64().expect("owner pid");
    agent.kill();
    agent.kill_owners();
    let states: Vec<Value> = std::fs::read_dir(&agent.lock_dir)
        .expect("lock dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "state"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).expect("read")).expect("json"))
        .collect();
    assert_eq!(states.len(), 1, "{states:?}");
    assert_eq!(states[0]["state"], "running", "{}", states[0]);
    assert_eq!(states[0]["pid"], dead_pid, "{}", states[0]);
    wait_until("the owner to die", WAIT, || !process_alive(dead_pid as i32));
    agent.restart();
    (agent, exec, runs_file)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_after_a_crash_reports_the_dead_run_interrupted() {
    let world = world().await;
    let (agent, exec, runs_file) = crash_mid_run(&world, None).await;
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    let (error, cause) = moto::caught_error(&out);
    assert_eq!(error, "Rsql.Interrupted", "{}", agent.log());
    assert!(
        cause["message"]
            .as_str()
            .unwrap_or_default()
            .contains("owner process"),
        "{cause}"
    );
    assert_eq!(lines(&runs_file).len(), 1, "the job ran again");
    world.wait_queue((0, 0), WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_after_a_crash_reruns_the_job_when_configured() {
    let world = world().await;
    let (agent, exec, runs_file) = crash_mid_run(&world, Some("rerun")).await;
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(
        moto::execution_output(&out)["status"],
        "completed",
        "{:?}",
        out.output()
    );
    let runs = lines(&runs_file);
    assert_eq!(runs.len(), 2, "{runs:?}");
    // The job id ends in the attempt number: the rerun is attempt 2 of the same token.
    assert!(runs[0].ends_with('1') && runs[1].ends_with('2'), "{runs:?}");
    world.wait_queue((0, 0), WAIT).await;
}

// ---------------------------------------------------------------------------------------
// systemd notify (and a SIGHUP reload on the way)

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_status_watchdog_and_stopping_in_order() {
    let world = world().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind NOTIFY_SOCKET");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let listener = {
        let (messages, done) = (messages.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !done.load(Ordering::SeqCst) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    messages
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(text);
                }
            }
        })
    };
    let seen = |needle: &str| -> bool {
        messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|m| m.contains(needle))
    };
    let mut config = world.config();
    config.env = vec![
        (
            "NOTIFY_SOCKET".to_string(),
            socket_path.display().to_string(),
        ),
        // The watchdog wants a sign of life every 0.5 s.
        ("WATCHDOG_USEC".to_string(), "1000000".to_string()),
    ];
    let mut agent = Agent::start(config.clone(), &world.moto.endpoint());
    wait_until("READY=1 and a WATCHDOG=1", WAIT, || {
        seen("READY=1") && seen("WATCHDOG=1")
    });
    assert!(seen("STATUS=0 running, 4 free, 0 in outbox"));

    // SIGHUP: max_concurrent_jobs changes live; the queue settings need a restart.
    let mut changed = config.clone();
    changed.max_concurrent_jobs = 2;
    changed.wait_time = "2s".into();
    agent.rewrite_config(changed);
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log("SIGHUP: config reloaded", WAIT);
    let log = agent.log();
    assert!(
        log.contains("`intake.sqs` changed; it takes effect only after a restart"),
        "{log}"
    );
    wait_until("a STATUS with 2 free slots", WAIT, || {
        seen("0 running, 2 free")
    });
    assert!(seen("RELOADING=1"));
    assert!(agent.is_running());

    let status = agent.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    wait_until("STOPPING=1", Duration::from_secs(5), || seen("STOPPING=1"));
    done.store(true, Ordering::SeqCst);
    listener.join().expect("listener");
    let messages = messages.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let lines: Vec<&str> = messages.iter().flat_map(|m| m.lines()).collect();
    let first = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {lines:?}"))
    };
    let order = [
        first("READY=1"),
        first("STATUS="),
        first("WATCHDOG=1"),
        first("STOPPING=1"),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "out of order {order:?}: {lines:?}"
    );
    let reloading = first("RELOADING=1");
    assert!(reloading > order[0] && reloading < order[3], "{lines:?}");
}
