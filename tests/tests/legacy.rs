//! Drop-in migration from the replaced SSM framework, end to end: scripts in exactly that
//! framework's shape (tests/fixtures/legacy/: line 1 `source $1/get_redshift_creds.sh $2`,
//! `rsql -h $HOST -U $USER -d $DB << EOF` with no port, backticks, `\remark`,
//! `SET query_group`, `\if :ERROR <> 0` blocks; and a creds helper that calls the AWS CLI),
//! run through every path a migrating user takes, against real PostgreSQL and moto:
//! - the old invoke Lambda's exact `nohup sh +x rsql_trigger.sh '<token>' ... &` command, to
//!   the running agent, with the packaged drop-in creds helper and with the AWS CLI one;
//! - the same command with no agent on the host (standalone, or a task failed at once);
//! - `rsql-wrapper run` with the 11 legacy arguments;
//! - SQS jobs with `[jobs.legacy]` (a failing script, a CRLF script);
//! - `rsql-agent workflow run` on the blog's workflow config;
//! - `rsql-agent scripts check` on the samples, the fixtures, CRLF copies and broken scripts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sfn::types::ExecutionStatus;
use rsql_agent_tests::agent::{Agent, AgentConfig};
use rsql_agent_tests::bins;
use rsql_agent_tests::moto;
use rsql_agent_tests::pg::TestPg;
use rsql_agent_tests::world::{s, StateMachine, World, WAIT};
use serde_json::json;

/// The blog workflow's scripts, in stage order.
const SIX: [&str; 6] = [
    "rsql_blog_script_1.sh",
    "rsql_blog_script_2.sh",
    "rsql_blog_script_3.sh",
    "rsql_blog_script_4.sh",
    "rsql_blog_script_5.sh",
    "rsql_blog_script_6.sh",
];
const WORKFLOW_ID: &str = "blog_test_workflow";

fn fixtures() -> PathBuf {
    bins::workspace_root().join("tests/fixtures/legacy")
}

/// The packaged drop-in `get_redshift_creds.sh`'s folder, as a team points
/// `instance_code_dir` at it.
fn drop_in_dir() -> PathBuf {
    bins::workspace_root().join("packaging/legacy")
}

fn rows(pg: &TestPg) -> i64 {
    tokio::task::block_in_place(|| pg.query_i64("SELECT count(*) FROM rsql_blog.blog_table"))
}

/// A socket-only [`World`] with a capture queue and a one-task state machine (the test
/// plays the invoke Lambda: it takes the token from the queue) and the job audit table; and
/// what only these tests need: the database secret, PostgreSQL, a script dir holding the
/// fixture scripts, and a HOME whose `~/.aws` points the AWS CLI at moto, for the jobs.
struct Legacy {
    world: World,
    pg: TestPg,
    secret_id: String,
    home: PathBuf,
}

