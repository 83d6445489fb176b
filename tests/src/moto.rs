//! The AWS emulator: a real `moto` server (pinned in `tests/moto/requirements.txt`, installed
//! by `make venv`) on a free loopback port, started through `tests/moto/launch_moto.py`, which
//! patches the moto bugs the tests would otherwise trip over (the dropped `SendTaskFailure`
//! cause, task tokens that never close, one token for every Retry attempt) and adds the two
//! Auto Scaling actions moto lacks (`CompleteLifecycleAction`, `RecordLifecycleActionHeartbeat`,
//! recorded for [`Moto::lifecycle_actions`]).
//!
//! State machines really run (`execute_state_machine` is switched on at start), so a
//! `…sqs:sendMessage.waitForTaskToken` task puts its message on a moto queue and waits for
//! `SendTaskSuccess`/`SendTaskFailure`/`SendTaskHeartbeat`, heartbeat timeouts included.
//! Use JSONPath state machines: moto's JSONata support is broken.
//!
//! Things moto does differently from AWS that tests must allow for (moto 5.2.5 as patched):
//! - a closed token (its task ended, timed out or its attempt was retried) answers
//!   `TaskDoesNotExist` while the execution runs, and `SendTaskHeartbeat`/`SendTaskSuccess`
//!   answer `InvalidToken` once the execution has ended (AWS mostly says `TaskTimedOut`);
//! - a Task with `HeartbeatSeconds` but no `TimeoutSeconds` times out after 60 s (AWS:
//!   99999999 s), so always give `TimeoutSeconds` with `HeartbeatSeconds`;
//! - all state lives in the server process: [`Moto::restart`] comes back empty.
//! - PutLogEvents accepts what AWS rejects: events over 256 KiB, batches over 1 MiB or
//!   10,000 events, empty messages, empty batches (it does reject out-of-order batches and
//!   flags events older than 14 days); SQS takes bodies up to 1 MiB and honours stale receipt
//!   handles. Check such limits on the wire with a recording [`crate::proxy::Proxy`].
//! - the server closes every HTTP connection after one response (werkzeug's dev server), so
//!   clients never reuse a pooled connection against it.
//! - Auto Scaling groups launch their instances at once, all `InService`, and never run a
//!   lifecycle hook: nothing puts an instance in `Terminating:Wait`. Any instance of the group
//!   counts as having a pending terminating action until it is completed; completing moves it
//!   to `Terminating:Proceed`, where it stays (moto never terminates it).
//!
//! The helpers at the bottom are thin, generic wrappers over the SDK that panic with the
//! service error, for test code's own calls; the agent under test makes its own calls.
//!
//! Why one file of about 950 lines: it is one handle, [`Moto`], with one helper for each
//! resource the tests make (queues, tables, state machines, log groups, the Auto Scaling
//! group); split by service, each test would import from five places to set up one world.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sfn::error::DisplayErrorContext;
use aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput;
use aws_sdk_sfn::types::{ExecutionStatus, HistoryEvent};
use aws_sdk_sqs::types::Message;

/// The region every test uses.
pub const REGION: &str = "us-east-1";
/// The account moto puts every resource in.
pub const ACCOUNT_ID: &str = "123456789012";
/// The role ARN given to state machines (moto does not check it).
pub const DUMMY_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/rsql-agent-test";

/// The launcher's test-only path listing the lifecycle action calls (see
/// `tests/moto/launch_moto.py`).
const LIFECYCLE_ACTIONS_PATH: &str = "/moto-api/rsql/lifecycle-actions";

/// One `RecordLifecycleActionHeartbeat` or `CompleteLifecycleAction` call, as the emulator
/// recorded it ([`Moto::lifecycle_actions`]).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct LifecycleActionCall {
    /// `RecordLifecycleActionHeartbeat` or `CompleteLifecycleAction`.
    pub op: String,
    pub group: Option<String>,
    pub hook: Option<String>,
    pub instance: Option<String>,
    /// `LifecycleActionResult` of a completion (`CONTINUE`, `ABANDON`), `None` for a
    /// heartbeat.
    pub result: Option<String>,
    /// When the server got it, in Unix seconds.
    pub time: f64,
    /// `None` when it was accepted; else the `ValidationError` message it was refused with.
    pub error: Option<String>,
}

impl LifecycleActionCall {
    /// When the server got it.
    pub fn at(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs_f64(self.time)
    }
}

