//! `rsql-agent workflow report`: the timeline of one execution, as a person sees it.
//!
//! Real executions make the reports: the local `workflow run` of the sample workflows on a
//! real PostgreSQL with the `rsql` stand-in, and the generic state machine
//! (`packaging/aws/workflow.asl.json`, substituted) on the AWS emulator with two real
//! agents. Headless Chromium renders every HTML report to a PNG and dumps the DOM it built;
//! the tests check that DOM (a row per job in stage order, colours per status as the legend
//! says, titles with instance, exit code, `sql_state` and log, queue waits that match the
//! sources) and that the text view lists the same attempts.
//!
//! Set `RSQL_REPORT_DIR` to keep the reports and screenshots there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use rsql_agent_tests::agent::{copy_sample_scripts, script_dir, Agent, AgentConfig};
use rsql_agent_tests::bins;
use rsql_agent_tests::chromium::{self, Element};
use rsql_agent_tests::moto;
use rsql_agent_tests::pg::TestPg;
use rsql_agent_tests::world::{s, show, Item, StateMachine, World};
use serde_json::Value;

const BLOG: [(usize, &str); 6] = [
    (1, "rsql_blog_script_1.sh"),
    (1, "rsql_blog_script_2.sh"),
    (2, "rsql_blog_script_3.sh"),
    (2, "rsql_blog_script_4.sh"),
    (3, "rsql_blog_script_5.sh"),
    (3, "rsql_blog_script_6.sh"),
];

fn agent_cli(args: &[&str], env: &[(String, String)]) -> Output {
    let path = format!(
        "{}:{}",
        bins::rsql_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(bins::agent())
        .args(args)
        .envs(env.iter().cloned())
        .env("PATH", path)
        .output()
        .expect("run rsql-agent")
}

/// What the browser made of one report.
struct Rendered {
    dom: String,
    jobs: Vec<Element>,
    bars: Vec<Element>,
    waits: Vec<Element>,
    legend: Vec<Element>,
}

impl Rendered {
    /// The legend's colour for a status (and error name).
    fn legend_colour(&self, status: &str, error: &str) -> String {
        self.legend
            .iter()
            .find(|l| l.attr("data-status") == status && l.attr("data-error") == error)
            .unwrap_or_else(|| panic!("no legend entry for {status} {error}: {:?}", self.legend))
            .attr("data-colour")
            .to_string()
    }

    fn bars_of(&self, job: &str) -> Vec<&Element> {
        self.bars
            .iter()
            .filter(|b| b.attr("data-job") == job)
            .collect()
    }

    fn wait_ms(&self, job: &str) -> i64 {
        self.waits
            .iter()
            .filter(|w| w.attr("data-job") == job)
            .map(|w| w.attr("data-wait-ms").parse::<i64>().unwrap())
            .sum()
    }
}

/// Renders `html` in Chromium: a screenshot (checked to be a real, sizeable PNG) and the DOM.
fn render(html: &Path, name: &str) -> Rendered {
    let png = html.with_extension("png");
    let (w, h) = chromium::screenshot(html, &png, 1280, 900);
    assert_eq!((w, h), (1280, 900), "screenshot size");
    let size = std::fs::metadata(&png).unwrap().len();
    // A blank page of this size compresses to a few KB; a chart with text and bars does not.
    assert!(size > 20_000, "{} is only {size} bytes", png.display());
    if let Some(dir) = std::env::var_os("RSQL_REPORT_DIR") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(html, dir.join(format!("{name}.html"))).unwrap();
        std::fs::copy(&png, dir.join(format!("{name}.png"))).unwrap();
    }
    let dom = chromium::dump_dom(html);
    Rendered {
        jobs: chromium::elements(&dom, "g", "job"),
        bars: chromium::elements(&dom, "rect", "bar"),
        waits: chromium::elements(&dom, "rect", "queue-wait"),
        legend: chromium::elements(&dom, "li", "legend-item"),
        dom,
    }
}

/// The rows of the text view that belong to `job` (one per attempt).
fn text_rows<'a>(text: &'a str, job: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(job))
        .collect()
}

/// The jobs' rows in the DOM, as (stage, job), in document order.
fn job_order(r: &Rendered) -> Vec<(usize, String)> {
    r.jobs
        .iter()
        .map(|j| {
            (
                j.attr("data-stage").parse().unwrap(),
                j.attr("data-job").to_string(),
            )
        })
        .collect()
}

