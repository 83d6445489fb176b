//! The generic state machine end to end: `packaging/aws/workflow.asl.json` as it is (after
//! the CloudFormation-style substitutions) on moto's executing state machines, the blog
//! workflow loaded with `rsql-agent workflow put-config`, started with `workflow start`,
//! two real `rsql-agent run` daemons sharing one lock directory, real PostgreSQL with the
//! `rsql` stand-in, and `workflow status` for what an operator sees.
//!
//! Why one file of about 850 lines: every test drives the same world (the state machine, two
//! daemons, PostgreSQL), built once at the top; the scenarios read best next to it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sfn::types::ExecutionStatus;
use rsql_agent_tests::agent::{wait_until, write_script, Agent, AgentConfig};
use rsql_agent_tests::bins;
use rsql_agent_tests::moto;
use rsql_agent_tests::pg::TestPg;
use rsql_agent_tests::world::{
    eventually, eventually_with, s, show, Item, StateMachine, World, WAIT,
};
use serde_json::{json, Value};

/// `HeartbeatSeconds` of the stack: the agents heartbeat running jobs every second. Job
/// tasks have no heartbeat timeout, so it is far below the queue waits some tests build.
const HEARTBEAT_SECONDS: u64 = 3;
/// The agents' `[intake.sqs] visibility_timeout`: how long a dead host's message stays
/// hidden before another agent finds its runner gone.
const VISIBILITY_SECONDS: u64 = 10;
/// The ASL's Retry `IntervalSeconds` for `Rsql.Interrupted`.
const RETRY_INTERVAL_SECONDS: u64 = 5;

/// moto with the packaged state machine, its tables and queue, the sample jobs, a log group
/// and one lock directory for the fleet, as on EFS.
async fn world() -> World {
    World::builder("rsql-jobs")
        .sample_scripts()
        .state_machine(StateMachine::Workflow {
            heartbeat_seconds: HEARTBEAT_SECONDS,
        })
        .log_group()
        .shared_locks()
        .build()
        .await
}

/// One agent of the fleet: one job at a time, so a parallel stage spreads over both.
fn db_agent(world: &World, pg: &TestPg, instance_id: &str) -> Agent {
    let mut config = agent_config(world, instance_id, 1).database(pg);
    // Live logs, one stream per job attempt.
    config.log_group = Some(world.log_group().to_string());
    world.start_agent(config)
}

/// An agent of the fleet with `slots` slots, for jobs that need no database.
fn fleet_agent(world: &World, instance_id: &str, slots: usize) -> Agent {
    world.start_agent(agent_config(world, instance_id, slots))
}

fn agent_config(world: &World, instance_id: &str, slots: usize) -> AgentConfig {
    // The world's config: the job table, and one lock directory for the fleet, as on EFS.
    let mut config = world.config();
    config.log_group = None;
    config.instance_id = instance_id.to_string();
    config.max_concurrent_jobs = slots;
    config.heartbeat_interval = "1s".to_string();
    config.visibility_timeout = format!("{VISIBILITY_SECONDS}s");
    config
}