/// How long the server may take to answer after it was spawned (python imports are slow on a
/// loaded two-core box).
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A running moto server. Dropping it kills the server and waits for it.
#[derive(Debug)]
pub struct Moto {
    port: u16,
    child: Option<Child>,
    python: PathBuf,
    launcher: PathBuf,
    log_path: PathBuf,
    /// The run's one emulator (see [`Moto::start`]): not ours to stop or restart.
    shared: bool,
    _dir: Option<tempfile::TempDir>,
}

/// Set by `rsql-with-moto` (which `make test` runs the suite under): the port of the one
/// emulator every test of the run shares, and its log.
pub const SHARED_PORT_ENV: &str = "RSQL_TEST_MOTO_PORT";
pub const SHARED_LOG_ENV: &str = "RSQL_TEST_MOTO_LOG";

impl Moto {
    /// The emulator for a test: the run's shared one when `rsql-with-moto` started one (as
    /// `make test` does: one server for the whole run instead of one per test), else a
    /// private one ([`Moto::start_private`]). Tests on a shared server keep to names of their
    /// own ([`unique_name`]), as they do on AWS.
    pub fn start() -> Moto {
        match std::env::var(SHARED_PORT_ENV)
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
        {
            Some(port) => Moto::shared(port),
            None => Moto::start_private(),
        }
    }

    fn shared(port: u16) -> Moto {
        let log_path = std::env::var_os(SHARED_LOG_ENV)
            .map(PathBuf::from)
            .unwrap_or_default();
        let mut moto = Moto {
            port,
            child: None,
            python: PathBuf::new(),
            launcher: PathBuf::new(),
            log_path,
            shared: true,
            _dir: None,
        };
        // It answered when the run began; it must still answer now.
        if let Err(e) = moto.wait_ready() {
            moto.fail(&format!("the shared emulator on port {port} is gone: {e}"));
        }
        moto
    }

    /// Starts a server of the test's own on a free loopback port and switches on state
    /// machine execution: for tests that stop or restart it, or that read everything it
    /// holds. Blocks until the server answers (a few seconds; at most a minute).
    ///
    /// Panics, naming the fix, when the virtualenv is missing, and with the tail of the
    /// server's log when it does not come up.
    pub fn start_private() -> Moto {
        let python = venv_dir().join("bin").join("python");
        assert!(
            python.exists(),
            "the AWS emulator is not installed: run `make venv` (no {})",
            python.display()
        );
        let launcher = crate::bins::workspace_root().join("tests/moto/launch_moto.py");
        assert!(launcher.exists(), "{} is missing", launcher.display());
        let dir = tempfile::Builder::new()
            .prefix("rsql-moto-")
            .tempdir()
            .expect("create a tempdir for the moto log");
        let log_path = dir.path().join("moto.log");
        let mut moto = Moto {
            port: 0,
            child: None,
            python,
            launcher,
            log_path,
            shared: false,
            _dir: Some(dir),
        };
        // A free port can be taken by someone else between our probe and moto's bind; try a
        // few ports before giving up.
        let mut last_error = String::new();
        for _ in 0..5 {
            moto.port = free_port();
            match moto.spawn() {
                Ok(()) => return moto,
                Err(e) => {
                    moto.kill();
                    if !e.contains("Address already in use") {
                        moto.fail(&e);
                    }
                    last_error = e;
                }
            }
        }
        moto.fail(&last_error)
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's address, e.g. for [`crate::proxy::Proxy::start`].
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Everything a child process (the agent, the wrapper) needs to talk to this server.
    pub fn env(&self) -> Vec<(String, String)> {
        aws_env(&self.endpoint())
    }

    /// An SDK config for test code's own clients, pointed at this server.
    pub async fn sdk_config(&self) -> SdkConfig {
        sdk_config_for(&self.endpoint()).await
    }

    /// The server's log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Every `RecordLifecycleActionHeartbeat` and `CompleteLifecycleAction` the server got,
    /// oldest first, refused ones included (their `error` says why).
    pub fn lifecycle_actions(&self) -> Vec<LifecycleActionCall> {
        match http_call(self.addr(), "GET", LIFECYCLE_ACTIONS_PATH, "") {
            Ok((200, body)) => serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("GET {LIFECYCLE_ACTIONS_PATH}: {e}: {body}")),
            other => panic!("GET {LIFECYCLE_ACTIONS_PATH}: {other:?}"),
        }
    }

