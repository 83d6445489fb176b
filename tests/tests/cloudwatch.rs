//! Live job logs in CloudWatch, end to end: the real `rsql-agent run` binary, the moto
//! emulator with executing state machines, and (where the wire matters) a recording,
//! cuttable proxy between the agent and moto.
//!
//! What an operator would notice: a line is readable in the job's stream while the job still
//! runs; a big log arrives whole and in order in batches CloudWatch would accept; an outage
//! neither slows the job nor loses or repeats a line; neither does a SIGKILLed agent.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_sfn::types::ExecutionStatus;
use rsql_agent_tests::agent::{wait_until, write_script, Agent};
use rsql_agent_tests::moto;
use rsql_agent_tests::proxy::{Proxy, RecordedRequest};
use rsql_agent_tests::world::{eventually, eventually_with, World, WAIT};
use serde_json::json;
use sha2::{Digest, Sha256};

/// CloudWatch's `PutLogEvents` limits, as the service documents them.
const MAX_BATCH_BYTES: usize = 1_048_576;
const MAX_BATCH_EVENTS: usize = 10_000;
const EVENT_OVERHEAD: usize = 26;
const MAX_MESSAGE_BYTES: usize = 262_144 - EVENT_OVERHEAD;
const DAY_MS: i64 = 24 * 3600 * 1000;

/// One task that hands the job to the agent's queue (as in tests/daemon.rs).
fn definition(queue_url: &str, heartbeat: u64) -> String {
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": "cloudwatch_test",
        "workflow_execution_id.$": "$.execution_id",
        "job_name.$": "$.job_name",
        "args": [],
        "timeout_seconds": 600,
        "heartbeat_seconds": heartbeat
    });
    moto::JobTask::new(queue_url, body, heartbeat).definition()
}

/// moto, the job queue, an empty script directory and a log group the agents create
/// (`create_group = true`).
async fn world() -> World {
    World::builder("jobs").log_group().build().await
}

async fn run(world: &World, heartbeat: u64, execution_id: &str, job: &str) -> String {
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("job"),
        &definition(&world.queue_url, heartbeat),
    )
    .await;
    let input = json!({"execution_id": execution_id, "job_name": job});
    moto::start_execution(&world.sdk, &sm, &input.to_string()).await
}

async fn status(world: &World, execution: &str) -> ExecutionStatus {
    aws_sdk_sfn::Client::new(&world.sdk)
        .describe_execution()
        .execution_arn(execution)
        .send()
        .await
        .unwrap()
        .status()
        .clone()
}

fn logs(world: &World) -> aws_sdk_cloudwatchlogs::Client {
    aws_sdk_cloudwatchlogs::Client::new(&world.sdk)
}

/// Polls until the job's stream exists (found by its documented prefix) and returns
/// its name.
async fn find_stream(world: &World, execution_id: &str, job: &str) -> String {
    let prefix = format!("{execution_id}/{job}/");
    let what = format!("a stream {prefix}* in {}", world.log_group());
    let prefix = prefix.as_str();
    eventually_with(&what, WAIT, || async move {
        let found = logs(world)
            .describe_log_streams()
            .log_group_name(world.log_group())
            .log_stream_name_prefix(prefix)
            .send()
            .await;
        // Until the agent creates the group, describing it fails: keep polling.
        let out = found.map_err(|e| format!("{e:?}"))?;
        let names: Vec<&str> = out
            .log_streams()
            .iter()
            .filter_map(|s| s.log_stream_name())
            .collect();
        assert!(names.len() <= 1, "one stream per attempt: {names:?}");
        names
            .first()
            .map(|name| name.to_string())
            .ok_or_else(|| "no stream yet".to_string())
    })
    .await
}

/// Every event of the stream, oldest first: (timestamp, message).
async fn events(world: &World, stream: &str) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = logs(world)
            .get_log_events()
            .log_group_name(world.log_group())
            .log_stream_name(stream)
            .start_from_head(true)
            .limit(10_000)
            .set_next_token(token.clone())
            .send()
            .await
            .unwrap();
        if page.events().is_empty() {
            return out;
        }
        for e in page.events() {
            out.push((
                e.timestamp().unwrap_or_default(),
                e.message().unwrap_or_default().to_string(),
            ));
        }
        token = page.next_forward_token().map(str::to_string);
    }
}