fn workflow_status(world: &World, execution_id: &str) -> String {
    let out = world.cli(&[
        "workflow",
        "status",
        execution_id,
        "--state-machine",
        world.state_machine(),
        "--job-table",
        world.job_table(),
    ]);
    assert!(out.status.success(), "workflow status: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn workflow_audit(world: &World, execution_id: &str, workflow_id: &str) -> Item {
    aws_sdk_dynamodb::Client::new(&world.sdk)
        .get_item()
        .table_name(world.workflow_table())
        .key(
            "workflow_execution_id",
            AttributeValue::S(execution_id.into()),
        )
        .key("workflow_id", AttributeValue::S(workflow_id.into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap_or_else(|| panic!("no workflow audit item for {execution_id}"))
}

async fn wait_done(
    world: &World,
    arn: &str,
    agents: &[&Agent],
) -> aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput {
    let out = moto::wait_execution(&world.sdk, arn, WAIT).await;
    if *out.status() == ExecutionStatus::Running {
        panic!("still running; agents:\n{}", logs(agents));
    }
    out
}

fn logs(agents: &[&Agent]) -> String {
    agents
        .iter()
        .map(|a| format!("--- {} ---\n{}", a.config.instance_id, a.log()))
        .collect()
}

/// A copy of the blog workflow config with a new id, changed by `edit`, in `dir`.
fn config_copy(dir: &Path, workflow_id: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let text = std::fs::read_to_string(
        bins::workspace_root().join("rsql_scripts/blog_test_workflow.json"),
    )
    .unwrap();
    let mut config: Value = serde_json::from_str(&text).unwrap();
    config["workflow_id"] = json!(workflow_id);
    edit(&mut config);
    let path = dir.join(format!("{workflow_id}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn rows(pg: &TestPg) -> i64 {
    tokio::task::block_in_place(|| pg.query_i64("SELECT count(*) FROM rsql_blog.blog_table"))
}

const STAGES: [&[&str]; 3] = [
    &["rsql_blog_script_1.sh", "rsql_blog_script_2.sh"],
    &["rsql_blog_script_3.sh", "rsql_blog_script_4.sh"],
    &["rsql_blog_script_5.sh", "rsql_blog_script_6.sh"],
];

#[tokio::test(flavor = "multi_thread")]
async fn blog_workflow_runs_in_stage_order_across_two_agents() {
    // The sync PostgreSQL client runs its own runtime: keep it off this one's threads.
    let pg = tokio::task::block_in_place(TestPg::start);
    let world = world().await;
    let a = db_agent(&world, &pg, "i-0agent-a");
    let b = db_agent(&world, &pg, "i-0agent-b");
    world.put_config(&bins::workspace_root().join("rsql_scripts/blog_test_workflow.json"));
    let arn = world.workflow_start("blog_test_workflow", "blog_e2e_1");
    let out = wait_done(&world, &arn, &[&a, &b]).await;
    assert_eq!(
        *out.status(),
        ExecutionStatus::Succeeded,
        "{:?} {:?}\n{}",
        out.error(),
        out.cause(),
        logs(&[&a, &b])
    );
    assert_eq!(rows(&pg), 4);

    // Six job audit items, all completed; both agents ran jobs.
    let mut items: Vec<Vec<Item>> = Vec::new();
    let mut instances = BTreeSet::new();
    for stage in STAGES {
        let mut stage_items = Vec::new();
        for job in stage {
            let item = world
                .audit_item(job, "blog_e2e_1")
                .await
                .unwrap_or_else(|| panic!("no job audit for {job}"));
            assert_eq!(s(&item, "execution_status"), "completed", "{item:?}");
            assert_eq!(s(&item, "workflow_id"), "blog_test_workflow");
            instances.insert(s(&item, "instance_id"));
            stage_items.push(item);
        }
        items.push(stage_items);
    }
    assert_eq!(
        instances,
        BTreeSet::from(["i-0agent-a".to_string(), "i-0agent-b".to_string()]),
        "both agents should have run jobs"
    );

    // Stage order: every job of a stage started after the last job of the stage before ended,
    // and the sequential stage ran its jobs one after the other.
    for pair in items.windows(2) {
        let last_end = pair[0]
            .iter()
            .map(|i| s(i, "execution_end_ts"))
            .max()
            .unwrap();
        for item in &pair[1] {
            assert!(
                s(item, "execution_start_ts") >= last_end,
                "{} started at {} before the previous stage ended at {last_end}",
                s(item, "job_name"),
                s(item, "execution_start_ts")
            );
        }
    }
    assert!(s(&items[0][1], "execution_start_ts") >= s(&items[0][0], "execution_end_ts"));

    // The workflow audit: completed, with the list of jobs and both times.
    let audit = workflow_audit(&world, "blog_e2e_1", "blog_test_workflow").await;
    assert_eq!(s(&audit, "execution_status"), "completed", "{audit:?}");
    assert!(!s(&audit, "execution_start_ts").is_empty());
    assert!(!s(&audit, "execution_end_ts").is_empty());
    let jobs: Vec<String> = audit["rsql_jobs"]
        .as_l()
        .unwrap()
        .iter()
        .map(|v| v.as_s().unwrap().clone())
        .collect();
    assert_eq!(jobs, STAGES.concat());

    // What an operator sees.
    let status = workflow_status(&world, "blog_e2e_1");
    println!("{status}");
    assert!(status.contains("SUCCEEDED"), "{status}");
    assert!(status.contains("6/6 jobs completed"), "{status}");
    assert!(status.contains("workflow audit: completed"), "{status}");
    for (n, stage) in STAGES.iter().enumerate() {
        for job in *stage {
            let line = status
                .lines()
                .find(|l| l.contains(job))
                .unwrap_or_else(|| panic!("{job} is not in the status:\n{status}"));
            assert!(line.starts_with(&(n + 1).to_string()), "{line}");
            assert!(line.contains("completed"), "{line}");
            assert!(line.contains("i-0agent-"), "{line}");
        }
    }
    // Six log streams, each holding its script's output.
    let logs = aws_sdk_cloudwatchlogs::Client::new(&world.sdk);
    let mut streams = BTreeSet::new();
    for item in items.iter().flatten() {
        let job = s(item, "job_name");
        let stream = s(item, "log_stream");
        assert_eq!(s(item, "log_group"), world.log_group());
        let events = logs
            .get_log_events()
            .log_group_name(world.log_group())
            .log_stream_name(&stream)
            .start_from_head(true)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GetLogEvents {stream}: {e:?}"));
        let text: Vec<String> = events
            .events()
            .iter()
            .filter_map(|e| e.message().map(str::to_string))
            .collect();
        assert!(
            text.iter().any(|l| l.contains(&format!("{job}: done"))),
            "stream {stream} lacks the output of {job}: {text:?}"
        );
        assert!(status.contains(&stream), "{status}");
        streams.insert(stream);
    }
    assert_eq!(streams.len(), 6, "{streams:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_stage_two_job_fails_the_workflow_with_its_sql_state() {
    let pg = tokio::task::block_in_place(TestPg::start);
    let world = world().await;
    let a = db_agent(&world, &pg, "i-0agent-a");
    let b = db_agent(&world, &pg, "i-0agent-b");
    // The sample failure config: the blog workflow with a stage-2 job that inserts into a
    // missing table.
    world.put_config(&bins::workspace_root().join("rsql_scripts/blog_failure_workflow.json"));
    let arn = world.workflow_start("blog_failure_workflow", "blog_fail_1");
    let out = wait_done(&world, &arn, &[&a, &b]).await;
    assert_eq!(
        *out.status(),
        ExecutionStatus::Failed,
        "{}",
        logs(&[&a, &b])
    );
    assert_eq!(out.error(), Some("Rsql.ScriptFailed"));
    assert!(
        out.cause().unwrap_or_default().contains("42P01"),
        "{:?}",
        out.cause()
    );

    let audit = workflow_audit(&world, "blog_fail_1", "blog_failure_workflow").await;
    assert_eq!(s(&audit, "execution_status"), "failed", "{audit:?}");
    assert_eq!(s(&audit, "error_message"), "Rsql.ScriptFailed");
    let cause: Value = serde_json::from_str(&s(&audit, "error_cause")).expect("cause is JSON");
    assert_eq!(cause["sql_state"], "42P01", "{cause}");
    assert!(!s(&audit, "execution_end_ts").is_empty());

    let failed = world
        .audit_item("rsql_blog_script_fail.sh", "blog_fail_1")
        .await
        .expect("audit of the failing job");
    assert_eq!(s(&failed, "execution_status"), "failed");
    // Stage 3 never ran.
    for job in STAGES[2] {
        assert!(
            world.audit_item(job, "blog_fail_1").await.is_none(),
            "{job} of stage 3 ran after a failed stage"
        );
    }
    let status = workflow_status(&world, "blog_fail_1");
    assert!(status.contains("FAILED"), "{status}");
    assert!(status.contains("workflow audit: failed"), "{status}");
    assert!(status.contains("42P01"), "{status}");
    let stage3 = status
        .lines()
        .find(|l| l.contains("rsql_blog_script_5.sh"))
        .unwrap();
    assert_eq!(stage3.split_whitespace().nth(2), Some("-"), "{stage3}");
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_stage_runs_nothing_and_the_workflow_succeeds() {
    let pg = tokio::task::block_in_place(TestPg::start);
    let world = world().await;
    let a = db_agent(&world, &pg, "i-0agent-a");
    let b = db_agent(&world, &pg, "i-0agent-b");
    let dir = tempfile::tempdir().unwrap();
    let file = config_copy(dir.path(), "blog_disabled_workflow", |c| {
        c["workflow_stages"][1]["execution_flag"] = json!("n");
    });
    world.put_config(&file);
    let arn = world.workflow_start("blog_disabled_workflow", "blog_disabled_1");
    let out = wait_done(&world, &arn, &[&a, &b]).await;
    assert_eq!(
        *out.status(),
        ExecutionStatus::Succeeded,
        "{}",
        logs(&[&a, &b])
    );
    // Stages 1 and 3 ran: scripts 5 and 6 inserted their rows, 3 and 4 did not.
    assert_eq!(rows(&pg), 2);
    for job in STAGES[1] {
        assert!(
            world.audit_item(job, "blog_disabled_1").await.is_none(),
            "{job} ran"
        );
    }
    for job in STAGES[0].iter().chain(STAGES[2]) {
        let item = world.audit_item(job, "blog_disabled_1").await.unwrap();
        assert_eq!(s(&item, "execution_status"), "completed");
    }
    let audit = workflow_audit(&world, "blog_disabled_1", "blog_disabled_workflow").await;
    assert_eq!(s(&audit, "execution_status"), "completed");
    let status = workflow_status(&world, "blog_disabled_1");
    assert!(status.contains("SUCCEEDED"), "{status}");
    let line = status
        .lines()
        .find(|l| l.contains("rsql_blog_script_3.sh"))
        .unwrap();
    assert!(line.contains("disabled"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_during_a_stage_two_job_is_retried_on_the_other_agent() {
    let pg = tokio::task::block_in_place(TestPg::start);
    let world = world().await;
    // A slow stage-2 job that inserts script 4's row only at its end. Each run notes its
    // start time and its processes; a run that finds a process of an earlier run alive
    // notes an overlap.
    let marks = tempfile::tempdir().unwrap();
    let (starts, pids) = (marks.path().join("starts"), marks.path().join("pids"));
    write_script(
        &world.scripts,
        "rsql_blog_slow_4.sh",
        &format!(
            "for p in $(cat '{pids}' 2>/dev/null); do kill -0 \"$p\" 2>/dev/null && echo \"overlap $p\" >> '{starts}'; done\n\
             echo $$ >> '{pids}'\n\
             echo \"start $(date +%s%N)\" >> '{starts}'\n\
             echo slow job starting\n\
             sleep 6 & echo $! >> '{pids}'; wait $!\n\
             exec \"$(dirname \"$0\")/rsql_blog_script_4.sh\"",
            pids = pids.display(),
            starts = starts.display()
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = config_copy(dir.path(), "blog_retry_workflow", |c| {
        c["workflow_stages"][1]["scripts"] =
            json!(["rsql_blog_script_3.sh", "rsql_blog_slow_4.sh"]);
    });
    let mut agents = HashMap::from([
        ("i-0agent-a", db_agent(&world, &pg, "i-0agent-a")),
        ("i-0agent-b", db_agent(&world, &pg, "i-0agent-b")),
    ]);
    world.put_config(&file);
    let arn = world.workflow_start("blog_retry_workflow", "blog_retry_1");

    // Find the agent running the slow job and SIGKILL it mid-job.
    let victim = eventually_with("the slow job to start", WAIT, || async {
        match world
            .audit_item("rsql_blog_slow_4.sh", "blog_retry_1")
            .await
        {
            Some(item) if s(&item, "execution_status") == "running" => Ok(s(&item, "instance_id")),
            _ => Err(logs(&agents.values().collect::<Vec<_>>())),
        }
    })
    .await;
    let survivor = if victim == "i-0agent-a" {
        "i-0agent-b"
    } else {
        "i-0agent-a"
    };
    // The victim's host dies: its agent and the job's owner process with it (a job
    // outlives its agent alone).
    let agent = agents
        .get_mut(victim.as_str())
        .expect("the victim is one of ours");
    agent.kill();
    agent.kill_owners();
    let killed_at = std::time::SystemTime::now();

    let out = wait_done(&world, &arn, &agents.values().collect::<Vec<_>>()).await;
    assert_eq!(
        *out.status(),
        ExecutionStatus::Succeeded,
        "{:?} {:?}\n{}",
        out.error(),
        out.cause(),
        logs(&agents.values().collect::<Vec<_>>())
    );
    assert_eq!(rows(&pg), 4);
    let item = world
        .audit_item("rsql_blog_slow_4.sh", "blog_retry_1")
        .await
        .unwrap();
    assert_eq!(s(&item, "execution_status"), "completed", "{item:?}");
    assert_eq!(s(&item, "instance_id"), survivor, "{item:?}");
    // The retry was a new task attempt: two messages for the slow job reached the fleet.
    let history = moto::execution_history(&world.sdk, &arn).await;
    let sends: Vec<String> = history
        .iter()
        .filter_map(|e| e.task_scheduled_event_details())
        .filter_map(|d| serde_json::from_str::<Value>(d.parameters()).ok())
        .filter(|p| p["MessageBody"]["job_name"] == "rsql_blog_slow_4.sh")
        .map(|p| {
            p["MessageBody"]["task_token"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let kinds: Vec<String> = history
        .iter()
        .map(|e| {
            format!(
                "{:?} {}",
                e.r#type(),
                e.task_scheduled_event_details()
                    .map(|d| d.parameters().chars().take(300).collect::<String>())
                    .unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(sends.len(), 2, "{}", kinds.join("\n"));
    assert_ne!(
        sends[0], sends[1],
        "a Retry attempt must get a new task token"
    );
    for job in STAGES[2] {
        let item = world.audit_item(job, "blog_retry_1").await.unwrap();
        assert_eq!(s(&item, "execution_status"), "completed");
    }
    // The retry never overlapped a living process of the dead run, and it started within
    // the documented bound: the message's visibility timeout (nobody extends it any more),
    // then the Retry's interval, with margin for a loaded machine.
    let text = std::fs::read_to_string(&starts).unwrap();
    assert!(!text.contains("overlap"), "{text}");
    let runs: Vec<u128> = text
        .lines()
        .filter_map(|l| l.strip_prefix("start ")?.parse().ok())
        .collect();
    assert_eq!(runs.len(), 2, "{text}");
    let killed_ns = killed_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let after = Duration::from_nanos((runs[1] - killed_ns) as u64);
    let bound = Duration::from_secs(VISIBILITY_SECONDS + RETRY_INTERVAL_SECONDS + 15);
    assert!(
        after <= bound,
        "the retry started {after:?} after the host died (bound {bound:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_give_clear_errors() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| world.cli(args);

    // Bad JSON.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"workflow_id\": ").unwrap();
    let out = run(&[
        "workflow",
        "put-config",
        bad.to_str().unwrap(),
        "--table",
        world.config_table(),
    ]);
    assert_eq!(out.status.code(), Some(65), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid workflow config"));

    // A missing file.
    let out = run(&[
        "workflow",
        "put-config",
        "/nonexistent.json",
        "--table",
        world.config_table(),
    ]);
    assert_eq!(out.status.code(), Some(66), "{}", show(&out));

    // A missing table.
    let good = bins::workspace_root().join("rsql_scripts/blog_test_workflow.json");
    let out = run(&[
        "workflow",
        "put-config",
        good.to_str().unwrap(),
        "--table",
        "no-such-table",
    ]);
    assert_eq!(out.status.code(), Some(69), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"no-such-table\" does not exist"),
        "{}",
        show(&out)
    );

    // An unknown workflow: refused before any execution starts.
    let out = run(&[
        "workflow",
        "start",
        "no_such_workflow",
        "--state-machine",
        world.state_machine(),
    ]);
    assert_eq!(out.status.code(), Some(69), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no_such_workflow") && stderr.contains("put-config"),
        "{stderr}"
    );
    let executions = aws_sdk_sfn::Client::new(&world.sdk)
        .list_executions()
        .state_machine_arn(world.state_machine())
        .send()
        .await
        .unwrap();
    assert!(executions.executions().is_empty());

    // A state machine that does not exist.
    let missing = world.state_machine().replace("rsql-workflow", "gone");
    let out = run(&[
        "workflow",
        "start",
        "blog_test_workflow",
        "--state-machine",
        &missing,
    ]);
    assert_eq!(out.status.code(), Some(69), "{}", show(&out));

    // An execution that does not exist.
    let out = run(&[
        "workflow",
        "status",
        "never_started",
        "--state-machine",
        world.state_machine(),
        "--job-table",
        world.job_table(),
    ]);
    assert_eq!(out.status.code(), Some(69), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never_started"));

    // A generated execution id, and the config round trip.
    let out = run(&[
        "workflow",
        "put-config",
        good.to_str().unwrap(),
        "--table",
        world.config_table(),
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let out = run(&[
        "workflow",
        "start",
        "blog_test_workflow",
        "--state-machine",
        world.state_machine(),
    ]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(":blog_test_workflow-"));
    // The same execution id twice.
    let out = run(&[
        "workflow",
        "start",
        "blog_test_workflow",
        "--execution-id",
        "twice",
        "--state-machine",
        world.state_machine(),
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let out = run(&[
        "workflow",
        "start",
        "blog_test_workflow",
        "--execution-id",
        "twice",
        "--state-machine",
        world.state_machine(),
    ]);
    assert_eq!(out.status.code(), Some(65), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already used"));

    // An input with only workflow_id (what the scheduled start sends) runs under the
    // execution's name.
    aws_sdk_sfn::Client::new(&world.sdk)
        .start_execution()
        .state_machine_arn(world.state_machine())
        .name("scheduled_1")
        .input(json!({"workflow_id": "blog_test_workflow"}).to_string())
        .send()
        .await
        .unwrap();
    eventually("a workflow audit item for scheduled_1", WAIT, || async {
        aws_sdk_dynamodb::Client::new(&world.sdk)
            .get_item()
            .table_name(world.workflow_table())
            .key(
                "workflow_execution_id",
                AttributeValue::S("scheduled_1".into()),
            )
            .key(
                "workflow_id",
                AttributeValue::S("blog_test_workflow".into()),
            )
            .send()
            .await
            .unwrap()
            .item
    })
    .await;
}

/// A workflow config of `stages` (`"parallel"` or `"sequential"`, scripts), in `dir`.
fn workflow_file(dir: &Path, workflow_id: &str, stages: &[(&str, &[String])]) -> PathBuf {
    let config = json!({
        "workflow_id": workflow_id,
        "workflow_description": "queue-wait test",
        "workflow_stages": stages.iter().enumerate().map(|(i, (kind, scripts))| json!({
            "execution_flag": "y",
            "execution_type": kind,
            "stage_description": format!("stage {}", i + 1),
            "scripts": scripts,
        })).collect::<Vec<_>>(),
    });
    let path = dir.join(format!("{workflow_id}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// A job that notes `<execution id> <job name>` in `starts` when it starts, then sleeps.
fn counting_job(world: &World, name: &str, starts: &Path, seconds: u32) -> String {
    write_script(
        &world.scripts,
        name,
        &format!(
            "echo \"$RSQL_WORKFLOW_EXECUTION_ID $RSQL_JOB_NAME\" >> '{}'\nsleep {seconds}",
            starts.display()
        ),
    );
    name.to_string()
}

/// How often each `<execution id> <job name>` started.
fn start_counts(starts: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(starts).unwrap_or_default().lines() {
        *counts.entry(line.to_string()).or_insert(0) += 1;
    }
    counts
}

/// How many tasks the execution scheduled for each job (a retry schedules another).
async fn tasks_per_job(world: &World, arn: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in moto::execution_history(&world.sdk, arn).await {
        if let Some(p) = event
            .task_scheduled_event_details()
            .and_then(|d| serde_json::from_str::<Value>(d.parameters()).ok())
        {
            if let Some(job) = p["MessageBody"]["job_name"].as_str() {
                *counts.entry(job.to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_wider_than_the_fleet_waits_for_slots_and_runs_each_job_once() {
    let world = world().await;
    let marks = tempfile::tempdir().unwrap();
    let starts = marks.path().join("starts");
    // Five 9 s jobs on two one-slot agents: the last one waits 18 s in the queue, six
    // times the heartbeat period. The ideal is three rounds: 27 s.
    let jobs: Vec<String> = (1..=5)
        .map(|i| counting_job(&world, &format!("wide_{i}.sh"), &starts, 9))
        .collect();
    let file = workflow_file(marks.path(), "wide_workflow", &[("parallel", &jobs)]);
    let agents = [
        fleet_agent(&world, "i-0wide-a", 1),
        fleet_agent(&world, "i-0wide-b", 1),
    ];
    world.put_config(&file);
    let arn = world.workflow_start("wide_workflow", "wide_1");
    let out = wait_done(&world, &arn, &agents.iter().collect::<Vec<_>>()).await;
    assert_eq!(
        *out.status(),
        ExecutionStatus::Succeeded,
        "{:?} {:?}\n{}",
        out.error(),
        out.cause(),
        logs(&agents.iter().collect::<Vec<_>>())
    );
    // Each job started exactly once, and no task timed out and was retried.
    let counts = start_counts(&starts);
    for job in &jobs {
        assert_eq!(counts.get(&format!("wide_1 {job}")), Some(&1), "{counts:?}");
    }
    assert_eq!(counts.len(), jobs.len(), "{counts:?}");
    let tasks = tasks_per_job(&world, &arn).await;
    assert!(tasks.values().all(|n| *n == 1), "retries: {tasks:?}");
    // End to end within 15 % of the ideal three rounds.
    let took = out
        .stop_date()
        .and_then(|stop| {
            let start = out.start_date();
            Some(Duration::from_millis(
                (stop.to_millis().ok()? - start.to_millis().ok()?) as u64,
            ))
        })
        .expect("start and stop dates");
    let ideal = Duration::from_secs(27);
    eprintln!("the wide stage took {took:?} end to end (ideal {ideal:?})");
    assert!(
        took <= ideal.mul_f64(1.15),
        "took {took:?}, ideal {ideal:?}\n{}",
        logs(&agents.iter().collect::<Vec<_>>())
    );
    // Every job was audited completed.
    for job in &jobs {
        let item = world.audit_item(job, "wide_1").await.expect("audit item");
        assert_eq!(s(&item, "execution_status"), "completed", "{item:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_overlapping_workflows_on_one_fleet_run_every_job_once() {
    let world = world().await;
    let marks = tempfile::tempdir().unwrap();
    let starts = marks.path().join("starts");
    let jobs = |prefix: &str, range: std::ops::RangeInclusive<u32>| -> Vec<String> {
        range
            .map(|i| counting_job(&world, &format!("{prefix}_{i}.sh"), &starts, 2 + i % 2))
            .collect()
    };
    let workflows = [
        (
            "night_a",
            vec![
                ("sequential", jobs("a", 1..=2)),
                ("parallel", jobs("a", 3..=6)),
            ],
        ),
        (
            "night_b",
            vec![
                ("parallel", jobs("b", 1..=6)),
                ("sequential", jobs("b", 7..=7)),
            ],
        ),
        (
            "night_c",
            vec![
                ("parallel", jobs("c", 1..=4)),
                ("parallel", jobs("c", 5..=7)),
            ],
        ),
    ];
    let agents = [
        fleet_agent(&world, "i-0night-a", 2),
        fleet_agent(&world, "i-0night-b", 2),
    ];
    let mut expected = BTreeSet::new();
    let mut executions = Vec::new();
    for (i, (id, stages)) in workflows.iter().enumerate() {
        let stages: Vec<(&str, &[String])> =
            stages.iter().map(|(k, s)| (*k, s.as_slice())).collect();
        world.put_config(&workflow_file(marks.path(), id, &stages));
        let execution = format!("{id}_run");
        for (_, scripts) in &stages {
            for job in *scripts {
                expected.insert(format!("{execution} {job}"));
            }
        }
        // Overlapping starts: the second and third arrive once a job of the one before has
        // started, while it is running.
        if let Some(previous) = i.checked_sub(1).map(|p| format!("{}_run ", workflows[p].0)) {
            let what = format!("a job of {previous}to start");
            wait_until(&what, WAIT, || {
                std::fs::read_to_string(&starts)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with(&previous))
            });
        }
        executions.push(world.workflow_start(id, &execution));
    }
    assert_eq!(expected.len(), 20);
    for arn in &executions {
        let out = wait_done(&world, arn, &agents.iter().collect::<Vec<_>>()).await;
        assert_eq!(
            *out.status(),
            ExecutionStatus::Succeeded,
            "{arn}: {:?} {:?}\n{}",
            out.error(),
            out.cause(),
            logs(&agents.iter().collect::<Vec<_>>())
        );
        let tasks = tasks_per_job(&world, arn).await;
        assert!(tasks.values().all(|n| *n == 1), "{arn} retried: {tasks:?}");
    }
    let counts = start_counts(&starts);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs that ran twice: {twice:?}");
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "every job ran, and nothing else"
    );
    // Both agents took part.
    for agent in &agents {
        assert!(
            agent.log().contains("job started"),
            "{} ran nothing:\n{}",
            agent.config.instance_id,
            agent.log()
        );
    }
}