    /// Polls [`Moto::lifecycle_actions`] until one with operation `op` (e.g.
    /// `CompleteLifecycleAction`) on `group` was accepted, and returns the first such; `None`
    /// after `timeout`. (Other tests' groups may share the server.)
    pub fn wait_for_lifecycle_action(
        &self,
        group: &str,
        op: &str,
        timeout: Duration,
    ) -> Option<LifecycleActionCall> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .lifecycle_actions()
                .into_iter()
                .find(|a| a.op == op && a.error.is_none() && a.group.as_deref() == Some(group));
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    /// Kills the server (SIGKILL) and waits for it: requests now fail with "connection
    /// refused". Idempotent.
    pub fn stop(&mut self) {
        self.assert_private("stop");
        self.kill();
    }

    /// Starts the server again on the same port. moto keeps everything in memory, so the new
    /// server has no queues, tables or state machines.
    pub fn restart(&mut self) {
        self.assert_private("restart");
        self.kill();
        // The old listener may linger for a moment; werkzeug binds with SO_REUSEADDR, so only
        // a port stolen meanwhile can make this fail.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if e.contains("Address already in use") && Instant::now() < deadline => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    self.kill();
                    self.fail(&format!("restart on port {}: {e}", self.port));
                }
            }
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("open {}: {e}", self.log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("dup the moto log: {e}"))?;
        let port = self.port.to_string();
        let child = Command::new(&self.python)
            .arg(&self.launcher)
            .args(["-H", "127.0.0.1", "-p", &port])
            .env("MOTO_PORT", &port)
            .env("RSQL_MOTO_PARENT_PID", std::process::id().to_string())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.python.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls until the server answers the config call, which switches on execution.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let config = r#"{"stepfunctions":{"execute_state_machine":true}}"#;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "moto exited with {status} before it answered\n{}",
                    self.log_tail(30)
                ));
            }
            match http_call(self.addr(), "POST", "/moto-api/config", config) {
                // moto stores the stepfunctions key but does not echo it back.
                Ok((201 | 200, _)) => return Ok(()),
                Ok((status, body)) => {
                    return Err(format!("POST /moto-api/config answered {status}: {body}"))
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(format!(
                        "moto did not answer on port {} within {START_DEADLINE:?}: {e}",
                        self.port
                    ))
                }
            }
        }
    }

    fn assert_private(&self, what: &str) {
        assert!(
            !self.shared,
            "a test that would {what} the emulator needs its own: use Moto::start_private()"
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn fail(&self, message: &str) -> ! {
        panic!(
            "the AWS emulator (moto) did not start: {message}\n--- {} (tail) ---\n{}",
            self.log_path.display(),
            self.log_tail(40)
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The virtualenv holding moto: `$RSQL_TEST_VENV`, else `<workspace>/.venv`.
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("RSQL_TEST_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => crate::bins::workspace_root().join(".venv"),
    }
}

/// The AWS environment for a child process whose clients should use `endpoint` (moto, or a
/// [`crate::proxy::Proxy`] in front of it). Shared config files are pointed at `/dev/null` so
/// the host's `~/.aws` cannot leak in.
pub fn aws_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", REGION),
        ("AWS_DEFAULT_REGION", REGION),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// An SDK config for test code whose clients should use `endpoint`, with static test
/// credentials and the SDK's default retries and timeouts.
pub async fn sdk_config_for(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(REGION))
        .credentials_provider(aws_sdk_sfn::config::Credentials::new(
            "testing", "testing", None, None, "moto",
        ))
        .load()
        .await
}

/// A name unique within this test process, for queues, state machines and executions.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates a standard SQS queue and returns its URL.
pub async fn create_queue(config: &SdkConfig, name: &str) -> String {
    let sqs = aws_sdk_sqs::Client::new(config);
    let out = sqs
        .create_queue()
        .queue_name(name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateQueue {name}: {}", DisplayErrorContext(&e)));
    out.queue_url()
        .expect("CreateQueue returns a URL")
        .to_string()
}

/// Receives one message from `queue_url`, long-polling until `timeout`; panics if none came.
/// The message is not deleted.
pub async fn receive_one(config: &SdkConfig, queue_url: &str, timeout: Duration) -> Message {
    let sqs = aws_sdk_sqs::Client::new(config);
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let out = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(1)
            .wait_time_seconds(left.as_secs().clamp(0, 20) as i32)
            .send()
            .await
            .unwrap_or_else(|e| panic!("ReceiveMessage {queue_url}: {}", DisplayErrorContext(&e)));
        if let Some(message) = out.messages.and_then(|m| m.into_iter().next()) {
            return message;
        }
        if Instant::now() >= deadline {
            panic!("no message on {queue_url} within {timeout:?}");
        }
    }
}

/// Creates a STANDARD state machine from ASL JSON (JSONPath) and returns its ARN.
pub async fn create_state_machine(config: &SdkConfig, name: &str, definition: &str) -> String {
    let sfn = aws_sdk_sfn::Client::new(config);
    let out = sfn
        .create_state_machine()
        .name(name)
        .definition(definition)
        .role_arn(DUMMY_ROLE_ARN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateStateMachine {name}: {}", DisplayErrorContext(&e)));
    out.state_machine_arn().to_string()
}

/// Starts an execution with a unique name and the given JSON input; returns its ARN.
pub async fn start_execution(config: &SdkConfig, state_machine_arn: &str, input: &str) -> String {
    let sfn = aws_sdk_sfn::Client::new(config);
    let out = sfn
        .start_execution()
        .state_machine_arn(state_machine_arn)
        .name(unique_name("exec"))
        .input(input)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "StartExecution {state_machine_arn}: {}",
                DisplayErrorContext(&e)
            )
        });
    out.execution_arn().to_string()
}