async fn messages(world: &World, stream: &str) -> Vec<String> {
    events(world, stream)
        .await
        .into_iter()
        .map(|(_, m)| m)
        .collect()
}

/// Shipments the agent has not finished yet (its index in `state_dir/shipper`).
/// Job-log shipments only: the agent's own metrics stream ships for as long as it runs.
fn shipments_left(agent: &Agent) -> usize {
    std::fs::read_dir(agent.state_dir.join("shipper"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter(|e| {
                    let state: serde_json::Value = std::fs::read(e.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    !state["log_stream"]
                        .as_str()
                        .is_some_and(|s| s.starts_with(METRICS_PREFIX))
                })
                .count()
        })
        .unwrap_or(0)
}

/// The prefix of the agent's metrics streams, as docs/operations.md documents it.
const METRICS_PREFIX: &str = "rsql-agent-metrics/";

/// The recorded `PutLogEvents` of one stream.
fn puts_to(proxy: &Proxy, stream: &str) -> Vec<RecordedRequest> {
    proxy
        .requests_for("PutLogEvents")
        .into_iter()
        .filter(|r| r.body_json().is_some_and(|b| b["logStreamName"] == stream))
        .collect()
}

/// The job's local log file (the only one under its workflow execution's directory).
fn local_log(agent: &Agent, execution_id: &str) -> Option<PathBuf> {
    std::fs::read_dir(agent.state_dir.join("jobs").join(execution_id))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
}

fn local_lines(path: &Path) -> Vec<String> {
    rsql_agent::joblog::read_records(path)
        .expect("open the job log")
        .map(|r| r.expect("record").text())
        .collect()
}

/// `line 1` .. `line n`.
fn numbered(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("line {i}")).collect()
}

/// Checks every recorded `PutLogEvents` against CloudWatch's limits; returns how many
/// events they carried.
fn assert_within_limits(requests: &[RecordedRequest]) -> usize {
    let mut total = 0;
    let mut last_ts = i64::MIN;
    for (i, request) in requests.iter().enumerate() {
        let body = request.body_json().expect("PutLogEvents body is JSON");
        let events = body["logEvents"].as_array().expect("logEvents");
        assert!(
            !events.is_empty() && events.len() <= MAX_BATCH_EVENTS,
            "request {i}: {} events",
            events.len()
        );
        let mut bytes = 0;
        let first = events[0]["timestamp"].as_i64().expect("timestamp");
        for event in events {
            let message = event["message"].as_str().expect("message");
            let ts = event["timestamp"].as_i64().expect("timestamp");
            assert!(
                !message.is_empty() && message.len() <= MAX_MESSAGE_BYTES,
                "request {i}: a message of {} bytes",
                message.len()
            );
            assert!(ts >= last_ts, "request {i}: timestamps go backwards");
            assert!(ts - first < DAY_MS, "request {i}: spans a day or more");
            last_ts = ts;
            bytes += message.len() + EVENT_OVERHEAD;
        }
        assert!(bytes <= MAX_BATCH_BYTES, "request {i}: {bytes} bytes");
        total += events.len();
    }
    total
}

