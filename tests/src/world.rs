//! The world a system test runs in, built in one place: the moto emulator, the job queue, a
//! script directory, the DynamoDB tables, a state machine and the agents.
//!
//! ```ignore
//! let world = World::builder("jobs").sample_scripts().job_table().build().await;
//! let agent = world.agent(|c| c.max_concurrent_jobs = 1);
//! let item = world.wait_audit("a.sh", "exec_1", "completed").await;
//! assert_eq!(s(&item, "workflow_id"), "daemon_test");
//! ```
//!
//! Every wait polls against a deadline: [`eventually`] for async probes (the AWS calls),
//! [`crate::agent::wait_until`] for sync ones, both with [`WAIT`] unless a test says
//! otherwise. Nothing here sleeps and hopes.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput;
use serde_json::{json, Value};

use crate::agent::{copy_sample_scripts, script_dir, wait_until, Agent, AgentConfig};
use crate::bins;
use crate::moto::{self, JobTask, Moto};

/// How long a system test waits for anything the agent or the emulator does (an execution
/// to end, an audit item, a log line) before it fails: generous, because a loaded two-core
/// box is slow, and only a failing test ever waits this long.
pub const WAIT: Duration = Duration::from_secs(120);

/// How often [`eventually`] asks again.
const POLL: Duration = Duration::from_millis(100);

/// A DynamoDB item as the SDK returns it.
pub type Item = HashMap<String, AttributeValue>;

/// The string attribute `key` of `item`; panics, showing the item, when it has none.
pub fn s(item: &Item, key: &str) -> String {
    attr(item, key)
        .unwrap_or_else(|| panic!("item has no string {key}: {item:?}"))
        .to_string()
}

/// The string attribute `key` of `item`, if it has one.
pub fn attr<'a>(item: &'a Item, key: &str) -> Option<&'a str> {
    item.get(key)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

/// Polls `probe` until it yields `Some` and returns that; panics naming `what` after
/// `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_with(what, timeout, || {
        let next = probe();
        async move { next.await.ok_or_else(String::new) }
    })
    .await
}

/// Polls `probe` until it yields `Ok` and returns that; panics after `timeout` naming
/// `what` and showing the last `Err` (what the probe saw instead).
pub async fn eventually_with<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}{}{seen}",
                if seen.is_empty() { "" } else { "; last seen: " }
            ),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One item of a job audit table (legacy key: `job_name` + `workflow_execution_id`), read
/// consistently; `None` while there is none.
pub async fn audit_item(
    sdk: &SdkConfig,
    table: &str,
    job: &str,
    execution_id: &str,
) -> Option<Item> {
    aws_sdk_dynamodb::Client::new(sdk)
        .get_item()
        .table_name(table)
        .key("job_name", AttributeValue::S(job.into()))
        .key(
            "workflow_execution_id",
            AttributeValue::S(execution_id.into()),
        )
        .consistent_read(true)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "GetItem {table} {job}/{execution_id}: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(&e)
            )
        })
        .item
}