/// The execution as it is now.
pub async fn describe(config: &SdkConfig, execution_arn: &str) -> DescribeExecutionOutput {
    aws_sdk_sfn::Client::new(config)
        .describe_execution()
        .execution_arn(execution_arn)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "DescribeExecution {execution_arn}: {}",
                DisplayErrorContext(&e)
            )
        })
}

/// Polls until the execution is no longer RUNNING and returns its description. Panics after
/// `timeout`, showing the history so far.
pub async fn wait_execution(
    config: &SdkConfig,
    execution_arn: &str,
    timeout: Duration,
) -> DescribeExecutionOutput {
    let deadline = Instant::now() + timeout;
    loop {
        let out = describe(config, execution_arn).await;
        if *out.status() != ExecutionStatus::Running {
            return out;
        }
        if Instant::now() >= deadline {
            let history = execution_history(config, execution_arn).await;
            panic!(
                "execution {execution_arn} still RUNNING after {timeout:?}; history:\n{}",
                format_history(&history)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The execution's whole event history, oldest first.
pub async fn execution_history(config: &SdkConfig, execution_arn: &str) -> Vec<HistoryEvent> {
    let sfn = aws_sdk_sfn::Client::new(config);
    let mut events = Vec::new();
    let mut next_token = None;
    loop {
        let out = sfn
            .get_execution_history()
            .execution_arn(execution_arn)
            .set_next_token(next_token)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GetExecutionHistory {execution_arn}: {}",
                    DisplayErrorContext(&e)
                )
            });
        events.extend(out.events);
        next_token = out.next_token;
        if next_token.is_none() {
            return events;
        }
    }
}

/// One line per event (type and details), for assertion messages.
pub fn format_history(events: &[HistoryEvent]) -> String {
    events
        .iter()
        .map(|e| format!("{:?}\n", e))
        .collect::<String>()
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// A one-shot HTTP/1.1 call with `Connection: close`; returns the status and body.
fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Creates a pay-per-request DynamoDB table with string keys: `hash`, and `range` when given
/// (the legacy audit tables are keyed that way).
pub async fn create_table(config: &SdkConfig, name: &str, hash: &str, range: Option<&str>) {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    let mut request = aws_sdk_dynamodb::Client::new(config)
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest);
    for (attr, kind) in [(Some(hash), KeyType::Hash), (range, KeyType::Range)] {
        let Some(attr) = attr else { continue };
        request = request
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(attr)
                    .key_type(kind)
                    .build()
                    .expect("key schema"),
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(attr)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("attribute definition"),
            );
    }
    request.send().await.unwrap_or_else(|e| {
        panic!(
            "CreateTable {name}: {}",
            aws_sdk_dynamodb::error::DisplayErrorContext(&e)
        )
    });
}

/// Creates a job audit table with the legacy key: `job_name` + `workflow_execution_id`.
pub async fn create_job_audit_table(config: &SdkConfig, name: &str) {
    create_table(config, name, "job_name", Some("workflow_execution_id")).await
}