fn expected_order(jobs: &[(usize, &str)]) -> Vec<(usize, String)> {
    jobs.iter().map(|(s, j)| (*s, j.to_string())).collect()
}

// --- local `workflow run` -----------------------------------------------------------------

struct Local {
    _dir: tempfile::TempDir,
    _scripts_dir: tempfile::TempDir,
    scripts: PathBuf,
    config: PathBuf,
    state: PathBuf,
    out: PathBuf,
}

/// A local agent config on `pg` with one slot, so the second job of each parallel stage
/// waits for the first: the queue waits are real.
fn local(pg: &TestPg) -> Local {
    let (scripts_dir, scripts) = script_dir();
    copy_sample_scripts(&scripts);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new("", &scripts).database(pg);
    config.max_concurrent_jobs = 1;
    let (config_path, state, _) = config.write(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    Local {
        _dir: dir,
        _scripts_dir: scripts_dir,
        scripts,
        config: config_path,
        state,
        out,
    }
}

impl Local {
    fn run(&self, workflow: &str, execution_id: &str) -> Output {
        agent_cli(
            &[
                "workflow",
                "run",
                self.scripts.join(workflow).to_str().unwrap(),
                "--config",
                self.config.to_str().unwrap(),
                "--execution-id",
                execution_id,
            ],
            &[],
        )
    }

    fn report(&self, execution_id: &str, format: &str) -> PathBuf {
        let file = self.out.join(format!("{execution_id}.{format}"));
        let out = agent_cli(
            &[
                "workflow",
                "report",
                execution_id,
                "--config",
                self.config.to_str().unwrap(),
                "--format",
                format,
                "-o",
                file.to_str().unwrap(),
            ],
            &[],
        );
        assert!(out.status.success(), "workflow report: {}", show(&out));
        file
    }

    /// The final audit record of each job of one execution.
    fn audit(&self, execution_id: &str) -> HashMap<String, Value> {
        let text = std::fs::read_to_string(self.state.join("audit/job_audit.jsonl")).unwrap();
        let mut out = HashMap::new();
        for line in text.lines() {
            let r: Value = serde_json::from_str(line).unwrap();
            if r["workflow_execution_id"] == execution_id && r["execution_status"] != "running" {
                out.insert(r["job_name"].as_str().unwrap().to_string(), r);
            }
        }
        out
    }
}

fn ts(v: &Value) -> i64 {
    rsql_agent::workflow::report::parse_ts(v.as_str().unwrap()).unwrap()
}

/// Of two jobs of a one-slot parallel stage, the one that ran second waited at least the
/// first one's whole run.
fn assert_second_waited_for_first(r: &Rendered, audit: &HashMap<String, Value>, pair: [&str; 2]) {
    let (first, second) =
        if ts(&audit[pair[0]]["execution_start_ts"]) <= ts(&audit[pair[1]]["execution_start_ts"]) {
            (pair[0], pair[1])
        } else {
            (pair[1], pair[0])
        };
    let first_run = ts(&audit[first]["execution_end_ts"]) - ts(&audit[first]["execution_start_ts"]);
    let waited = r.wait_ms(second);
    assert!(
        waited >= first_run,
        "{second} waited {waited} ms for the slot {first} held for {first_run} ms"
    );
}

#[test]
fn blog_workflow_report_shows_every_job_its_wait_and_renders_in_chromium() {
    let pg = TestPg::start();
    let local = local(&pg);
    let run = local.run("blog_test_workflow.json", "blog_report_1");
    assert!(run.status.success(), "workflow run: {}", show(&run));
    let audit = local.audit("blog_report_1");

    let html = local.report("blog_report_1", "html");
    let r = render(&html, "blog-local");

    // One row per job, grouped by stage, in config order.
    assert_eq!(job_order(&r), expected_order(&BLOG), "{}", r.dom.len());
    // Every job completed, once, in the legend's colour for completed.
    let completed = r.legend_colour("completed", "");
    assert_eq!(r.bars.len(), 6);
    for (_, job) in BLOG {
        let bars = r.bars_of(job);
        assert_eq!(bars.len(), 1, "{job}");
        let bar = bars[0];
        assert_eq!(bar.attr("data-status"), "completed", "{job}");
        assert_eq!(bar.attr("fill"), completed, "{job}");
        // The hover text: instance, exit code, duration and the log file of the audit.
        let title = bar.title();
        let record = &audit[job];
        for needle in [
            format!("instance: {}", record["instance_id"].as_str().unwrap()),
            "exit code: 0".to_string(),
            "sql_state: -".to_string(),
            format!("log: {}", record["log_file"].as_str().unwrap()),
            "duration: ".to_string(),
        ] {
            assert!(
                title.contains(&needle),
                "{job}: {needle:?} not in {title:?}"
            );
        }
    }
    // One slot: the second job of each parallel stage waited for the first.
    assert_second_waited_for_first(
        &r,
        &audit,
        ["rsql_blog_script_3.sh", "rsql_blog_script_4.sh"],
    );
    assert_second_waited_for_first(
        &r,
        &audit,
        ["rsql_blog_script_5.sh", "rsql_blog_script_6.sh"],
    );
    // The header: the workflow, its status and a critical path through every stage.
    assert!(r.dom.contains("blog_test_workflow"));
    assert!(r.dom.contains("data-execution-status=\"completed\""));
    let critical: Vec<&Element> = r
        .jobs
        .iter()
        .filter(|j| j.attr("data-critical") == "true")
        .collect();
    let stages: Vec<&str> = critical.iter().map(|j| j.attr("data-stage")).collect();
    assert_eq!(stages, ["1", "1", "2", "3"], "{critical:?}");
    assert_eq!(
        chromium::elements(&r.dom, "line", "stage-boundary").len(),
        3,
        "a boundary per stage"
    );

    // The text view lists the same attempts.
    let text = std::fs::read_to_string(local.report("blog_report_1", "text")).unwrap();
    for (_, job) in BLOG {
        let rows = text_rows(&text, job);
        assert_eq!(rows.len(), 1, "{job} in\n{text}");
        assert!(rows[0].contains("completed"), "{}", rows[0]);
    }
    assert!(text.contains("blog_report_1: completed"), "{text}");
    assert!(
        text.contains("critical path: rsql_blog_script_1.sh -> rsql_blog_script_2.sh"),
        "{text}"
    );
}

#[test]
fn failing_workflow_report_shows_the_failure_in_its_colour_and_what_never_ran() {
    let pg = TestPg::start();
    let local = local(&pg);
    let run = local.run("blog_failure_workflow.json", "blog_report_fail");
    assert!(
        !run.status.success(),
        "the failing workflow succeeded: {}",
        show(&run)
    );
    let audit = local.audit("blog_report_fail");
    let failed = &audit["rsql_blog_script_fail.sh"];
    assert_eq!(failed["sql_state"], "42P01", "{failed}");

    let html = local.report("blog_report_fail", "html");
    let r = render(&html, "failure-local");
    let jobs = [
        (1, "rsql_blog_script_1.sh"),
        (1, "rsql_blog_script_2.sh"),
        (2, "rsql_blog_script_3.sh"),
        (2, "rsql_blog_script_fail.sh"),
        (3, "rsql_blog_script_5.sh"),
        (3, "rsql_blog_script_6.sh"),
    ];
    assert_eq!(job_order(&r), expected_order(&jobs));
    let bar = r.bars_of("rsql_blog_script_fail.sh");
    assert_eq!(bar.len(), 1);
    let bar = bar[0];
    assert_eq!(bar.attr("data-status"), "failed");
    assert_eq!(bar.attr("data-error"), "Rsql.ScriptFailed");
    let red = r.legend_colour("failed", "Rsql.ScriptFailed");
    assert_eq!(bar.attr("fill"), red);
    assert_ne!(red, r.legend_colour("completed", ""));
    let title = bar.title();
    for needle in [
        "sql_state: 42P01".to_string(),
        format!("exit code: {}", failed["exit_code"]),
        format!("log: {}", failed["log_file"].as_str().unwrap()),
    ] {
        assert!(title.contains(&needle), "{needle:?} not in {title:?}");
    }
    // Stage 3 never ran: its rows are there, with no bar.
    for job in ["rsql_blog_script_5.sh", "rsql_blog_script_6.sh"] {
        let row = r.jobs.iter().find(|j| j.attr("data-job") == job).unwrap();
        assert_eq!(row.attr("data-attempts"), "0", "{job}");
        assert!(r.bars_of(job).is_empty(), "{job}");
    }
    assert!(r.dom.contains("data-execution-status=\"failed\""));
    let error = chromium::elements(&r.dom, "p", "error");
    assert!(
        error.len() == 1 && error[0].inner.contains("Rsql.ScriptFailed"),
        "the header names the error: {error:?}"
    );

    let text = std::fs::read_to_string(local.report("blog_report_fail", "text")).unwrap();
    let rows = text_rows(&text, "rsql_blog_script_fail.sh");
    assert_eq!(rows.len(), 1, "{text}");
    assert!(
        rows[0].contains("failed: Rsql.ScriptFailed") && rows[0].contains("42P01"),
        "{}",
        rows[0]
    );
    for job in ["rsql_blog_script_5.sh", "rsql_blog_script_6.sh"] {
        let rows = text_rows(&text, job);
        assert!(
            rows.len() == 1 && rows[0].contains("not run"),
            "{job} in\n{text}"
        );
    }
}

#[test]
fn report_of_an_unknown_local_execution_says_so() {
    let pg = TestPg::start();
    let local = local(&pg);
    let out = agent_cli(
        &[
            "workflow",
            "report",
            "no_such_execution",
            "--config",
            local.config.to_str().unwrap(),
            "-o",
            local.out.join("x.html").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(69), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"no_such_execution\" is not in the local audit"),
        "{stderr}"
    );
    assert!(!local.out.join("x.html").exists());
}

// --- the state machine on the AWS emulator ------------------------------------------------

/// The emulator with the generic state machine, its tables and queue, the sample jobs, a
/// log group and one lock directory for a fleet of two one-slot agents.
async fn aws_world() -> World {
    World::builder("rsql-report")
        .sample_scripts()
        .state_machine(StateMachine::Workflow {
            heartbeat_seconds: 3,
        })
        .log_group()
        .shared_locks()
        .build()
        .await
}

fn fleet_agent(aws: &World, pg: &TestPg, instance_id: &str) -> Agent {
    // The world's config: the job table, the shared lock directory, and live logs: one
    // stream per attempt, which the report names.
    aws.agent(|config| {
        *config = config.clone().database(pg);
        config.instance_id = instance_id.to_string();
        config.max_concurrent_jobs = 1;
        config.heartbeat_interval = "1s".to_string();
    })
}

/// Loads the workflow, starts it, waits for it to end; returns the execution's ARN.
async fn execute(aws: &World, workflow: &str, workflow_id: &str, execution_id: &str) -> String {
    aws.put_config(&aws.scripts.join(workflow));
    let arn = aws.workflow_start(workflow_id, execution_id);
    let done = moto::wait_execution(&aws.sdk, &arn, Duration::from_secs(180)).await;
    assert_ne!(*done.status(), ExecutionStatus::Running);
    arn
}

fn aws_report(aws: &World, execution: &str, format: &str, file: &Path) {
    let out = aws.cli(&[
        "workflow",
        "report",
        execution,
        "--state-machine",
        aws.state_machine(),
        "--job-table",
        aws.job_table(),
        "--format",
        format,
        "-o",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "workflow report: {}", show(&out));
}

async fn job_item(aws: &World, job: &str, execution_id: &str) -> Item {
    aws.audit_item(job, execution_id)
        .await
        .unwrap_or_else(|| panic!("no audit item for {job}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn blog_workflow_on_the_state_machine_report_joins_history_and_audit() {
    let pg = tokio::task::block_in_place(TestPg::start);
    let aws = aws_world().await;
    let _a = fleet_agent(&aws, &pg, "i-0report-a");
    let _b = fleet_agent(&aws, &pg, "i-0report-b");
    let arn = execute(
        &aws,
        "blog_test_workflow.json",
        "blog_test_workflow",
        "blog_report_aws",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    // By name here, by ARN for the text view below: both name the execution.
    aws_report(&aws, "blog_report_aws", "html", &html);
    let r = render(&html, "blog-aws");
    assert!(r.dom.contains("data-execution-status=\"SUCCEEDED\""));
    assert_eq!(job_order(&r), expected_order(&BLOG));

    // When each job's task was scheduled, from the history itself.
    let history = moto::execution_history(&aws.sdk, &arn).await;
    let mut scheduled: HashMap<String, i64> = HashMap::new();
    for event in &history {
        if *event.r#type() != HistoryEventType::TaskScheduled {
            continue;
        }
        let parameters: Value =
            serde_json::from_str(event.task_scheduled_event_details().unwrap().parameters())
                .unwrap();
        if let Some(job) = parameters["MessageBody"]["job_name"].as_str() {
            scheduled.insert(job.to_string(), event.timestamp().to_millis().unwrap());
        }
    }

    let completed = r.legend_colour("completed", "");
    for (_, job) in BLOG {
        let item = job_item(&aws, job, "blog_report_aws").await;
        let bars = r.bars_of(job);
        assert_eq!(bars.len(), 1, "{job}");
        assert_eq!(bars[0].attr("data-status"), "completed", "{job}");
        assert_eq!(bars[0].attr("fill"), completed, "{job}");
        let title = bars[0].title();
        assert!(!s(&item, "log_stream").is_empty(), "{item:?}");
        for needle in [
            format!("instance: {}", s(&item, "instance_id")),
            format!("log: {}", s(&item, "log_stream")),
            "exit code: 0".to_string(),
        ] {
            assert!(
                title.contains(&needle),
                "{job}: {needle:?} not in {title:?}"
            );
        }
        // The queue wait is the task's scheduling to the job's start on the instance.
        let start =
            rsql_agent::workflow::report::parse_ts(&s(&item, "execution_start_ts")).unwrap();
        assert_eq!(
            r.wait_ms(job),
            (start - scheduled[job]).max(0),
            "{job}: scheduled {} started {start}",
            scheduled[job]
        );
    }

    let text_file = dir.path().join("report.txt");
    aws_report(&aws, &arn, "text", &text_file);
    let text = std::fs::read_to_string(&text_file).unwrap();
    assert!(text.contains("blog_report_aws: SUCCEEDED"), "{text}");
    for (_, job) in BLOG {
        let rows = text_rows(&text, job);
        assert_eq!(rows.len(), 1, "{job} in\n{text}");
        assert!(
            rows[0].contains("completed") && rows[0].contains("i-0report-"),
            "{}",
            rows[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_workflow_on_the_state_machine_report_shows_the_failed_task() {
    let pg = tokio::task::block_in_place(TestPg::start);
    let aws = aws_world().await;
    let _a = fleet_agent(&aws, &pg, "i-0report-a");
    let _b = fleet_agent(&aws, &pg, "i-0report-b");
    execute(
        &aws,
        "blog_failure_workflow.json",
        "blog_failure_workflow",
        "blog_report_aws_fail",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    aws_report(&aws, "blog_report_aws_fail", "html", &html);
    let r = render(&html, "failure-aws");
    assert!(r.dom.contains("data-execution-status=\"FAILED\""));

    let item = job_item(&aws, "rsql_blog_script_fail.sh", "blog_report_aws_fail").await;
    let bars = r.bars_of("rsql_blog_script_fail.sh");
    assert_eq!(bars.len(), 1, "Rsql.ScriptFailed is not retried");
    assert_eq!(bars[0].attr("data-status"), "failed");
    assert_eq!(bars[0].attr("data-error"), "Rsql.ScriptFailed");
    assert_eq!(
        bars[0].attr("fill"),
        r.legend_colour("failed", "Rsql.ScriptFailed")
    );
    let title = bars[0].title();
    for needle in [
        "sql_state: 42P01".to_string(),
        format!("instance: {}", s(&item, "instance_id")),
        format!("log: {}", s(&item, "log_stream")),
    ] {
        assert!(title.contains(&needle), "{needle:?} not in {title:?}");
    }
    // Stage 3 never ran.
    for job in ["rsql_blog_script_5.sh", "rsql_blog_script_6.sh"] {
        assert!(r.bars_of(job).is_empty(), "{job}");
    }
    let error = chromium::elements(&r.dom, "p", "error");
    assert!(
        error.len() == 1 && error[0].inner.contains("Rsql.ScriptFailed"),
        "{error:?}"
    );

    let text_file = dir.path().join("report.txt");
    aws_report(&aws, "blog_report_aws_fail", "text", &text_file);
    let text = std::fs::read_to_string(&text_file).unwrap();
    let rows = text_rows(&text, "rsql_blog_script_fail.sh");
    assert!(
        rows.len() == 1
            && rows[0].contains("failed: Rsql.ScriptFailed")
            && rows[0].contains("42P01"),
        "{text}"
    );
    // Both views hold the same attempts.
    let text_attempts = BLOG
        .iter()
        .map(|(_, j)| *j)
        .chain(["rsql_blog_script_fail.sh"])
        .flat_map(|j| text_rows(&text, j))
        .filter(|row| !row.contains("not run"))
        .count();
    assert_eq!(text_attempts, r.bars.len(), "{text}");
}
