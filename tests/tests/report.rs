//! The reporting side against the AWS emulator: Step Functions callbacks on a real
//! `waitForTaskToken` task, the DynamoDB job audit's conditional writes, and the outbox's
//! durable, exactly-once delivery across a restart and through an outage.
//!
//! The agent's clients are built as in production (`rsql_agent::aws`: SDK retries off, the
//! agent's timeouts); only the endpoint differs. Every wait polls against a deadline.

use std::sync::OnceLock;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use rsql_agent::aws::retry::{Jitter, RetryPolicy};
use rsql_agent::aws::{self, AwsClients};
use rsql_agent::outcome::{ErrorName, Failure, FailureCause};
use rsql_agent::report::audit::dynamodb::{AuditWrite, DynamoAuditError, JobAuditTable};
use rsql_agent::report::audit::JobAuditRecord;
use rsql_agent::report::outbox::{Callback, Delivery, Outbox, OutboxEntry, WorkerExit};
use rsql_agent::report::stepfunctions::{CallbackError, StepFunctions};
use rsql_agent_tests::moto::{self, Moto};
use rsql_agent_tests::proxy::Proxy;
use rsql_agent_tests::world::{self, eventually, s, Item};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(30);

/// One server for the whole file: starting moto costs seconds of Python imports, and every
/// test uses names of its own. The launcher exits with this process.
fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(Moto::start)
}

/// The agent's clients, pointed at `endpoint`. Production reads the endpoint from
/// `AWS_ENDPOINT_URL` in `aws::load_config`; tests in one process use several endpoints
/// (moto, proxies), so the same retry and timeout settings are layered onto an explicit one
/// instead of mutating the process environment.
async fn agent_clients(endpoint: &str) -> AwsClients {
    let config = moto::sdk_config_for(endpoint)
        .await
        .into_builder()
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(aws::CONNECT_TIMEOUT)
                .operation_attempt_timeout(aws::ATTEMPT_TIMEOUT)
                .build(),
        )
        .build();
    AwsClients::new(&config)
}

/// Retries fast enough for a test, still jittered.
fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        jitter: Jitter::Full,
    }
}

/// A state machine with one `sqs:sendMessage.waitForTaskToken` task, as the agent's
/// workflows use it; with `catch`, a failure goes to a Pass state with the error in `$.error`.
fn job_definition(queue_url: &str, catch: bool) -> String {
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_execution_id.$": "$.workflow_execution_id",
        "job_name": "rsql_blog_script_1.sh"
    });
    moto::JobTask {
        timeout_seconds: 300,
        catch,
        ..moto::JobTask::new(queue_url, body, 60)
    }
    .definition()
}

/// A queue and a state machine of [`job_definition`].
struct Workflow {
    config: SdkConfig,
    queue_url: String,
    state_machine_arn: String,
}

impl Workflow {
    async fn create(catch: bool) -> Workflow {
        let config = moto().sdk_config().await;
        let queue_url = moto::create_queue(&config, &moto::unique_name("jobs")).await;
        let state_machine_arn = moto::create_state_machine(
            &config,
            &moto::unique_name("job"),
            &job_definition(&queue_url, catch),
        )
        .await;
        Workflow {
            config,
            queue_url,
            state_machine_arn,
        }
    }

    /// Starts an execution and returns its ARN and the task token its job message carries.
    async fn start(&self) -> (String, String) {
        let input = json!({"workflow_execution_id": moto::unique_name("wfx")}).to_string();
        let execution = moto::start_execution(&self.config, &self.state_machine_arn, &input).await;
        let message = moto::receive_one(&self.config, &self.queue_url, DEADLINE).await;
        aws_sdk_sqs::Client::new(&self.config)
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(message.receipt_handle().expect("receipt handle"))
            .send()
            .await
            .expect("DeleteMessage");
        let body: Value = serde_json::from_str(message.body().expect("body")).expect("JSON");
        let token = body["task_token"].as_str().expect("task_token").to_string();
        (execution, token)
    }