/// Cuts the proxy between two `PutLogEvents` of the job's stream, so none of its batches is
/// in flight: a batch CloudWatch stored whose answer the cut lost would be sent again, which
/// is the one duplicate CloudWatch's API cannot prevent (see the shipper's docs). Waits for
/// a fresh batch of the stream and for CloudWatch to hold every event sent to it; the next
/// batch is then a flush interval (1 s) away. Other streams (the agent's metrics) do not
/// count.
async fn cut_between_batches(world: &World, proxy: &Proxy, stream: &str) {
    let seen = puts_to(proxy, stream).len();
    eventually("a fresh PutLogEvents of the job's stream", WAIT, || async {
        (puts_to(proxy, stream).len() > seen).then_some(())
    })
    .await;
    eventually_with("CloudWatch to hold every event sent", WAIT, || async {
        let sent: usize = puts_to(proxy, stream)
            .iter()
            .filter_map(|r| Some(r.body_json()?["logEvents"].as_array()?.len()))
            .sum();
        let stored = messages(world, stream).await.len();
        if stored >= sent {
            Ok(())
        } else {
            Err(format!("{stored} of {sent} events stored"))
        }
    })
    .await;
    proxy.cut();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_is_readable_in_cloudwatch_while_the_job_still_runs() {
    let world = world().await;
    write_script(
        &world.scripts,
        "live.sh",
        "echo 'first line'\nsleep 5\necho 'second line'",
    );
    let agent = world.agent(|_| {});
    let exec = run(&world, 30, "live_1", "live.sh").await;
    let stream = find_stream(&world, "live_1", "live.sh").await;
    let messages_then = eventually_with("the first line in CloudWatch", WAIT, || async {
        let messages = messages(&world, &stream).await;
        if messages.iter().any(|m| m == "first line") {
            Ok(messages)
        } else {
            Err(agent.log())
        }
    })
    .await;
    assert!(
        !messages_then.iter().any(|m| m == "second line"),
        "the job already ended: {messages_then:?}"
    );
    assert_eq!(status(&world, &exec).await, ExecutionStatus::Running);
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    let output = moto::execution_output(&out);
    assert_eq!(output["log_group"], world.log_group(), "{output}");
    assert_eq!(output["log_stream"], stream.as_str(), "{output}");
    // The final flush ran before the outcome was reported: the whole log is there already.
    assert_eq!(
        messages(&world, &stream).await,
        vec!["first line", "second line"]
    );
    let audit = agent.local_audit();
    let last = audit.last().expect("a local audit record");
    assert_eq!(last["log_stream"], stream.as_str(), "{last}");
    assert_eq!(last["log_group"], world.log_group(), "{last}");
    wait_until("the shipment to finish", WAIT, || {
        shipments_left(&agent) == 0
    });
}

/// About 30 MB of stdout: numbered lines of 40..200 bytes (some non-ASCII), and a 300 KB
/// line every ~1 MB. Every line ends in `$`, which appears nowhere else, so the original
/// can be rebuilt from the events whatever way a line was cut.
fn big_output() -> Vec<u8> {
    let mut out = Vec::with_capacity(31 << 20);
    let mut i = 0u64;
    while out.len() < 30 << 20 {
        if i % 6000 == 3000 {
            let c = b'a' + (i % 26) as u8;
            out.extend(std::iter::repeat_n(c, 300_000 - 1));
        } else {
            let width = 40 + (i * 7919 % 160) as usize;
            let mut line = format!("{i:08} é ");
            while line.len() < width {
                line.push(char::from(b'A' + (line.len() % 26) as u8));
            }
            out.extend_from_slice(line.as_bytes());
        }
        out.extend_from_slice(b"$\n");
        i += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_megabytes_arrive_whole_and_in_order_in_batches_within_the_limits() {
    let world = world().await;
    let content = big_output();
    let data = world.scripts.join("big.txt");
    std::fs::File::create(&data)
        .and_then(|mut f| f.write_all(&content))
        .expect("write the job's output");
    write_script(
        &world.scripts,
        "big.sh",
        &format!("cat '{}'", data.display()),
    );
    let proxy = Proxy::start_recording(world.moto.addr());
    let agent = Agent::start(world.config(), &proxy.url());
    let exec = run(&world, 60, "big_1", "big.sh").await;
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    wait_until("the shipment to finish", WAIT, || {
        shipments_left(&agent) == 0
    });
    let stream = find_stream(&world, "big_1", "big.sh").await;

    let events = events(&world, &stream).await;
    let mut rebuilt = Vec::with_capacity(content.len());
    for (_, message) in &events {
        for b in message.bytes() {
            rebuilt.push(b);
            if b == b'$' {
                rebuilt.push(b'\n');
            }
        }
    }
    assert_eq!(rebuilt.len(), content.len(), "bytes lost or added");
    assert_eq!(
        hex::encode(Sha256::digest(&rebuilt)),
        hex::encode(Sha256::digest(&content)),
        "the log arrived changed or out of order"
    );
    for pair in events.windows(2) {
        assert!(pair[0].0 <= pair[1].0, "events out of order");
    }

    let puts = puts_to(&proxy, &stream);
    assert!(puts.len() >= 30, "{} batches for 30 MB", puts.len());
    let sent = assert_within_limits(&puts);
    // Nothing was sent twice.
    assert_eq!(sent, events.len());
}

/// A job printing `line 1` .. `line <n>`, one every 100 ms.
fn ticking_job(world: &World, name: &str, n: usize) {
    write_script(
        &world.scripts,
        name,
        &format!("for i in $(seq 1 {n}); do echo \"line $i\"; sleep 0.1; done"),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_twenty_second_outage_neither_slows_the_job_nor_loses_or_repeats_a_line() {
    let world = world().await;
    ticking_job(&world, "tick.sh", 300);
    let proxy = Proxy::start_recording(world.moto.addr());
    let mut config = world.config();
    config.visibility_timeout = "60s".into();
    let agent = Agent::start(config, &proxy.url());
    let exec = run(&world, 120, "cut_1", "tick.sh").await;
    let stream = find_stream(&world, "cut_1", "tick.sh").await;

    cut_between_batches(&world, &proxy, &stream).await;
    let cut_at = Instant::now();
    let log = local_log(&agent, "cut_1").expect("the job's log file");
    let before = local_lines(&log).len();
    while cut_at.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The job went on printing through the outage.
    assert!(
        local_lines(&log).len() >= before + 150,
        "the job was held up by the outage"
    );
    proxy.restore();

    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    let duration_ms = moto::execution_output(&out)["duration_ms"]
        .as_u64()
        .expect("duration_ms");
    // 300 x 100 ms; a job held up by the 20 s outage would take 50 s.
    assert!(
        (30_000..38_000).contains(&duration_ms),
        "the job took {duration_ms} ms for a nominal 30 s"
    );
    wait_until("the shipment to finish", WAIT, || {
        shipments_left(&agent) == 0
    });
    assert_eq!(messages(&world, &stream).await, numbered(300));
    assert!(
        agent.log().contains("cannot ship log events"),
        "the outage was not noticed: {}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_while_shipping_is_cut_resumes_without_losing_or_repeating_a_line() {
    let world = world().await;
    ticking_job(&world, "tick.sh", 600);
    let proxy = Proxy::start_recording(world.moto.addr());
    let mut agent = Agent::start(world.config(), &proxy.url());
    let _exec = run(&world, 120, "kill_1", "tick.sh").await;
    let stream = find_stream(&world, "kill_1", "tick.sh").await;

    cut_between_batches(&world, &proxy, &stream).await;
    let log = local_log(&agent, "kill_1").expect("the job's log file");
    let before = local_lines(&log).len();
    wait_until("lines printed during the cut", WAIT, || {
        local_lines(&log).len() >= before + 30
    });
    // The whole host goes: the agent and the job's owner (a job outlives its agent alone).
    agent.kill();
    agent.kill_owners();
    wait_until("the job's owner is gone", WAIT, || {
        agent.owners().iter().all(|o| {
            rsql_agent_tests::agent::start_time(o["pid"].as_i64().unwrap_or(0) as i32).is_none()
        })
    });
    let printed = local_lines(&log);
    assert!(printed.len() < 600, "the job ended before the kill");
    assert_eq!(printed, numbered(printed.len()));
    // Some of it reached CloudWatch before the cut, the rest only after the restart.
    let shipped_before = messages(&world, &stream).await.len();
    assert!(
        shipped_before > 0 && shipped_before < printed.len(),
        "{shipped_before} of {} printed lines shipped before the cut",
        printed.len()
    );

    proxy.restore();
    agent.restart();
    wait_until("the resumed shipment to finish", WAIT, || {
        shipments_left(&agent) == 0
    });
    assert_eq!(messages(&world, &stream).await, printed);
    assert!(
        agent.log().contains("resuming log shipment"),
        "{}",
        agent.log()
    );
}

/// The rules of CloudWatch's embedded metric format that decide whether a record becomes
/// metrics: `_aws.Timestamp` in ms; each directive a namespace, dimension sets naming
/// top-level string members (at most 30 per set), and metrics naming top-level numbers.
/// Returns the metric names.
fn emf_metrics(record: &serde_json::Value) -> Vec<String> {
    let aws = &record["_aws"];
    assert!(
        aws["Timestamp"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "{record}"
    );
    let mut names = Vec::new();
    for d in aws["CloudWatchMetrics"].as_array().expect("directives") {
        assert_eq!(d["Namespace"], "RsqlAgent", "{record}");
        for set in d["Dimensions"].as_array().expect("dimension sets") {
            let set = set.as_array().expect("a dimension set");
            assert!(!set.is_empty() && set.len() <= 30, "{record}");
            for dim in set {
                let dim = dim.as_str().expect("a dimension name");
                assert!(record[dim].is_string(), "dimension {dim} missing: {record}");
            }
        }
        for m in d["Metrics"].as_array().expect("metrics") {
            let name = m["Name"].as_str().expect("a metric name");
            assert!(record[name].is_number(), "metric {name} missing: {record}");
            names.push(name.to_string());
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn job_metrics_arrive_in_the_log_group_as_embedded_metric_records() {
    let world = world().await;
    write_script(&world.scripts, "fine.sh", "echo fine");
    write_script(&world.scripts, "broken.sh", "echo broken >&2\nexit 3");
    let mut config = world.config();
    config
        .extra
        .push_str("[metrics]\nfleet = \"night-fleet\"\n");
    let agent = Agent::start(config, &world.moto.endpoint());
    let fine = run(&world, 30, "metrics_1", "fine.sh").await;
    let broken = run(&world, 30, "metrics_1", "broken.sh").await;
    for exec in [&fine, &broken] {
        let out = moto::wait_execution(&world.sdk, exec, WAIT).await;
        assert_ne!(*out.status(), ExecutionStatus::Running, "{}", agent.log());
    }
    // One metrics stream for this agent run, found by its documented prefix; wait for both
    // jobs' records.
    let records: Vec<serde_json::Value> = eventually_with("both jobs' metrics", WAIT, || async {
        let found = logs(&world)
            .describe_log_streams()
            .log_group_name(world.log_group())
            .log_stream_name_prefix(METRICS_PREFIX)
            .send()
            .await
            .map_err(|e| format!("{e}\n{}", agent.log()))?;
        let streams: Vec<String> = found
            .log_streams()
            .iter()
            .filter_map(|s| s.log_stream_name().map(str::to_string))
            .collect();
        assert!(streams.len() <= 1, "one stream per agent run: {streams:?}");
        let Some(stream) = streams.first() else {
            return Err(format!("no metrics stream yet\n{}", agent.log()));
        };
        assert!(
            stream.starts_with(&format!("{METRICS_PREFIX}{}/", agent.config.instance_id)),
            "{stream}"
        );
        let records: Vec<serde_json::Value> = messages(&world, stream)
            .await
            .iter()
            .map(|m| serde_json::from_str(m).expect("every metrics event is one JSON record"))
            .collect();
        if records
            .iter()
            .filter(|r| r.get("JobName").is_some())
            .count()
            >= 2
        {
            Ok(records)
        } else {
            Err(format!("{records:?}"))
        }
    })
    .await;
    for record in &records {
        assert_eq!(record["Fleet"], "night-fleet", "{record}");
        emf_metrics(record);
    }
    let completed = records
        .iter()
        .find(|r| r["JobName"] == "fine.sh")
        .expect("the completed job's record");
    assert_eq!(
        emf_metrics(completed),
        ["JobsCompleted", "JobDurationMs", "QueueWaitMs"]
    );
    assert_eq!(completed["JobsCompleted"], 1);
    assert_eq!(completed["WorkflowId"], "cloudwatch_test");
    // An SQS job's queue wait: from the message being sent to the job's start.
    let wait = completed["QueueWaitMs"].as_u64().expect("QueueWaitMs");
    assert!(wait < WAIT.as_millis() as u64, "{completed}");
    let failed = records
        .iter()
        .find(|r| r["JobName"] == "broken.sh")
        .expect("the failed job's record");
    assert_eq!(emf_metrics(failed)[0], "JobsFailed");
    assert_eq!(failed["ErrorName"], "Rsql.ScriptFailed", "{failed}");
    // The gauges: written at the start and every interval.
    let gauges = records
        .iter()
        .find(|r| r.get("OutboxDepth").is_some())
        .expect("a gauges record");
    assert_eq!(
        emf_metrics(gauges),
        ["RunningJobs", "FreeSlots", "OutboxDepth"]
    );
    assert_eq!(gauges["FreeSlots"], agent.config.max_concurrent_jobs);
}