impl std::ops::Deref for Legacy {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl Legacy {
    async fn new() -> Legacy {
        let pg = tokio::task::block_in_place(TestPg::start);
        let world = World::builder("legacy")
            .job_table()
            .socket_only()
            .state_machine(StateMachine::Capture)
            .build()
            .await;
        // The old secrets' key spelling: the agent reads both.
        let secret_id = moto::unique_name("rsql/blog");
        aws_sdk_secretsmanager::Client::new(&world.sdk)
            .create_secret()
            .name(&secret_id)
            .secret_string(
                json!({
                    "db_user_name": pg.user(), "password": pg.password(),
                    "db_host_name": pg.host(), "port": pg.port(), "db_dbname": pg.database(),
                })
                .to_string(),
            )
            .send()
            .await
            .unwrap();

        for entry in std::fs::read_dir(fixtures().join("rsql_scripts")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), world.scripts.join(entry.file_name())).unwrap();
        }
        let home = world.dir().join("home");
        std::fs::create_dir_all(home.join(".aws")).unwrap();
        std::fs::write(
            home.join(".aws/config"),
            format!(
                "[default]\nregion = {}\nendpoint_url = {}\n",
                moto::REGION,
                world.moto.endpoint()
            ),
        )
        .unwrap();
        std::fs::write(
            home.join(".aws/credentials"),
            "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
        )
        .unwrap();
        Legacy {
            world,
            pg,
            secret_id,
            home,
        }
    }

    /// A socket-only agent with the audit table, `[database] secret_id`, and a job
    /// environment where the AWS CLI of the test venv reaches moto.
    fn config(&self) -> AgentConfig {
        let mut config = self.world.config();
        config
            .extra
            .push_str(&format!("[database]\nsecret_id = \"{}\"\n", self.secret_id));
        config.env = vec![
            ("HOME".to_string(), self.home.display().to_string()),
            ("PATH".to_string(), self.job_path()),
        ];
        config
    }

    /// The stand-in `rsql` and the venv's `aws` first.
    fn job_path(&self) -> String {
        format!(
            "{}:{}:{}",
            bins::rsql_dir().display(),
            moto::venv_dir().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// The job audit item as the old invoke Lambda wrote it before it sent the command.
    async fn lambda_audit_item(&self, job: &str, execution_id: &str, command_id: &str) {
        let s = |v: &str| AttributeValue::S(v.to_string());
        aws_sdk_dynamodb::Client::new(&self.sdk)
            .put_item()
            .table_name(self.job_table())
            .item("job_name", s(job))
            .item("workflow_execution_id", s(execution_id))
            .item("workflow_id", s(WORKFLOW_ID))
            .item("execution_status", s("triggered"))
            .item("ssm_command_id", s(command_id))
            .item("instance_id", s("i-0legacy"))
            .item("execution_start_ts", s("01-02-26-03-04-05"))
            .send()
            .await
            .unwrap();
    }

    /// The old framework's 11 arguments for `script` (an absolute path), then nothing.
    fn legacy_args(
        &self,
        token: &str,
        execution_id: &str,
        script: &str,
        code_dir: &Path,
    ) -> Vec<String> {
        vec![
            token.to_string(),
            WORKFLOW_ID.to_string(),
            execution_id.to_string(),
            self.scripts.join(script).display().to_string(),
            "i-0legacy".to_string(),
            self.secret_id.clone(),
            format!("/tmp/{script}-20260102.log"),
            self.job_table().to_string(),
            "/ops/rsql-logs/".to_string(),
            code_dir.display().to_string(),
            moto::REGION.to_string(),
        ]
    }

    /// Runs the old invoke Lambda's command through `sh -c`, as SSM's AWS-RunShellScript
    /// does: `nohup sh +x rsql_trigger.sh '<token>' ... > log 2>&1 &`. Returns the trigger's
    /// log file.
    fn invoke_command(&self, args: &[String], env: &[(String, String)]) -> PathBuf {
        let trigger = bins::workspace_root().join("packaging/rsql_trigger.sh");
        let log = self
            .dir()
            .join(format!("trigger-{}.log", moto::unique_name("t")));
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let command = format!(
            "nohup sh +x {} {} > {} 2>&1 &",
            trigger.display(),
            quoted.join(" "),
            log.display()
        );
        let status = Command::new("sh")
            .arg("-c")
            .arg(&command)
            .env("RSQL_WRAPPER", bins::wrapper())
            .env("RSQL_AGENT_SOCKET", self.socket())
            .env("HOME", &self.home)
            .env("PATH", self.job_path())
            .envs(moto::aws_env(&self.moto.endpoint()))
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .status()
            .expect("sh -c the invoke command");
        assert!(status.success(), "{command}");
        log
    }

    async fn wait_succeeded(&self, exec: &str, what: &str, log: &dyn Fn() -> String) {
        let done = self.wait_execution(exec).await;
        assert_eq!(
            *done.status(),
            ExecutionStatus::Succeeded,
            "{what}: {}",
            log()
        );
        let output = moto::execution_output(&done);
        assert_eq!(output["status"], "completed", "{what}: {output}\n{}", log());
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The six scripts through the old invoke command to a running agent, each to SUCCEEDED;
/// the Lambda's audit item keeps its `ssm_command_id`. Returns the execution id used.
async fn six_through_the_old_call(world: &Legacy, agent: &Agent, code_dir: &Path, tag: &str) {
    for (i, script) in SIX.iter().enumerate() {
        let execution_id = format!("{tag}_{i}");
        let (exec, token) = world.execution(&execution_id).await;
        world
            .lambda_audit_item(script, &execution_id, &format!("cmd-{tag}-{i}"))
            .await;
        let args = world.legacy_args(&token, &execution_id, script, code_dir);
        let trigger_log = world.invoke_command(&args, &[]);
        world
            .wait_succeeded(&exec, script, &|| {
                format!("trigger: {}\nagent: {}", read(&trigger_log), agent.log())
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_old_invoke_call_runs_the_six_scripts_with_the_drop_in_creds_and_keeps_the_command_id()
{
    let world = Legacy::new().await;
    let agent = world.start_agent(world.config());
    six_through_the_old_call(&world, &agent, &drop_in_dir(), "dropin").await;
    assert_eq!(rows(&world.pg), 4, "{}", agent.log());
    for (i, script) in SIX.iter().enumerate() {
        let item = world
            .wait_audit(script, &format!("dropin_{i}"), "completed")
            .await;
        assert_eq!(s(&item, "ssm_command_id"), format!("cmd-dropin-{i}"));
        assert_eq!(s(&item, "workflow_id"), WORKFLOW_ID);
        assert!(
            s(&item, "execution_end_ts").contains('T'),
            "ISO timestamps by default: {item:?}"
        );
    }
    let password = world.pg.password();
    assert!(
        !agent.log().contains(password),
        "the password is in the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_old_invoke_call_runs_them_with_a_creds_script_that_calls_the_aws_cli_and_a_legacy_audit(
) {
    let world = Legacy::new().await;
    let mut config = world.config();
    // The team's own helper reads the secret itself; the agent has only the address (the
    // password reaches the job only through the AWS CLI), and the old audit format.
    config.extra = format!(
        "[intake.socket]\npath = \"{}\"\nallowed_uids = [0]\n\
         [database]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ndbname = \"{}\"\n",
        world.socket().display(),
        world.pg.host(),
        world.pg.port(),
        world.pg.user(),
        world.pg.database()
    );
    config.job_table = None;
    config.extra.push_str(&format!(
        "[report.audit]\njob_table = \"{}\"\nformat = \"legacy\"\n",
        world.job_table()
    ));
    let agent = world.start_agent(config);
    six_through_the_old_call(&world, &agent, &fixtures().join("aws_cli"), "cli").await;
    assert_eq!(rows(&world.pg), 4, "{}", agent.log());
    let old_ts = |ts: &str| {
        let parts: Vec<&str> = ts.split('-').collect();
        parts.len() == 6
            && parts
                .iter()
                .all(|p| p.len() == 2 && p.parse::<u8>().is_ok())
    };
    for (i, script) in SIX.iter().enumerate() {
        let item = world
            .wait_audit(script, &format!("cli_{i}"), "successful")
            .await;
        assert_eq!(s(&item, "ssm_command_id"), format!("cmd-cli-{i}"));
        assert!(old_ts(&s(&item, "execution_start_ts")), "{item:?}");
        assert!(old_ts(&s(&item, "execution_end_ts")), "{item:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_agent_the_old_call_runs_the_job_standalone_or_fails_the_task_at_once() {
    let world = Legacy::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = world.config().write(dir.path());
    let standalone = [(
        "RSQL_AGENT_CONFIG".to_string(),
        config.display().to_string(),
    )];
    for (i, script) in SIX.iter().enumerate() {
        let execution_id = format!("alone_{i}");
        let (exec, token) = world.execution(&execution_id).await;
        let args = world.legacy_args(&token, &execution_id, script, &drop_in_dir());
        let log = world.invoke_command(&args, &standalone);
        world.wait_succeeded(&exec, script, &|| read(&log)).await;
        assert!(
            read(&log).contains("running the job here"),
            "{}",
            read(&log)
        );
    }
    assert_eq!(rows(&world.pg), 4);

    // Nothing can run here (no config): the task fails within seconds, never waits for its
    // timeout.
    let (exec, token) = world.execution("alone_nothing").await;
    let args = world.legacy_args(&token, "alone_nothing", SIX[0], &drop_in_dir());
    let started = Instant::now();
    let missing = [(
        "RSQL_AGENT_CONFIG".to_string(),
        dir.path().join("none.toml").display().to_string(),
    )];
    let log = world.invoke_command(&args, &missing);
    let done = world.wait_execution(&exec).await;
    let (error, cause) = moto::caught_error(&done);
    assert_eq!(error, "Rsql.Interrupted", "{}", read(&log));
    assert!(
        cause["message"]
            .as_str()
            .unwrap_or_default()
            .contains("none.toml"),
        "{cause}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrapper_run_takes_the_eleven_arguments() {
    let world = Legacy::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = world.config().write(dir.path());
    for (i, script) in SIX.iter().enumerate() {
        let execution_id = format!("run_{i}");
        let (exec, token) = world.execution(&execution_id).await;
        let out = Command::new(bins::wrapper())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(world.legacy_args(&token, &execution_id, script, &drop_in_dir()))
            .envs(moto::aws_env(&world.moto.endpoint()))
            .env("PATH", world.job_path())
            .stdin(Stdio::null())
            .output()
            .expect("rsql-wrapper run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{text}");
        world.wait_succeeded(&exec, script, &|| text.clone()).await;
    }
    assert_eq!(rows(&world.pg), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn workflow_run_on_the_blog_config_resolves_the_secret_and_gives_the_legacy_arguments() {
    let world = Legacy::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = world.config();
    // No port anywhere but in the secret: the run must have read it.
    config.extra.push_str(&format!(
        "[jobs.legacy]\ninstance_code_dir = \"{}\"\n",
        drop_in_dir().display()
    ));
    let (config_path, _, _) = config.write(dir.path());
    let out = Command::new(bins::agent())
        .args(["workflow", "run"])
        .arg(world.scripts.join("blog_test_workflow.json"))
        .arg("--config")
        .arg(&config_path)
        .args(["--execution-id", "wf_legacy_1"])
        .envs(moto::aws_env(&world.moto.endpoint()))
        .env("PATH", world.job_path())
        .env_remove("RSQL_PORT")
        .stdin(Stdio::null())
        .output()
        .expect("rsql-agent workflow run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("6/6"), "{stdout}");
    assert_eq!(rows(&world.pg), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqs_jobs_get_the_legacy_arguments_a_failure_keeps_its_sql_state_and_crlf_is_refused() {
    let world = Legacy::new().await;
    let queue = moto::create_queue(&world.sdk, &moto::unique_name("jobs")).await;
    let mut config = world.config();
    config.queue_url = queue.clone();
    config.extra.push_str(&format!(
        "[jobs.legacy]\ninstance_code_dir = \"{}\"\nworkflows = [\"{WORKFLOW_ID}\"]\n",
        drop_in_dir().display()
    ));
    // A copy with the line endings the old repository has.
    let dos = std::fs::read_to_string(world.scripts.join(SIX[0]))
        .unwrap()
        .replace('\n', "\r\n");
    std::fs::write(world.scripts.join("crlf_script_1.sh"), dos).unwrap();
    let agent = Agent::start(config, &world.moto.endpoint());
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": WORKFLOW_ID,
        "workflow_execution_id.$": "$.execution_id",
        "job_name.$": "$.job_name"
    });
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("sqs-legacy"),
        &moto::JobTask::new(&queue, body, 60).definition(),
    )
    .await;
    let run = |execution_id: &'static str, job: &'static str| {
        let input = json!({"execution_id": execution_id, "job_name": job}).to_string();
        let sdk = world.sdk.clone();
        let sm = sm.clone();
        async move {
            let exec = moto::start_execution(&sdk, &sm, &input).await;
            moto::wait_execution(&sdk, &exec, WAIT).await
        }
    };
    for (script, execution_id) in [(SIX[0], "sqs_1"), (SIX[1], "sqs_2")] {
        let done = run(execution_id, script).await;
        assert_eq!(
            *done.status(),
            ExecutionStatus::Succeeded,
            "{}",
            agent.log()
        );
        let output = moto::execution_output(&done);
        assert_eq!(output["status"], "completed", "{output}\n{}", agent.log());
    }

    let failed = run("sqs_fail", "rsql_blog_script_fail.sh").await;
    let (error, cause) = moto::caught_error(&failed);
    assert_eq!(error, "Rsql.ScriptFailed", "{cause}\n{}", agent.log());
    assert_eq!(cause["sql_state"], "42P01", "{cause}");
    assert_eq!(cause["exit_code"], 21, "{cause}");

    let refused = run("sqs_crlf", "crlf_script_1.sh").await;
    let (error, cause) = moto::caught_error(&refused);
    assert_eq!(error, "Rsql.InvalidJob", "{cause}");
    let message = cause["message"].as_str().unwrap_or_default();
    assert!(message.contains("CRLF"), "{cause}");
    assert!(message.contains("numeric argument required"), "{cause}");
}

fn scripts_check(dir: &Path, config: Option<&Path>) -> (i32, String) {
    let mut command = Command::new(bins::agent());
    command.args(["scripts", "check"]).arg(dir);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let out = command.output().expect("rsql-agent scripts check");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn scripts_check_finds_what_would_fail_and_passes_what_would_run() {
    // The six samples run as they are.
    let (code, out) = scripts_check(&bins::workspace_root().join("rsql_scripts"), None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 error(s)"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).unwrap();
    for script in SIX {
        std::fs::copy(
            fixtures().join("rsql_scripts").join(script),
            scripts.join(script),
        )
        .unwrap();
    }
    // Legacy scripts with no legacy arguments configured: line 1 of each is named.
    let (code, out) = scripts_check(&scripts, None);
    assert_eq!(code, 1, "{out}");
    for script in SIX {
        assert!(
            out.contains(&format!(
                "{script}:1: error: sources $1/get_redshift_creds.sh"
            )),
            "{out}"
        );
    }
    // With [jobs.legacy] pointing at the drop-in, they pass.
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[jobs]\nscript_dir = \"{}\"\n[jobs.legacy]\ninstance_code_dir = \"{}\"\n",
            scripts.display(),
            drop_in_dir().display()
        ),
    )
    .unwrap();
    let (code, out) = scripts_check(&scripts, Some(&config));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("6 script(s) checked"), "{out}");

    // CRLF copies, as the old repository holds them.
    for script in SIX {
        let text = std::fs::read_to_string(scripts.join(script)).unwrap();
        std::fs::write(
            scripts.join(script.replace(".sh", "_crlf.sh")),
            text.replace('\n', "\r\n"),
        )
        .unwrap();
    }
    let (code, out) = scripts_check(&scripts, Some(&config));
    assert_eq!(code, 1, "{out}");
    for script in SIX {
        let crlf = script.replace(".sh", "_crlf.sh");
        assert!(
            out.contains(&format!("{crlf}:1: error: CRLF line ending")),
            "{out}"
        );
    }
    assert!(out.contains("sed -i"), "{out}");

    // The broken ones: one finding each, where it is.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for entry in std::fs::read_dir(fixtures().join("broken")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), broken.join(entry.file_name())).unwrap();
    }
    let mode = |name: &str, mode: u32| {
        std::fs::set_permissions(broken.join(name), std::fs::Permissions::from_mode(mode)).unwrap()
    };
    mode("not_runnable.sh", 0o644);
    mode("missing_interpreter.sh", 0o755);
    let (code, out) = scripts_check(&broken, None);
    assert_eq!(code, 1, "{out}");
    for expected in [
        "missing_interpreter.sh:1: error: the shebang's interpreter /opt/ksh93/bin/ksh is missing",
        "not_runnable.sh: error: not executable, so the agent runs it with [jobs] interpreter /bin/bash, but its shebang asks for python3",
        "reserved_exit.sh:8: error: \\exit 137 collides with",
        "unknown_command.sh:4: warning: \\gset is not a command the local rsql stand-in knows",
        "needs_legacy.sh:1: error: sources $1/get_redshift_creds.sh",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }
}

#[test]
fn the_drop_in_creds_helper_maps_the_agents_variables_and_refuses_another_secret() {
    let source = |secret: &str, resolved: Option<&str>| {
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg("source \"$1\"/get_redshift_creds.sh \"$2\" && echo \"$HOST $PORT $USER $DB\" && bash -c 'echo \"$RSPASSWORD\"'")
            .arg("job")
            .arg(drop_in_dir())
            .arg(secret)
            .envs([
                ("RSQL_HOST", "cluster.example"),
                ("RSQL_PORT", "5439"),
                ("RSQL_USER", "etl"),
                ("RSQL_DB", "dev"),
                ("RSPASSWORD", "pw-from-agent"),
            ]);
        if let Some(resolved) = resolved {
            command.env("RSQL_SECRET_ID", resolved);
        }
        let out = command.output().expect("bash");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = source("rsql/blog", Some("rsql/blog"));
    assert!(ok, "{stderr}");
    // Exported, so that rsql (a child) sees the password.
    assert_eq!(stdout, "cluster.example 5439 etl dev\npw-from-agent\n");
    let (ok, _, _) = source("any", None);
    assert!(ok, "static [database] settings serve any secret id");
    let (ok, stdout, stderr) = source("rsql/other", Some("rsql/blog"));
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("rsql/other"), "{stderr}");
    assert!(stderr.contains("[database] secret_id"), "{stderr}");
}