    async fn status(&self, execution: &str) -> ExecutionStatus {
        aws_sdk_sfn::Client::new(&self.config)
            .describe_execution()
            .execution_arn(execution)
            .send()
            .await
            .expect("DescribeExecution")
            .status()
            .clone()
    }
}

fn success_output(job: &str) -> String {
    json!({"job_name": job, "workflow_execution_id": "wfx", "status": "completed",
           "exit_code": 0, "duration_ms": 1234, "instance_id": "i-0test",
           "log_group": "/ops/rsql-logs/", "log_stream": "s"})
    .to_string()
}

fn script_failure() -> Failure {
    Failure {
        error: ErrorName::ScriptFailed,
        cause: FailureCause {
            exit_code: Some(3),
            sql_state: Some("42P01".into()),
            message: "relation \"blog_table\" does not exist".into(),
            stderr_tail: "rsql: ERROR: relation \"blog_table\" does not exist\n".into(),
            ..FailureCause::default()
        },
    }
}

fn closed_reason(result: Result<(), CallbackError>) -> String {
    match result {
        Err(CallbackError::TaskClosed { reason, .. }) => reason,
        other => panic!("expected TaskClosed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn succeed_completes_the_execution_with_our_output() {
    let workflow = Workflow::create(false).await;
    let sfn = StepFunctions::new(agent_clients(&moto().endpoint()).await.sfn);
    let (execution, token) = workflow.start().await;

    sfn.heartbeat(&token)
        .await
        .expect("heartbeat on a live task");
    let output = success_output("rsql_blog_script_1.sh");
    sfn.succeed(&token, &output).await.expect("SendTaskSuccess");

    let done = moto::wait_execution(&workflow.config, &execution, DEADLINE).await;
    assert_eq!(*done.status(), ExecutionStatus::Succeeded, "{done:?}");
    let got: Value = serde_json::from_str(done.output().expect("output")).expect("JSON");
    assert_eq!(got, serde_json::from_str::<Value>(&output).expect("JSON"));

    // The task is over: a second answer is refused as closed, never as an agent failure.
    let reason = closed_reason(sfn.succeed(&token, &output).await);
    eprintln!("second SendTaskSuccess on a finished task: {reason}");
    let reason = closed_reason(sfn.heartbeat(&token).await);
    eprintln!("SendTaskHeartbeat on a finished task: {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_reports_the_error_and_the_json_cause() {
    let sfn = StepFunctions::new(agent_clients(&moto().endpoint()).await.sfn);
    let failure = script_failure();
    let cause = failure.cause_json();

    // Caught: the workflow sees Error and Cause in `$.error`.
    let caught = Workflow::create(true).await;
    let (execution, token) = caught.start().await;
    sfn.fail(&token, &failure.error_field(), &cause)
        .await
        .expect("SendTaskFailure");
    let done = moto::wait_execution(&caught.config, &execution, DEADLINE).await;
    assert_eq!(*done.status(), ExecutionStatus::Succeeded, "{done:?}");
    let output: Value = serde_json::from_str(done.output().expect("output")).expect("JSON");
    assert_eq!(output["error"]["Error"], "Rsql.ScriptFailed", "{output}");
    let seen: Value =
        serde_json::from_str(output["error"]["Cause"].as_str().expect("Cause")).expect("JSON");
    assert_eq!(seen["sql_state"], "42P01", "{seen}");
    assert_eq!(seen["exit_code"], 3, "{seen}");
    assert_eq!(seen["message"], "relation \"blog_table\" does not exist");

    // Uncaught: the execution fails with our error and cause.
    let uncaught = Workflow::create(false).await;
    let (execution, token) = uncaught.start().await;
    sfn.fail(&token, &failure.error_field(), &cause)
        .await
        .expect("SendTaskFailure");
    let done = moto::wait_execution(&uncaught.config, &execution, DEADLINE).await;
    assert_eq!(*done.status(), ExecutionStatus::Failed, "{done:?}");
    assert_eq!(done.error(), Some("Rsql.ScriptFailed"), "{done:?}");
    let seen: Value = serde_json::from_str(done.cause().expect("cause")).expect("JSON cause");
    assert_eq!(seen["sql_state"], "42P01", "{seen}");
}

/// Stops `execution` and waits until its task token is closed and the execution ABORTED;
/// returns how Step Functions described the closed token to a heartbeat.
///
/// moto closes a stopped execution's task only when the task's wait wakes up: on its next
/// heartbeat (which is still answered 200) or its heartbeat timeout; AWS closes it at once.
/// So this polls with heartbeats, as the agent's heartbeat tick would.
async fn stop_execution(
    workflow: &Workflow,
    sfn: &StepFunctions,
    execution: &str,
    token: &str,
) -> String {
    aws_sdk_sfn::Client::new(&workflow.config)
        .stop_execution()
        .execution_arn(execution)
        .send()
        .await
        .expect("StopExecution");
    let reason = eventually("the heartbeat to see the task closed", DEADLINE, || async {
        match sfn.heartbeat(token).await {
            Ok(()) => None,
            Err(CallbackError::TaskClosed { reason, .. }) => Some(reason),
            Err(other) => panic!("expected TaskClosed, got {other:?}"),
        }
    })
    .await;
    // AWS says ABORTED; moto 5.2.5 ends the woken task with an error and says FAILED.
    let done = moto::wait_execution(&workflow.config, execution, DEADLINE).await;
    eprintln!(
        "stopped execution ended {:?} (error {:?}, cause {:?})",
        done.status(),
        done.error(),
        done.cause()
    );
    assert!(
        matches!(
            done.status(),
            ExecutionStatus::Aborted | ExecutionStatus::Failed
        ),
        "{done:?}"
    );
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_on_a_stopped_execution_say_task_closed() {
    let workflow = Workflow::create(false).await;
    let sfn = StepFunctions::new(agent_clients(&moto().endpoint()).await.sfn);
    let (execution, token) = workflow.start().await;
    sfn.heartbeat(&token)
        .await
        .expect("heartbeat on a live task");

    let reason = stop_execution(&workflow, &sfn, &execution, &token).await;
    eprintln!("SendTaskHeartbeat after StopExecution: {reason}");
    let reason = closed_reason(sfn.succeed(&token, "{}").await);
    eprintln!("SendTaskSuccess after StopExecution: {reason}");
    let failure = script_failure();
    match sfn
        .fail(&token, &failure.error_field(), &failure.cause_json())
        .await
    {
        Err(CallbackError::TaskClosed { reason, .. }) => {
            eprintln!("SendTaskFailure after StopExecution: {reason}")
        }
        other => panic!("expected TaskClosed, got {other:?}"),
    }
}

async fn create_audit_table(config: &SdkConfig) -> String {
    let name = moto::unique_name("rsql-job-audit");
    moto::create_job_audit_table(config, &name).await;
    name
}

fn audit_record(execution: &str, status: &str, attempt: u32) -> JobAuditRecord {
    let finished = status != "running";
    JobAuditRecord {
        job_name: "rsql_blog_script_1.sh".into(),
        workflow_execution_id: execution.into(),
        workflow_id: "blog_test_workflow".into(),
        execution_status: status.into(),
        execution_start_ts: "2026-01-01T00:00:00.000Z".into(),
        execution_end_ts: finished.then(|| "2026-01-01T00:00:01.234Z".into()),
        instance_id: "i-0test".into(),
        exit_code: finished.then_some(0),
        error_message: None,
        sql_state: None,
        log_group: Some("/ops/rsql-logs/".into()),
        log_stream: Some("blog_test_workflow/x".into()),
        log_file: None,
        attempt,
        duration_ms: finished.then_some(1234),
        cpu_ms: None,
        max_rss_mb: None,
        log_complete: None,
        ssm_command_id: None,
        stage: None,
    }
}

/// The job audit item of `rsql_blog_script_1.sh` in `execution`, if there is one.
async fn audit_item(config: &SdkConfig, table: &str, execution: &str) -> Option<Item> {
    world::audit_item(config, table, "rsql_blog_script_1.sh", execution).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_writes_never_roll_a_final_status_back() {
    let config = moto().sdk_config().await;
    let table_name = create_audit_table(&config).await;
    let clients = agent_clients(&moto().endpoint()).await;
    let table = JobAuditTable::new(clients.dynamodb.clone(), &table_name);
    let execution = moto::unique_name("wfx");

    let put = |record: JobAuditRecord| {
        let table = table.clone();
        async move { table.put(&record).await.expect("audit write") }
    };
    assert_eq!(
        put(audit_record(&execution, "running", 1)).await,
        AuditWrite::Written
    );
    // Replaying `running` for the same attempt is harmless and allowed.
    assert_eq!(
        put(audit_record(&execution, "running", 1)).await,
        AuditWrite::Written
    );
    assert_eq!(
        put(audit_record(&execution, "completed", 1)).await,
        AuditWrite::Written
    );

    let item = audit_item(&config, &table_name, &execution)
        .await
        .expect("item");
    assert_eq!(s(&item, "execution_status"), "completed");
    assert_eq!(item["attempt"], AttributeValue::N("1".into()));
    assert_eq!(item["exit_code"], AttributeValue::N("0".into()));
    assert_eq!(item["duration_ms"], AttributeValue::N("1234".into()));
    assert_eq!(s(&item, "workflow_id"), "blog_test_workflow");
    assert_eq!(s(&item, "execution_end_ts"), "2026-01-01T00:00:01.234Z");
    assert!(
        !item.contains_key("ssm_command_id"),
        "None is left out: {item:?}"
    );

    // A redelivered `running` (or another final state) of the same attempt loses.
    let replay = put(audit_record(&execution, "running", 1)).await;
    assert_eq!(
        replay,
        AuditWrite::AlreadyNewer {
            existing_status: Some("completed".into()),
            existing_attempt: Some(1)
        },
        "moto may omit the old item; the decision is what matters"
    );
    assert!(matches!(
        put(audit_record(&execution, "failed", 1)).await,
        AuditWrite::AlreadyNewer { .. }
    ));
    let item = audit_item(&config, &table_name, &execution)
        .await
        .expect("item");
    assert_eq!(s(&item, "execution_status"), "completed");

    // A Step Functions Retry is a new attempt: it starts over.
    assert_eq!(
        put(audit_record(&execution, "running", 2)).await,
        AuditWrite::Written
    );
    let item = audit_item(&config, &table_name, &execution)
        .await
        .expect("item");
    assert_eq!(s(&item, "execution_status"), "running");
    assert_eq!(item["attempt"], AttributeValue::N("2".into()));
    assert!(!item.contains_key("exit_code"), "{item:?}");
    // ... and the earlier attempt's late final record cannot overwrite it.
    assert!(matches!(
        put(audit_record(&execution, "completed", 1)).await,
        AuditWrite::AlreadyNewer { .. }
    ));

    // A missing table is a refusal to log loudly, not a transient error.
    let missing = JobAuditTable::new(clients.dynamodb.clone(), "no-such-table");
    match missing.put(&audit_record(&execution, "running", 1)).await {
        Err(DynamoAuditError::Rejected { code, .. }) => {
            eprintln!("PutItem on a missing table: {code:?}");
            assert_eq!(code.as_deref(), Some("ResourceNotFoundException"));
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

/// Runs the outbox worker until the returned sender is dropped or fired.
fn spawn_worker(
    outbox: &Outbox,
    clients: &AwsClients,
    table: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<WorkerExit>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(outbox.clone().run_worker(
        StepFunctions::new(clients.sfn.clone()),
        Some(JobAuditTable::new(clients.dynamodb.clone(), table)),
        fast_policy(),
        async move {
            let _ = stopped.await;
        },
    ));
    (stop, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_entries_survive_a_restart_and_are_delivered_once() {
    let workflow = Workflow::create(false).await;
    let table = create_audit_table(&workflow.config).await;
    let state_dir = tempfile::tempdir().expect("state dir");
    // Recording shows what actually reached the service.
    let proxy = Proxy::start_recording(moto().addr());
    let clients = agent_clients(&proxy.url()).await;

    let (execution_1, token_1) = workflow.start().await;
    let (execution_2, token_2) = workflow.start().await;
    let wfx = moto::unique_name("wfx");
    {
        let outbox = Outbox::open(state_dir.path()).expect("open outbox");
        // A fresh outcome: callback and final audit both pending.
        outbox
            .put(&OutboxEntry::new(
                Some(token_1.clone()),
                Some(Callback::Success {
                    output: success_output("one"),
                }),
                Some(audit_record(&wfx, "completed", 1)),
            ))
            .expect("put");
        // One whose callback had gone out before the "crash": only the audit is left.
        let mut half_done = OutboxEntry::new(
            Some(token_2.clone()),
            Some(Callback::Success {
                output: success_output("two"),
            }),
            None,
        )
        .with_labels("two", "wfx-two");
        StepFunctions::new(clients.sfn.clone())
            .succeed(&token_2, &success_output("two"))
            .await
            .expect("first delivery");
        half_done.callback_done = true;
        half_done.audit = Some(audit_record(&format!("{wfx}-two"), "failed", 1));
        outbox.put(&half_done).expect("put");
        assert_eq!(outbox.len().expect("len"), 2);
        // Dropped without delivering anything more: the "agent" dies here.
    }

    let outbox = Outbox::open(state_dir.path()).expect("reopen outbox");
    assert_eq!(
        outbox.pending().expect("pending").len(),
        2,
        "entries survive a restart"
    );
    proxy.clear_requests();
    let (stop, worker) = spawn_worker(&outbox, &clients, &table);

    eventually("the outbox to drain", DEADLINE, || async {
        (outbox.len().expect("len") == 0).then_some(())
    })
    .await;
    for execution in [&execution_1, &execution_2] {
        let done = moto::wait_execution(&workflow.config, execution, DEADLINE).await;
        assert_eq!(*done.status(), ExecutionStatus::Succeeded, "{done:?}");
        assert_eq!(
            moto::count_events(&workflow.config, execution, HistoryEventType::TaskSucceeded).await,
            1
        );
    }
    let item = audit_item(&workflow.config, &table, &wfx)
        .await
        .expect("audit item");
    assert_eq!(s(&item, "execution_status"), "completed");
    let item = audit_item(&workflow.config, &table, &format!("{wfx}-two"))
        .await
        .expect("audit item of the half-done entry");
    assert_eq!(s(&item, "execution_status"), "failed");

    // After the restart exactly one callback went out: the half-done entry's was not resent.
    let sent: Vec<Value> = proxy
        .requests_for("SendTaskSuccess")
        .iter()
        .filter_map(|r| r.body_json())
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["taskToken"], token_1.as_str());
    assert_eq!(proxy.requests_for("UpdateItem").len(), 2);

    stop.send(()).expect("worker alive");
    let exit = tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("worker stops")
        .expect("worker task");
    assert_eq!(exit, WorkerExit { pending: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_retries_through_an_outage_without_a_duplicate_callback() {
    let workflow = Workflow::create(true).await;
    let table = create_audit_table(&workflow.config).await;
    let state_dir = tempfile::tempdir().expect("state dir");
    let proxy = Proxy::start_recording(moto().addr());
    let clients = agent_clients(&proxy.url()).await;
    let outbox = Outbox::open(state_dir.path()).expect("open outbox");
    let (stop, worker) = spawn_worker(&outbox, &clients, &table);

    let (execution, token) = workflow.start().await;
    let wfx = moto::unique_name("wfx");
    let failure = script_failure();
    proxy.cut();
    let entry = OutboxEntry::new(
        Some(token.clone()),
        Some(Callback::Failure {
            error: failure.error_field(),
            cause: failure.cause_json(),
        }),
        Some(audit_record(&wfx, "failed", 1)),
    );
    outbox.put(&entry).expect("put");

    // The worker keeps trying and records each failure on disk.
    let failed = eventually("a few failed attempts", DEADLINE, || async {
        outbox
            .load(&entry.id)
            .expect("load")
            .filter(|e| e.attempts >= 3)
    })
    .await;
    assert!(!failed.callback_done, "{failed:?}");
    eprintln!(
        "during the outage: {}",
        failed.last_error.as_deref().unwrap_or("(none)")
    );
    assert!(failed.last_error.is_some());
    assert_eq!(workflow.status(&execution).await, ExecutionStatus::Running);

    proxy.restore();
    eventually("the outbox to drain", DEADLINE, || async {
        (outbox.len().expect("len") == 0).then_some(())
    })
    .await;
    let done = moto::wait_execution(&workflow.config, &execution, DEADLINE).await;
    assert_eq!(
        *done.status(),
        ExecutionStatus::Succeeded,
        "caught: {done:?}"
    );
    let output: Value = serde_json::from_str(done.output().expect("output")).expect("JSON");
    assert_eq!(output["error"]["Error"], "Rsql.ScriptFailed", "{output}");
    assert_eq!(
        moto::count_events(&workflow.config, &execution, HistoryEventType::TaskFailed).await,
        1
    );
    assert_eq!(proxy.requests_for("SendTaskFailure").len(), 1);
    let item = audit_item(&workflow.config, &table, &wfx)
        .await
        .expect("audit item");
    assert_eq!(s(&item, "execution_status"), "failed");

    // Delivering it again finds nothing to do.
    let sfn = StepFunctions::new(clients.sfn.clone());
    let again = outbox
        .deliver(&entry, &sfn, None, &fast_policy(), std::future::pending())
        .await
        .expect("deliver");
    assert_eq!(again, Delivery::Gone);

    drop(stop);
    let exit = tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("worker stops")
        .expect("worker task");
    assert_eq!(exit, WorkerExit { pending: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_task_skips_the_callback_but_still_writes_the_audit() {
    let workflow = Workflow::create(false).await;
    let table_name = create_audit_table(&workflow.config).await;
    let clients = agent_clients(&moto().endpoint()).await;
    let (execution, token) = workflow.start().await;
    let sfn = StepFunctions::new(clients.sfn.clone());
    stop_execution(&workflow, &sfn, &execution, &token).await;

    let state_dir = tempfile::tempdir().expect("state dir");
    let outbox = Outbox::open(state_dir.path()).expect("open outbox");
    let wfx = moto::unique_name("wfx");
    let entry = OutboxEntry::new(
        Some(token),
        Some(Callback::Success {
            output: success_output("closed"),
        }),
        Some(audit_record(&wfx, "completed", 1)),
    );
    outbox.put(&entry).expect("put");
    let table = JobAuditTable::new(clients.dynamodb.clone(), &table_name);
    let delivery = tokio::time::timeout(
        DEADLINE,
        outbox.deliver(
            &entry,
            &sfn,
            Some(&table),
            &fast_policy(),
            std::future::pending(),
        ),
    )
    .await
    .expect("delivery ends")
    .expect("deliver");
    match delivery {
        Delivery::Delivered {
            task_closed: Some(reason),
        } => eprintln!("delivery to a stopped execution: {reason}"),
        other => panic!("expected a delivery that found the task closed, got {other:?}"),
    }
    assert_eq!(outbox.len().expect("len"), 0);
    let item = audit_item(&workflow.config, &table_name, &wfx)
        .await
        .expect("audit item");
    assert_eq!(s(&item, "execution_status"), "completed");
}
