//! The embedded default end to end: `rsql-agent workflow run` with real processes, the
//! `rsql` stand-in and a real PostgreSQL.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rsql_agent_tests::bins;
use rsql_agent_tests::pg::TestPg;
use serde_json::Value;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    scripts: PathBuf,
    config: PathBuf,
    state: PathBuf,
}

/// A private copy of the sample scripts plus a config that points at `pg`.
fn setup(pg: &TestPg) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let scripts = root.join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).unwrap();
    rsql_agent_tests::agent::copy_sample_scripts(&scripts);
    let state = root.join("state");
    let config = root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{state}\"\nmax_concurrent_jobs = 4\n\
             [jobs]\nscript_dir = \"{scripts}\"\nlog_dir = \"{state}/jobs\"\ndefault_timeout = \"2m\"\nkill_grace = \"2s\"\n\
             [database]\nhost = \"{host}\"\nport = {port}\nuser = \"{user}\"\ndbname = \"{db}\"\npassword = \"{pw}\"\n",
            state = state.display(),
            scripts = scripts.display(),
            host = pg.host(),
            port = pg.port(),
            user = pg.user(),
            db = pg.database(),
            pw = pg.password(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    Setup {
        _dir: dir,
        root,
        scripts,
        config,
        state,
    }
}

fn run_workflow(setup: &Setup, workflow: &Path, extra: &[&str]) -> Output {
    let path = format!(
        "{}:{}",
        bins::rsql_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(bins::agent())
        .args(["workflow", "run"])
        .arg(workflow)
        .arg("--config")
        .arg(&setup.config)
        .args(extra)
        .env("PATH", path)
        .output()
        .expect("run rsql-agent")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every job audit record, in order.
fn audit(setup: &Setup) -> Vec<Value> {
    let path = setup.state.join("audit/job_audit.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The last audit record of each job of one execution.
fn latest(records: &[Value], execution: &str) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for r in records {
        if r["workflow_execution_id"] == execution {
            out.insert(r["job_name"].as_str().unwrap().to_string(), r.clone());
        }
    }
    out
}

#[test]
fn blog_workflow_completes_all_six_jobs_and_writes_four_rows() {
    let pg = TestPg::start();
    let setup = setup(&pg);
    let out = run_workflow(
        &setup,
        &setup.scripts.join("blog_test_workflow.json"),
        &["--execution-id", "demo_test_26"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(pg.query_i64("SELECT count(*) FROM rsql_blog.blog_table"), 4);

    let jobs = latest(&audit(&setup), "demo_test_26");
    assert_eq!(jobs.len(), 6, "{jobs:?}");
    for (name, record) in &jobs {
        assert_eq!(record["execution_status"], "completed", "{name}: {record}");
        assert_eq!(record["exit_code"], 0, "{name}");
        assert!(record["execution_end_ts"].is_string(), "{name}");
        let log = PathBuf::from(record["log_file"].as_str().unwrap());
        assert!(
            log.starts_with(setup.state.join("jobs")),
            "{}",
            log.display()
        );
        let content = std::fs::read_to_string(&log).unwrap();
        assert!(
            content.contains(&format!("{name}: done")),
            "{name} log:\n{content}"
        );
    }
    // The summary table names every job.
    let stdout = String::from_utf8_lossy(&out.stdout);
    for n in 1..=6 {
        assert!(
            stdout.contains(&format!("rsql_blog_script_{n}.sh")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("6/6 jobs completed"), "{stdout}");

    // Stage order held: every stage-2 job started after the last stage-1 job ended.
    let end_of = |job: &str| jobs[job]["execution_end_ts"].as_str().unwrap().to_string();
    let start_of = |job: &str| {
        jobs[job]["execution_start_ts"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(start_of("rsql_blog_script_2.sh") >= end_of("rsql_blog_script_1.sh"));
    for job in ["rsql_blog_script_3.sh", "rsql_blog_script_4.sh"] {
        assert!(start_of(job) >= end_of("rsql_blog_script_2.sh"));
    }
    for job in ["rsql_blog_script_5.sh", "rsql_blog_script_6.sh"] {
        assert!(start_of(job) >= end_of("rsql_blog_script_3.sh"));
        assert!(start_of(job) >= end_of("rsql_blog_script_4.sh"));
    }
}

#[test]
fn failing_stage_two_stops_the_workflow_and_resume_reruns_only_the_rest() {
    let pg = TestPg::start();
    let setup = setup(&pg);
    // A stage-2 job that inserts into a table nobody has created yet.
    let late = setup.scripts.join("rsql_blog_script_late.sh");
    std::fs::write(
        &late,
        std::fs::read_to_string(setup.scripts.join("rsql_blog_script_fail.sh"))
            .unwrap()
            .replace("rsql_blog.no_such_table", "rsql_blog.late_table"),
    )
    .unwrap();
    std::fs::set_permissions(&late, std::fs::Permissions::from_mode(0o755)).unwrap();
    let workflow = setup.root.join("late.json");
    std::fs::write(
        &workflow,
        std::fs::read_to_string(setup.scripts.join("blog_failure_workflow.json"))
            .unwrap()
            .replace("rsql_blog_script_fail.sh", "rsql_blog_script_late.sh"),
    )
    .unwrap();

    let out = run_workflow(&setup, &workflow, &["--execution-id", "late_1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let records = audit(&setup);
    let jobs = latest(&records, "late_1");
    let failed = jobs
        .get("rsql_blog_script_late.sh")
        .unwrap_or_else(|| panic!("no audit for the late job: {jobs:?}\n{}", text(&out)));
    assert_eq!(failed["execution_status"], "failed", "{failed}");
    assert_eq!(failed["exit_code"], 31);
    assert_eq!(failed["sql_state"], "42P01", "{failed}");
    let message = failed["error_message"].as_str().unwrap();
    assert!(message.contains("Rsql.ScriptFailed"), "{message}");
    assert!(message.contains("late_table"), "{message}");
    // Stage 3 never started.
    assert!(!jobs.contains_key("rsql_blog_script_5.sh"), "{jobs:?}");
    assert!(!jobs.contains_key("rsql_blog_script_6.sh"), "{jobs:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("--resume late_1"), "{stdout}");

    pg.client()
        .batch_execute(
            "CREATE TABLE rsql_blog.late_table (id INTEGER, script_name VARCHAR(128), \
             inserted_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
        )
        .unwrap();
    let out = run_workflow(&setup, &workflow, &["--resume", "late_1"]);
    assert!(out.status.success(), "{}", text(&out));

    // Only the jobs that had not completed ran again.
    let runs_after: Vec<String> = audit(&setup)[records.len()..]
        .iter()
        .filter(|r| r["execution_status"] == "running")
        .map(|r| r["job_name"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = runs_after.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "rsql_blog_script_5.sh",
            "rsql_blog_script_6.sh",
            "rsql_blog_script_late.sh"
        ],
        "{}",
        text(&out)
    );
    let jobs = latest(&audit(&setup), "late_1");
    assert!(
        jobs.values().all(|r| r["execution_status"] == "completed"),
        "{jobs:?}"
    );
    assert_eq!(jobs["rsql_blog_script_late.sh"]["attempt"], 2);
    // Scripts 3, 5 and 6 inserted once each; the late job's row went to its own table.
    assert_eq!(pg.query_i64("SELECT count(*) FROM rsql_blog.blog_table"), 3);
    assert_eq!(pg.query_i64("SELECT count(*) FROM rsql_blog.late_table"), 1);
}

#[test]
fn disabled_stage_runs_nothing() {
    let pg = TestPg::start();
    let setup = setup(&pg);
    let workflow = setup.root.join("disabled.json");
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(setup.scripts.join("blog_test_workflow.json")).unwrap(),
    )
    .unwrap();
    config["workflow_stages"][2]["execution_flag"] = "n".into();
    std::fs::write(&workflow, config.to_string()).unwrap();
    let out = run_workflow(&setup, &workflow, &["--execution-id", "dis_1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(pg.query_i64("SELECT count(*) FROM rsql_blog.blog_table"), 2);
    let jobs = latest(&audit(&setup), "dis_1");
    assert_eq!(jobs.len(), 4);
    assert!(String::from_utf8_lossy(&out.stdout).contains("disabled"));
}

#[test]
fn unknown_script_is_refused_before_anything_runs() {
    let pg = TestPg::start();
    let setup = setup(&pg);
    let workflow = setup.root.join("typo.json");
    std::fs::write(
        &workflow,
        std::fs::read_to_string(setup.scripts.join("blog_test_workflow.json"))
            .unwrap()
            .replace("rsql_blog_script_6.sh", "rsql_blog_script_66.sh"),
    )
    .unwrap();
    let out = run_workflow(&setup, &workflow, &[]);
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rsql_blog_script_66.sh"), "{stderr}");
    assert!(stderr.contains("stage 3"), "{stderr}");
    assert!(audit(&setup).is_empty(), "nothing may run");
}

#[test]
fn demo_runs_twice_in_a_row() {
    for round in 1..=2 {
        let out = Command::new(env!("CARGO_BIN_EXE_rsql-demo"))
            .output()
            .expect("run rsql-demo");
        assert!(out.status.success(), "round {round}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("6/6 jobs completed"),
            "round {round}: {stdout}"
        );
        assert!(stdout.contains("(4 rows)"), "round {round}: {stdout}");
    }
}