/// A finished execution's output, parsed.
pub fn execution_output(
    out: &aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput,
) -> serde_json::Value {
    serde_json::from_str(out.output().expect("execution output")).expect("output is JSON")
}

/// The error a `Catch` put into `$.error`, with its cause parsed (`Null` when it has none).
pub fn caught_error(
    out: &aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput,
) -> (String, serde_json::Value) {
    let output = execution_output(out);
    let error = output["error"]["Error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let cause = output["error"]["Cause"]
        .as_str()
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or(serde_json::Value::Null);
    (error, cause)
}

/// How many events of one kind (e.g. `TaskSucceeded`) the execution's history holds.
pub async fn count_events(
    config: &SdkConfig,
    execution_arn: &str,
    kind: aws_sdk_sfn::types::HistoryEventType,
) -> usize {
    execution_history(config, execution_arn)
        .await
        .iter()
        .filter(|e| *e.r#type() == kind)
        .count()
}

/// (visible, in flight) messages of a queue.
pub async fn queue_depth(config: &SdkConfig, queue_url: &str) -> (i64, i64) {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let out = aws_sdk_sqs::Client::new(config)
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "GetQueueAttributes {queue_url}: {}",
                DisplayErrorContext(&e)
            )
        });
    let attrs = out.attributes.unwrap_or_default();
    let get = |name| attrs.get(&name).and_then(|v| v.parse().ok()).unwrap_or(-1);
    (
        get(A::ApproximateNumberOfMessages),
        get(A::ApproximateNumberOfMessagesNotVisible),
    )
}

/// A JSONPath state machine whose one state, `Job`, is an `sqs:sendMessage.waitForTaskToken`
/// task that sends `message_body` to `queue_url` and waits for the agent's callback, as the
/// agent's workflows do. Always with `TimeoutSeconds` (see the module notes). With `catch`,
/// a failure goes to a Pass state with the error and cause in `$.error`, so a test reads
/// them from the output; with `retry`, the errors it lists are retried (before any catch),
/// each attempt under a new token.
#[derive(Debug, Clone)]
pub struct JobTask<'a> {
    pub queue_url: &'a str,
    pub message_body: serde_json::Value,
    pub heartbeat_seconds: u64,
    pub timeout_seconds: u64,
    pub catch: bool,
    pub retry: Option<Retrier>,
}

/// One `Retry` rule of a Task state.
#[derive(Debug, Clone)]
pub struct Retrier {
    pub errors: Vec<String>,
    pub interval_seconds: u64,
    pub max_attempts: u64,
    /// `BackoffRate`; the service's default (2.0) when `None`.
    pub backoff_rate: Option<f64>,
}

impl Retrier {
    /// `States.Timeout` retried once after a second: a timed-out task gets a new token.
    pub fn timeouts_once() -> Retrier {
        Retrier {
            errors: vec!["States.Timeout".to_string()],
            interval_seconds: 1,
            max_attempts: 1,
            backoff_rate: None,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let mut rule = serde_json::json!({
            "ErrorEquals": self.errors,
            "IntervalSeconds": self.interval_seconds,
            "MaxAttempts": self.max_attempts
        });
        if let Some(rate) = self.backoff_rate {
            rule["BackoffRate"] = serde_json::json!(rate);
        }
        rule
    }
}

impl JobTask<'_> {
    /// Caught, with a 900 s timeout and no retry: what most tests want.
    pub fn new(
        queue_url: &str,
        message_body: serde_json::Value,
        heartbeat_seconds: u64,
    ) -> JobTask<'_> {
        JobTask {
            queue_url,
            message_body,
            heartbeat_seconds,
            timeout_seconds: 900,
            catch: true,
            retry: None,
        }
    }

    /// The `Job` state alone, e.g. for a Map's item processor: its catch goes to a state
    /// named `Caught`, its success ends the branch.
    pub fn state(&self) -> serde_json::Value {
        let mut job = serde_json::json!({
            "Type": "Task",
            "Resource": "arn:aws:states:::sqs:sendMessage.waitForTaskToken",
            "Parameters": {"QueueUrl": self.queue_url, "MessageBody": self.message_body},
            "HeartbeatSeconds": self.heartbeat_seconds,
            "TimeoutSeconds": self.timeout_seconds,
            "End": true
        });
        if self.catch {
            job["Catch"] = serde_json::json!([
                {"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Caught"}
            ]);
        }
        if let Some(retry) = &self.retry {
            job["Retry"] = serde_json::json!([retry.to_json()]);
        }
        job
    }

    /// The definition, as `create_state_machine` takes it.
    pub fn definition(&self) -> String {
        serde_json::json!({
            "Comment": "one rsql-agent job",
            "QueryLanguage": "JSONPath",
            "StartAt": "Job",
            "States": {"Job": self.state(), "Caught": {"Type": "Pass", "End": true}}
        })
        .to_string()
    }
}