/// The packaged generic state machine (`packaging/aws/workflow.asl.json`) with `${Name}`
/// replaced, as CloudFormation's DefinitionSubstitutions do; panics when one is missing.
pub fn workflow_definition(substitutions: &[(&str, &str)]) -> String {
    let path = bins::workspace_root().join("packaging/aws/workflow.asl.json");
    let mut text = std::fs::read_to_string(&path).expect("read workflow.asl.json");
    for (name, value) in substitutions {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    assert!(
        !text.contains("${"),
        "a substitution is missing: {}",
        text.lines()
            .filter(|l| l.contains("${"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    serde_json::from_str::<Value>(&text).expect("the substituted ASL is JSON");
    text
}

/// The state machine a world is built with.
#[derive(Debug, Clone)]
pub enum StateMachine {
    /// The packaged generic state machine on the job queue and the workflow tables, with
    /// this `HeartbeatSeconds` (`JobTimeoutSeconds` 120, `TaskTimeoutSlackSeconds` 60).
    Workflow { heartbeat_seconds: u64 },
    /// One caught [`JobTask`] (heartbeat 60 s) whose message, the task token and
    /// `workflow_execution_id` (the input's `execution_id`), goes to a capture queue of the
    /// test's own instead of the job queue: the test takes the token from there
    /// ([`World::execution`]) and hands the job over itself, as the invoke Lambda or SSM
    /// Run Command would.
    Capture,
}

/// What [`World::builder`] makes; see its methods.
#[derive(Debug)]
#[must_use]
pub struct WorldBuilder {
    prefix: String,
    sample_scripts: bool,
    job_table: bool,
    workflow_tables: bool,
    state_machine: Option<StateMachine>,
    log_group: bool,
    shared_locks: bool,
    socket_only: bool,
}

impl WorldBuilder {
    /// Copies the sample jobs and workflows of `rsql_scripts/` into the script directory.
    pub fn sample_scripts(mut self) -> Self {
        self.sample_scripts = true;
        self
    }

    /// A job audit table; agents report to it.
    pub fn job_table(mut self) -> Self {
        self.job_table = true;
        self
    }

    /// The workflow config table and the workflow audit table (and a job audit table).
    pub fn workflow_tables(mut self) -> Self {
        self.workflow_tables = true;
        self.job_table = true;
        self
    }

    /// A state machine made at build time (see [`StateMachine`]).
    pub fn state_machine(mut self, state_machine: StateMachine) -> Self {
        if matches!(state_machine, StateMachine::Workflow { .. }) {
            self = self.workflow_tables();
        }
        self.state_machine = Some(state_machine);
        self
    }

    /// A CloudWatch log group name of the world's own (the agents create it); agents ship
    /// their job logs there.
    pub fn log_group(mut self) -> Self {
        self.log_group = true;
        self
    }

    /// One lock directory for every agent of the world, as a fleet shares one on EFS.
    pub fn shared_locks(mut self) -> Self {
        self.shared_locks = true;
        self
    }

    /// Agents take jobs only on a Unix socket (mode 0755 directory, root allowed), not
    /// from SQS.
    pub fn socket_only(mut self) -> Self {
        self.socket_only = true;
        self
    }

    /// Starts moto and makes everything asked for.
    pub async fn build(self) -> World {
        let moto = Moto::start();
        let sdk = moto.sdk_config().await;
        let queue_url = moto::create_queue(&sdk, &moto::unique_name(&self.prefix)).await;
        let (scripts_dir, scripts) = script_dir();
        if self.sample_scripts {
            copy_sample_scripts(&scripts);
        }
        let job_table = if self.job_table {
            let table = moto::unique_name("rsql-job-audit");
            moto::create_job_audit_table(&sdk, &table).await;
            Some(table)
        } else {
            None
        };
        let (config_table, workflow_table) = if self.workflow_tables {
            let config_table = moto::unique_name("rsql-workflow-config");
            let workflow_table = moto::unique_name("rsql-workflow-audit");
            moto::create_table(&sdk, &config_table, "workflow_id", None).await;
            moto::create_table(
                &sdk,
                &workflow_table,
                "workflow_execution_id",
                Some("workflow_id"),
            )
            .await;
            (Some(config_table), Some(workflow_table))
        } else {
            (None, None)
        };
        let mut capture = None;
        let state_machine = match &self.state_machine {
            None => None,
            Some(StateMachine::Workflow { heartbeat_seconds }) => {
                let definition = workflow_definition(&[
                    ("JobQueueUrl", queue_url.as_str()),
                    ("ConfigTable", config_table.as_deref().unwrap_or_default()),
                    (
                        "WorkflowAuditTable",
                        workflow_table.as_deref().unwrap_or_default(),
                    ),
                    ("HeartbeatSeconds", &heartbeat_seconds.to_string()),
                    ("JobTimeoutSeconds", "120"),
                    ("TaskTimeoutSlackSeconds", "60"),
                ]);
                Some(
                    moto::create_state_machine(
                        &sdk,
                        &moto::unique_name("rsql-workflow"),
                        &definition,
                    )
                    .await,
                )
            }
            Some(StateMachine::Capture) => {
                let queue = moto::create_queue(&sdk, &moto::unique_name("capture")).await;
                let message_body = json!({
                    "task_token.$": "$$.Task.Token",
                    "workflow_execution_id.$": "$.execution_id"
                });
                let definition = JobTask::new(&queue, message_body, 60).definition();
                let arn =
                    moto::create_state_machine(&sdk, &moto::unique_name(&self.prefix), &definition)
                        .await;
                capture = Some(queue);
                Some(arn)
            }
        };
        let dir = tempfile::tempdir().expect("world temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod world dir");
        let locks = self.shared_locks.then(|| dir.path().join("locks"));
        if let Some(locks) = &locks {
            std::fs::create_dir(locks).expect("mkdir locks");
        }
        World {
            socket: self
                .socket_only
                .then(|| dir.path().join("run").join("agent.sock")),
            log_group: self
                .log_group
                .then(|| format!("/ops/rsql-logs/{}", moto::unique_name(&self.prefix))),
            moto,
            sdk,
            queue_url,
            scripts,
            job_table,
            config_table,
            workflow_table,
            state_machine,
            capture,
            locks,
            dir,
            _scripts_dir: scripts_dir,
        }
    }
}

/// The emulator and what a test asked for. Parts not asked for panic when a test uses them.
#[derive(Debug)]
pub struct World {
    pub moto: Moto,
    /// For the test code's own clients.
    pub sdk: SdkConfig,
    /// The job queue the agents take jobs from.
    pub queue_url: String,
    /// The script directory (mode 0755, as the agent requires).
    pub scripts: PathBuf,
    job_table: Option<String>,
    config_table: Option<String>,
    workflow_table: Option<String>,
    state_machine: Option<String>,
    capture: Option<String>,
    log_group: Option<String>,
    locks: Option<PathBuf>,
    socket: Option<PathBuf>,
    /// The world's own directory (mode 0755): locks, the socket, whatever a test puts there.
    dir: tempfile::TempDir,
    _scripts_dir: tempfile::TempDir,
}

fn part<'a, T: ?Sized>(part: &'a Option<impl AsRef<T>>, name: &str) -> &'a T {
    match part {
        Some(value) => value.as_ref(),
        None => panic!("the world was built without {name}"),
    }
}

/// A finished command's status, stdout and stderr, for assertion messages.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl World {
    /// Runs `rsql-agent ARGS` against this world's emulator, with the `rsql` stand-in on
    /// `PATH`. Blocks, off the runtime's threads (call it from a multi-thread runtime).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let path = format!(
            "{}:{}",
            bins::rsql_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        tokio::task::block_in_place(|| {
            std::process::Command::new(bins::agent())
                .args(args)
                .envs(self.moto.env())
                .env("PATH", path)
                .output()
                .expect("run rsql-agent")
        })
    }

    /// `rsql-agent workflow put-config FILE` into the world's config table.
    pub fn put_config(&self, file: &Path) {
        let file = file.to_str().expect("a UTF-8 path");
        let out = self.cli(&[
            "workflow",
            "put-config",
            file,
            "--table",
            self.config_table(),
        ]);
        assert!(out.status.success(), "put-config: {}", show(&out));
    }

    /// `rsql-agent workflow start` on the world's state machine; returns the execution ARN
    /// it prints.
    pub fn workflow_start(&self, workflow_id: &str, execution_id: &str) -> String {
        let out = self.cli(&[
            "workflow",
            "start",
            workflow_id,
            "--execution-id",
            execution_id,
            "--state-machine",
            self.state_machine(),
        ]);
        assert!(out.status.success(), "workflow start: {}", show(&out));
        let arn = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            arn.starts_with("arn:aws:states:") && arn.ends_with(&format!(":{execution_id}")),
            "workflow start printed {arn:?}"
        );
        arn
    }

    /// A world named after `prefix`: moto, a job queue and an empty script directory; the
    /// builder's methods add the rest.
    pub fn builder(prefix: &str) -> WorldBuilder {
        WorldBuilder {
            prefix: prefix.to_string(),
            sample_scripts: false,
            job_table: false,
            workflow_tables: false,
            state_machine: None,
            log_group: false,
            shared_locks: false,
            socket_only: false,
        }
    }

    /// The job audit table.
    pub fn job_table(&self) -> &str {
        part(&self.job_table, ".job_table()")
    }

    /// The workflow config table.
    pub fn config_table(&self) -> &str {
        part(&self.config_table, ".workflow_tables()")
    }

    /// The workflow audit table.
    pub fn workflow_table(&self) -> &str {
        part(&self.workflow_table, ".workflow_tables()")
    }

    /// The state machine made at build time.
    pub fn state_machine(&self) -> &str {
        part(&self.state_machine, ".state_machine(..)")
    }

    /// The log group agents ship job logs to.
    pub fn log_group(&self) -> &str {
        part(&self.log_group, ".log_group()")
    }

    /// The lock directory every agent shares.
    pub fn locks(&self) -> &Path {
        part(&self.locks, ".shared_locks()")
    }

    /// The agents' socket.
    pub fn socket(&self) -> &Path {
        part(&self.socket, ".socket_only()")
    }

    /// The world's own directory (mode 0755), removed with the world.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config of an agent of this world: the job queue (or the socket), the script
    /// directory, and the table, log group and lock directory the world has.
    pub fn config(&self) -> AgentConfig {
        let queue = if self.socket.is_some() {
            ""
        } else {
            &self.queue_url
        };
        let mut config = AgentConfig::new(queue, &self.scripts);
        config.job_table = self.job_table.clone();
        config.log_group = self.log_group.clone();
        config.lock_dir = self.locks.clone();
        if let Some(socket) = &self.socket {
            config.extra.push_str(&format!(
                "[intake.socket]\npath = \"{}\"\nallowed_uids = [0]\n",
                socket.display()
            ));
        }
        config
    }

    /// Starts an agent on [`Self::config`] as `edit` changes it; a socket-only agent is
    /// returned once its socket exists.
    pub fn agent(&self, edit: impl FnOnce(&mut AgentConfig)) -> Agent {
        let mut config = self.config();
        edit(&mut config);
        self.start_agent(config)
    }

    /// Starts an agent on `config` against moto; a socket-only agent is returned once its
    /// socket exists.
    pub fn start_agent(&self, config: AgentConfig) -> Agent {
        let agent = Agent::start(config, &self.moto.endpoint());
        if let Some(socket) = &self.socket {
            wait_until("the agent's socket", WAIT, || socket.exists());
        }
        agent
    }

    /// A caught [`JobTask`] on the job queue with this message body and heartbeat; change
    /// its fields (catch, retry, timeout) before [`Self::create_state_machine`].
    pub fn job_task(&self, message_body: Value, heartbeat_seconds: u64) -> JobTask<'_> {
        JobTask::new(&self.queue_url, message_body, heartbeat_seconds)
    }

    /// Makes a state machine named after `prefix` from `task`; returns its ARN.
    pub async fn create_state_machine(&self, prefix: &str, task: &JobTask<'_>) -> String {
        moto::create_state_machine(&self.sdk, &moto::unique_name(prefix), &task.definition()).await
    }

    /// Starts an execution of `state_machine` with `input`; returns its ARN.
    pub async fn start_execution(&self, state_machine: &str, input: Value) -> String {
        moto::start_execution(&self.sdk, state_machine, &input.to_string()).await
    }

    /// Waits (up to [`WAIT`]) until the execution is no longer RUNNING.
    pub async fn wait_execution(&self, execution_arn: &str) -> DescribeExecutionOutput {
        moto::wait_execution(&self.sdk, execution_arn, WAIT).await
    }

    /// Starts an execution of the [`StateMachine::Capture`] state machine with
    /// `{"execution_id": execution_id}` and returns it with the real task token its task
    /// sent to the capture queue. The message is deleted once read: a run longer than the
    /// queue's visibility timeout (30 s) would otherwise get it again for a later execution.
    pub async fn execution(&self, execution_id: &str) -> (String, String) {
        let capture = part(&self.capture, ".state_machine(StateMachine::Capture ..)");
        let exec = self
            .start_execution(
                self.state_machine(),
                json!({ "execution_id": execution_id }),
            )
            .await;
        let message = moto::receive_one(&self.sdk, capture, WAIT).await;
        aws_sdk_sqs::Client::new(&self.sdk)
            .delete_message()
            .queue_url(capture)
            .receipt_handle(message.receipt_handle().unwrap_or_default())
            .send()
            .await
            .expect("DeleteMessage (capture queue)");
        let sent: Value =
            serde_json::from_str(message.body().expect("a message body")).expect("JSON body");
        assert_eq!(sent["workflow_execution_id"], execution_id, "{sent}");
        let token = sent["task_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no task_token in {sent}"));
        (exec, token.to_string())
    }

    /// The job audit item of `job` in `execution_id`, if there is one now.
    pub async fn audit_item(&self, job: &str, execution_id: &str) -> Option<Item> {
        audit_item(&self.sdk, self.job_table(), job, execution_id).await
    }

    /// Waits (up to [`WAIT`]) until the job audit item's `execution_status` is `status`.
    pub async fn wait_audit(&self, job: &str, execution_id: &str, status: &str) -> Item {
        let what = format!("the audit of {job}/{execution_id} to become {status}");
        eventually_with(&what, WAIT, || async move {
            match self.audit_item(job, execution_id).await {
                Some(item) if attr(&item, "execution_status") == Some(status) => Ok(item),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }

    /// (visible, in flight) messages of the job queue.
    pub async fn queue_depth(&self) -> (i64, i64) {
        moto::queue_depth(&self.sdk, &self.queue_url).await
    }

    /// Waits (up to `timeout`) until the job queue's depth is `want`.
    pub async fn wait_queue(&self, want: (i64, i64), timeout: Duration) {
        let what = format!("the job queue's depth (visible, in flight) to be {want:?}");
        eventually_with(&what, timeout, || async move {
            let depth = self.queue_depth().await;
            if depth == want {
                Ok(())
            } else {
                Err(format!("{depth:?}"))
            }
        })
        .await
    }
}
