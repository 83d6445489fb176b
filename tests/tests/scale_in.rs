//! Scale-in and Spot never cost a job: real `rsql-agent run` processes, the IMDSv2 stand-in
//! (`rsql_agent_tests::imds`) whose answers the tests flip, and moto's Auto Scaling with the
//! lifecycle actions the launcher adds, behind a recording proxy so every call the agent makes
//! is seen with its time.
//!
//! - scale-in during a stage of three running jobs: intake stops, every job ends normally and
//!   is reported once, the lifecycle action is heartbeated while they run and completed only
//!   after the last outcome, and nothing reruns;
//! - a Spot notice with a two-minute deadline during a long job: the job is stopped before the
//!   deadline and reported `Rsql.Interrupted`, its lock is free, and a second agent runs the
//!   Retry;
//! - scale-in protection is set while busy and cleared when idle, one call each way for a
//!   whole stage of jobs;
//! - no instance metadata service at all: start is not held up and nothing is logged above
//!   info.

use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use rsql_agent_tests::agent::{wait_until, write_script, Agent, AgentConfig};
use rsql_agent_tests::imds::{self, Imds};
use rsql_agent_tests::moto::{self, TestGroup};
use rsql_agent_tests::proxy::Proxy;
use rsql_agent_tests::world::{eventually_with, show, World, WAIT};
use serde_json::json;

/// A waitForTaskToken task on the world's queue; `Rsql.Interrupted` is retried (a second
/// apart) when `retry` is set, else errors are caught into the output.
fn definition(world: &World, retry: bool) -> String {
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": "fleet_scale_in",
        "workflow_execution_id.$": "$.execution_id",
        "job_name.$": "$.job_name",
        "args.$": "$.args",
        "timeout_seconds": 600,
        "heartbeat_seconds": 60
    });
    let mut task = moto::JobTask {
        timeout_seconds: 900,
        ..moto::JobTask::new(&world.queue_url, body, 60)
    };
    if retry {
        task.catch = false;
        task.retry = Some(moto::Retrier {
            errors: vec!["Rsql.Interrupted".to_string()],
            interval_seconds: 1,
            max_attempts: 3,
            backoff_rate: Some(1.0),
        });
    }
    task.definition()
}

async fn start(world: &World, sm: &str, execution_id: &str, job: &str, args: &[&str]) -> String {
    let input = json!({"execution_id": execution_id, "job_name": job, "args": args});
    moto::start_execution(&world.sdk, sm, &input.to_string()).await
}

/// A job that marks its start with a file named after its first argument (holding its
/// agent's pid), then works until `release` exists, checking ten times a second.
fn write_release_job(world: &World) -> std::path::PathBuf {
    let release = world.dir().join("release");
    write_script(
        &world.scripts,
        "hold.sh",
        &format!(
            "echo \"${{RSQL_AGENT_SUPERVISOR%%:*}}\" >> {dir}/started.\"$1\"\n\
             while [ ! -e {release} ]; do sleep 0.1; done\necho done",
            dir = world.dir().display(),
            release = release.display()
        ),
    );
    release
}

fn starts(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("started.{name}")))
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// How the agent learns its group and hook.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Names {
    /// `[fleet] auto_scaling_group` and `lifecycle_hook`, as bootstrap.sh writes them.
    Configured,
    /// Neither: the agent asks Auto Scaling (DescribeAutoScalingInstances,
    /// DescribeLifecycleHooks), and its instance id comes from the instance metadata.
    Discovered,
}

/// An agent of `group`'s first instance, talking to AWS through `proxy` and to `imds`.
fn fleet_agent(
    world: &World,
    proxy: &Proxy,
    imds: &Imds,
    group: &TestGroup,
    names: Names,
    edit: impl FnOnce(&mut AgentConfig),
) -> Agent {
    let instance = &group.instance_ids[0];
    imds.set_instance_id(instance);
    let mut config = world.config();
    config.env.extend(imds.env());
    config.extra.push_str(
        "[fleet]\npoll_interval = \"200ms\"\nlifecycle_heartbeat = \"1s\"\nunprotect_after_idle = \"15s\"\n",
    );
    match names {
        Names::Configured => {
            config.instance_id = instance.clone();
            config.extra.push_str(&format!(
                "auto_scaling_group = \"{}\"\nlifecycle_hook = \"{}\"\n",
                group.name, group.hook
            ));
        }
        // An empty instance_id: the agent reads it from the metadata.
        Names::Discovered => config.instance_id = String::new(),
    }
    edit(&mut config);
    let agent = Agent::start(config, &proxy.url());
    agent.wait_for_log("fleet handling is on", WAIT);
    agent
}