/// An Auto Scaling group made by [`create_group_with_terminating_hook`].
#[derive(Debug, Clone)]
pub struct TestGroup {
    pub name: String,
    /// Its `autoscaling:EC2_INSTANCE_TERMINATING` lifecycle hook.
    pub hook: String,
    /// Its instances, all `InService`, unprotected.
    pub instance_ids: Vec<String>,
}

/// Creates an Auto Scaling group `name` of `size` instances (a launch configuration of its
/// own, one Availability Zone) with an `autoscaling:EC2_INSTANCE_TERMINATING` lifecycle hook
/// `hook` (`heartbeat_timeout` seconds, default result `CONTINUE`), as the stack makes it.
pub async fn create_group_with_terminating_hook(
    config: &SdkConfig,
    name: &str,
    hook: &str,
    size: i32,
    heartbeat_timeout: i32,
) -> TestGroup {
    use aws_sdk_autoscaling::error::DisplayErrorContext;
    let autoscaling = aws_sdk_autoscaling::Client::new(config);
    let launch_configuration = format!("{name}-lc");
    autoscaling
        .create_launch_configuration()
        .launch_configuration_name(&launch_configuration)
        // One of the images moto's EC2 knows.
        .image_id("ami-12c6146b")
        .instance_type("t3.micro")
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CreateLaunchConfiguration {launch_configuration}: {}",
                DisplayErrorContext(&e)
            )
        });
    autoscaling
        .create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .launch_configuration_name(&launch_configuration)
        .min_size(size)
        .max_size(size.max(1) * 2)
        .desired_capacity(size)
        .availability_zones(format!("{REGION}a"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateAutoScalingGroup {name}: {}", DisplayErrorContext(&e)));
    autoscaling
        .put_lifecycle_hook()
        .auto_scaling_group_name(name)
        .lifecycle_hook_name(hook)
        .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
        .heartbeat_timeout(heartbeat_timeout)
        .default_result("CONTINUE")
        .send()
        .await
        .unwrap_or_else(|e| panic!("PutLifecycleHook {hook}: {}", DisplayErrorContext(&e)));
    let group = autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "DescribeAutoScalingGroups {name}: {}",
                DisplayErrorContext(&e)
            )
        });
    let instance_ids: Vec<String> = group
        .auto_scaling_groups()
        .iter()
        .flat_map(|g| g.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    assert_eq!(
        instance_ids.len(),
        size as usize,
        "group {name} has {instance_ids:?}"
    );
    TestGroup {
        name: name.to_string(),
        hook: hook.to_string(),
        instance_ids,
    }
}

/// What Auto Scaling says of one instance (`DescribeAutoScalingInstances`); panics when it
/// is in no group.
pub async fn describe_auto_scaling_instance(
    config: &SdkConfig,
    instance_id: &str,
) -> aws_sdk_autoscaling::types::AutoScalingInstanceDetails {
    let out = aws_sdk_autoscaling::Client::new(config)
        .describe_auto_scaling_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "DescribeAutoScalingInstances {instance_id}: {}",
                aws_sdk_autoscaling::error::DisplayErrorContext(&e)
            )
        });
    out.auto_scaling_instances()
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("{instance_id} is in no Auto Scaling group"))
}

/// Whether the instance is protected from scale-in.
pub async fn is_protected_from_scale_in(config: &SdkConfig, instance_id: &str) -> bool {
    describe_auto_scaling_instance(config, instance_id)
        .await
        .protected_from_scale_in()
        .unwrap_or_else(|| panic!("{instance_id}: no ProtectedFromScaleIn"))
}

/// The instance's lifecycle state as Auto Scaling says it, e.g. `InService`, or
/// `Terminating:Proceed` once its terminating action was completed.
pub async fn lifecycle_state(config: &SdkConfig, instance_id: &str) -> String {
    describe_auto_scaling_instance(config, instance_id)
        .await
        .lifecycle_state()
        .unwrap_or_else(|| panic!("{instance_id}: no LifecycleState"))
        .to_string()
}