async fn group(world: &World, prefix: &str) -> TestGroup {
    moto::create_group_with_terminating_hook(
        &world.sdk,
        &moto::unique_name(prefix),
        &moto::unique_name("terminating"),
        1,
        300,
    )
    .await
}

/// No warning or error in the agent's log but the one this test box always earns (it gives
/// jobs no cgroup).
fn no_noise(agent: &Agent) {
    let log = agent.log();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !l.contains("rsql_agent::startup: job cgroups: no cgroup"))
        .collect();
    assert!(
        noisy.is_empty(),
        "warnings or errors:\n{}",
        noisy.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_in_lets_a_stage_of_three_jobs_finish_then_completes_the_lifecycle_action() {
    let world = World::builder("scalein").build().await;
    let release = write_release_job(&world);
    let proxy = Proxy::start_recording(world.moto.addr());
    let imds = Imds::start();
    let group = group(&world, "scalein").await;
    imds.set_lifecycle_state(Some("InService"));
    let agent = fleet_agent(&world, &proxy, &imds, &group, Names::Discovered, |c| {
        c.max_concurrent_jobs = 4
    });
    agent.wait_for_log(&format!("auto_scaling_group={}", group.name), WAIT);
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("stage"),
        &definition(&world, false),
    )
    .await;
    let mut executions = Vec::new();
    for name in ["a", "b", "c"] {
        executions.push(start(&world, &sm, &format!("stage_{name}"), "hold.sh", &[name]).await);
    }
    wait_until("the three jobs to start", WAIT, || {
        ["a", "b", "c"]
            .iter()
            .all(|n| starts(world.dir(), n).len() == 1)
    });

    // The group picks this instance to scale in.
    let reads = imds.count(imds::LIFECYCLE_STATE_PATH);
    let flipped = SystemTime::now();
    imds.set_lifecycle_state(Some("Terminated"));
    agent.wait_for_log("draining: intake stopped", WAIT);
    assert!(imds.wait_for_count(imds::LIFECYCLE_STATE_PATH, reads + 1, WAIT));
    let seen = imds
        .requests()
        .into_iter()
        .filter(|r| r.path == imds::LIFECYCLE_STATE_PATH && r.at >= flipped)
        .map(|r| r.at)
        .min()
        .expect("a lifecycle state read after the flip");
    eprintln!(
        "Terminated served {} ms after the flip; agent log:\n{}",
        seen.duration_since(flipped).unwrap_or_default().as_millis(),
        agent
            .log()
            .lines()
            .filter(|l| l.contains("terminating this instance") || l.contains("draining"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A message that comes after the drain waits in the queue for another instance.
    let late = start(&world, &sm, "stage_late", "hold.sh", &["late"]).await;
    // While the jobs still run, the lifecycle action is kept alive, and not completed.
    let beat = world
        .moto
        .wait_for_lifecycle_action(&group.name, "RecordLifecycleActionHeartbeat", WAIT)
        .expect("a lifecycle heartbeat while the jobs run");
    assert_eq!(
        beat.instance.as_deref(),
        Some(group.instance_ids[0].as_str())
    );
    assert_eq!(beat.hook.as_deref(), Some(group.hook.as_str()));
    assert!(
        proxy.requests_for("CompleteLifecycleAction").is_empty(),
        "completed while jobs ran"
    );
    std::fs::write(&release, "").expect("let the jobs end");

    for exec in &executions {
        let out = moto::wait_execution(&world.sdk, exec, WAIT).await;
        assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
        assert_eq!(moto::execution_output(&out)["status"], "completed");
    }
    let completed = world
        .moto
        .wait_for_lifecycle_action(&group.name, "CompleteLifecycleAction", WAIT)
        .expect("the lifecycle action completed after the last outcome");
    assert_eq!(completed.result.as_deref(), Some("CONTINUE"));
    assert_eq!(
        moto::lifecycle_state(&world.sdk, &group.instance_ids[0]).await,
        "Terminating:Proceed"
    );
    // Completed only after the last outcome went out; each job reported once.
    let successes = proxy.requests_for("SendTaskSuccess");
    assert_eq!(successes.len(), 3, "{}", agent.log());
    assert!(proxy.requests_for("SendTaskFailure").is_empty());
    let last_outcome = successes.iter().map(|r| r.at).max().expect("outcomes");
    let complete_call = proxy.requests_for("CompleteLifecycleAction");
    assert_eq!(complete_call.len(), 1, "{}", agent.log());
    assert!(complete_call[0].at >= last_outcome);
    eprintln!(
        "last outcome to CompleteLifecycleAction: {} ms",
        complete_call[0]
            .at
            .duration_since(last_outcome)
            .unwrap_or_default()
            .as_millis()
    );
    // Nothing reran, and the late message was never taken.
    for name in ["a", "b", "c"] {
        assert_eq!(starts(world.dir(), name).len(), 1, "job {name} ran again");
    }
    assert!(starts(world.dir(), "late").is_empty());
    let late_history = moto::execution_history(&world.sdk, &late).await;
    assert!(
        !late_history
            .iter()
            .any(|e| *e.r#type() == HistoryEventType::TaskSucceeded),
        "the late job ran on a draining instance"
    );
    world.wait_queue((1, 0), Duration::from_secs(10)).await;
    // Intake stopped at the drain: no ReceiveMessage left after it (one already on its way
    // may land a moment later).
    let drained_at = SystemTime::now();
    let after: Vec<_> = proxy
        .requests_for("ReceiveMessage")
        .into_iter()
        .filter(|r| r.at > seen + Duration::from_millis(500) && r.at < drained_at)
        .map(|r| r.at)
        .collect();
    assert!(
        after.is_empty(),
        "ReceiveMessage after the drain: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_notice_stops_a_long_job_before_the_deadline_and_another_agent_runs_the_retry() {
    let world = World::builder("spot").shared_locks().build().await;
    let second_run = world.dir().join("second-run");
    // The first run works for ten minutes (it is stopped long before); a rerun ends at once.
    write_script(
        &world.scripts,
        "long.sh",
        &format!(
            "echo \"${{RSQL_AGENT_SUPERVISOR%%:*}}\" >> {dir}/started.long\n\
             if [ -e {second} ]; then echo rerun done; exit 0; fi\n\
             touch {second}\nsleep 600 & wait $!",
            dir = world.dir().display(),
            second = second_run.display()
        ),
    );
    let proxy = Proxy::start_recording(world.moto.addr());
    let imds = Imds::start();
    // A Spot instance outside any group: `enabled = true` watches the notices anyway.
    let mut config = world.config();
    config.instance_id = "i-0spot".into();
    config.kill_grace = "2s".into();
    config.env.extend(imds.env());
    config.extra.push_str(
        "[fleet]\nenabled = true\npoll_interval = \"200ms\"\nspot_stop_margin = \"110s\"\n",
    );
    let first = Agent::start(config, &proxy.url());
    first.wait_for_log("fleet handling is on", WAIT);
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("spot"),
        &definition(&world, true),
    )
    .await;
    let exec = start(&world, &sm, "spot_1", "long.sh", &[]).await;
    wait_until("the long job to start", WAIT, || {
        starts(world.dir(), "long").len() == 1
    });

    // The two-minute notice: the job is stopped 110 s before the deadline, ~10 s from now.
    // Whole seconds, as the metadata gives it.
    let deadline_text =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(120)).to_string();
    let deadline = humantime::parse_rfc3339(&deadline_text).expect("a deadline");
    imds.set_spot_action("terminate", &deadline_text);
    first.wait_for_log("Spot interruption notice", WAIT);
    first.wait_for_log("draining: intake stopped", WAIT);
    let failure = proxy
        .wait_for_request(WAIT, |r| r.operation() == Some("SendTaskFailure"))
        .expect("the stopped job's failure callback");
    // Stopped at the deadline less the margin, not at the notice: SIGTERM ends it at once
    // (kill_grace 2 s would allow more), and the report follows within moments.
    let stop_at = deadline - Duration::from_secs(110);
    assert!(
        failure.at > stop_at - Duration::from_secs(1),
        "stopped {:?} before the deadline less the margin",
        stop_at.duration_since(failure.at).unwrap_or_default()
    );
    assert!(
        failure.at < stop_at + Duration::from_secs(2 + 5),
        "reported {:?} after the deadline less the margin",
        failure.at.duration_since(stop_at).unwrap_or_default()
    );
    let body = failure.body_json().expect("a JSON callback");
    assert_eq!(body["error"], "Rsql.Interrupted", "{body}");
    // The draining agent does not take the Retry; a second agent on the same lock directory
    // does, at once: the lock is free.
    let mut second_config = world.config();
    second_config.instance_id = "i-0other".into();
    let second = Agent::start(second_config, &world.moto.endpoint());
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(
        *out.status(),
        ExecutionStatus::Succeeded,
        "first:\n{}\nsecond:\n{}",
        first.log(),
        second.log()
    );
    // One run on each agent: the stopped one on the first, the Retry on the second.
    assert_eq!(starts(world.dir(), "long").len(), 2);
    let started = |agent: &Agent| {
        agent
            .log()
            .lines()
            .filter(|l| l.contains("job started") && l.contains("rsql_agent::daemon"))
            .count()
    };
    assert_eq!(
        (started(&first), started(&second)),
        (1, 1),
        "first:\n{}\nsecond:\n{}",
        first.log(),
        second.log()
    );
    let history = moto::execution_history(&world.sdk, &exec).await;
    let failed: Vec<_> = history
        .iter()
        .filter(|e| *e.r#type() == HistoryEventType::TaskFailed)
        .filter_map(|e| e.task_failed_event_details().and_then(|d| d.error()))
        .collect();
    assert_eq!(
        failed,
        vec!["Rsql.Interrupted"],
        "no timeout, one interruption"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn protection_is_set_while_busy_and_cleared_when_idle_with_one_call_each_way() {
    let world = World::builder("protect").build().await;
    write_script(&world.scripts, "short.sh", "sleep 1\necho done");
    let proxy = Proxy::start_recording(world.moto.addr());
    let imds = Imds::start();
    let group = group(&world, "protect").await;
    imds.set_lifecycle_state(Some("InService"));
    let instance = group.instance_ids[0].clone();
    assert!(!moto::is_protected_from_scale_in(&world.sdk, &instance).await);
    let agent = fleet_agent(&world, &proxy, &imds, &group, Names::Configured, |c| {
        c.max_concurrent_jobs = 2
    });
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("protect"),
        &definition(&world, false),
    )
    .await;
    let mut executions = Vec::new();
    for i in 0..6 {
        executions.push(start(&world, &sm, &format!("protect_{i}"), "short.sh", &[]).await);
    }
    let sdk = &world.sdk;
    let id = &instance;
    eventually_with("protection while the jobs run", WAIT, || async move {
        if moto::is_protected_from_scale_in(sdk, id).await {
            Ok(())
        } else {
            Err("not protected".to_string())
        }
    })
    .await;
    for exec in &executions {
        let out = moto::wait_execution(&world.sdk, exec, WAIT).await;
        assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    }
    eventually_with("protection cleared once idle", WAIT, || async move {
        if moto::is_protected_from_scale_in(sdk, id).await {
            Err("still protected".to_string())
        } else {
            Ok(())
        }
    })
    .await;
    let calls: Vec<Option<String>> = proxy
        .requests_for("SetInstanceProtection")
        .iter()
        .map(|r| r.form_param("ProtectedFromScaleIn"))
        .collect();
    assert_eq!(
        calls,
        vec![Some("true".to_string()), Some("false".to_string())],
        "six jobs, one call each way\n{}",
        agent.log()
    );
    no_noise(&agent);
}

/// A listener that accepts connections and never answers: a metadata address that swallows
/// packets, as on a host where 169.254.169.254 leads nowhere.
struct Blackhole {
    listener: std::net::TcpListener,
}

impl Blackhole {
    fn start() -> Blackhole {
        Blackhole {
            listener: std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.listener.local_addr().expect("addr"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_instance_metadata_the_agent_starts_at_once_and_says_nothing_alarming() {
    let world = World::builder("noimds").build().await;
    write_script(&world.scripts, "short.sh", "echo done");
    // A metadata address that refuses (nothing listens) and one that never answers.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let blackhole = Blackhole::start();
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("noimds"),
        &definition(&world, false),
    )
    .await;
    for (what, endpoint) in [("refused", closed), ("unanswered", blackhole.url())] {
        let mut config = world.config();
        if what == "refused" {
            // No instance_id: the agent asks the metadata for it, and falls back to the host
            // name at once.
            config.instance_id = String::new();
        }
        config.env.extend([
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT".to_string(), endpoint),
            ("AWS_EC2_METADATA_DISABLED".to_string(), "false".to_string()),
        ]);
        let check = config.clone();
        let agent = world.start_agent(config);
        agent.wait_for_log("fleet handling is off", WAIT);
        let log = agent.log();
        let receiving = log.find("receiving jobs").expect("receiving jobs");
        let off = log.find("fleet handling is off").expect("off");
        // The metadata read runs beside start-up, not before it.
        if what == "unanswered" {
            assert!(
                receiving < off,
                "start waited for the metadata service:\n{log}"
            );
        }
        assert!(
            log.contains("no instance metadata service here"),
            "{what}:\n{log}"
        );
        let exec = start(&world, &sm, &format!("noimds_{what}"), "short.sh", &[]).await;
        let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
        assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
        no_noise(&agent);
        drop(agent);
        // check-config says what it found.
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, _) = check.write(dir.path());
        let out = std::process::Command::new(rsql_agent_tests::bins::agent())
            .arg("check-config")
            .arg(&path)
            .envs(check.env.iter().cloned())
            .output()
            .expect("check-config");
        assert!(out.status.success(), "{}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout)
                .contains("fleet:      off: no instance metadata service here"),
            "{}",
            show(&out)
        );
    }
}
