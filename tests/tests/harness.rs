//! Tests of the test harness itself: the AWS emulator (with the launcher's patches) and the
//! cuttable, recording proxy.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::SdkConfig;
use aws_sdk_sfn::error::ProvideErrorMetadata;
use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use rsql_agent_tests::moto::{self, Moto};
use rsql_agent_tests::proxy::Proxy;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(30);

/// One `sqs:sendMessage.waitForTaskToken` task, as the agent's workflows use it, ending in a
/// Pass state when it fails if `catch`, and with a Retry on States.Timeout if `retry`.
fn job_definition(queue_url: &str, catch: bool, retry: bool, heartbeat_seconds: u64) -> String {
    moto::JobTask {
        timeout_seconds: 300,
        catch,
        retry: retry.then(moto::Retrier::timeouts_once),
        ..moto::JobTask::new(
            queue_url,
            json!({"task_token.$": "$$.Task.Token", "job_name": "x"}),
            heartbeat_seconds,
        )
    }
    .definition()
}

/// Receives the next job message and returns its task token (deleting the message).
async fn next_token(config: &SdkConfig, queue_url: &str) -> String {
    let message = moto::receive_one(config, queue_url, DEADLINE).await;
    aws_sdk_sqs::Client::new(config)
        .delete_message()
        .queue_url(queue_url)
        .receipt_handle(message.receipt_handle().expect("receipt handle"))
        .send()
        .await
        .expect("DeleteMessage");
    let body: Value = serde_json::from_str(message.body().expect("body")).expect("JSON body");
    assert_eq!(body["job_name"], "x", "{body}");
    body["task_token"].as_str().expect("task_token").to_string()
}

/// Asserts that Step Functions treats `token` as closed, with one of the answers
/// docs/contract.md lists for a closed token.
async fn assert_token_closed(sfn: &aws_sdk_sfn::Client, token: &str) {
    let err = sfn
        .send_task_heartbeat()
        .task_token(token)
        .send()
        .await
        .expect_err("heartbeat on a closed token must fail");
    let code = err.code().unwrap_or_default().to_string();
    assert!(
        ["TaskTimedOut", "TaskDoesNotExist", "InvalidToken"].contains(&code.as_str()),
        "unexpected answer for a closed token: {}",
        aws_sdk_sfn::error::DisplayErrorContext(&err)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_failure_cause_and_success_output_reach_the_execution() {
    let moto = Moto::start_private();
    let config = moto.sdk_config().await;
    let sfn = aws_sdk_sfn::Client::new(&config);
    let queue = moto::create_queue(&config, &moto::unique_name("jobs")).await;
    let caught = moto::create_state_machine(
        &config,
        &moto::unique_name("caught"),
        &job_definition(&queue, true, false, 30),
    )
    .await;
    let uncaught = moto::create_state_machine(
        &config,
        &moto::unique_name("uncaught"),
        &job_definition(&queue, false, false, 30),
    )
    .await;
    let cause = json!({"exit_code": 3, "signal": null, "sql_state": "42P01",
                       "message": "relation \"x\" does not exist", "stderr_tail": "boom"})
    .to_string();

    // Failure caught by the Catch: the cause reaches `$.error.Cause` and the history.
    let exec = moto::start_execution(&config, &caught, r#"{"n": 1}"#).await;
    let token = next_token(&config, &queue).await;
    sfn.send_task_heartbeat()
        .task_token(&token)
        .send()
        .await
        .expect("heartbeat on a live token");
    sfn.send_task_failure()
        .task_token(&token)
        .error("Rsql.ScriptFailed")
        .cause(&cause)
        .send()
        .await
        .expect("SendTaskFailure");
    let done = moto::wait_execution(&config, &exec, DEADLINE).await;
    assert_eq!(*done.status(), ExecutionStatus::Succeeded, "{done:?}");
    let output: Value = serde_json::from_str(done.output().expect("output")).expect("JSON output");
    assert_eq!(output["n"], 1, "{output}");
    assert_eq!(output["error"]["Error"], "Rsql.ScriptFailed", "{output}");
    assert_eq!(output["error"]["Cause"], cause.as_str(), "{output}");
    let history = moto::execution_history(&config, &exec).await;
    let failed = history
        .iter()
        .find(|e| *e.r#type() == HistoryEventType::TaskFailed)
        .and_then(|e| e.task_failed_event_details())
        .unwrap_or_else(|| panic!("no TaskFailed event:\n{}", moto::format_history(&history)));
    assert_eq!(failed.error(), Some("Rsql.ScriptFailed"));
    assert_eq!(failed.cause(), Some(cause.as_str()));
    // The task is closed now, and moto says so (the launcher's token patch).
    assert_token_closed(&sfn, &token).await;

    // Uncaught failure: DescribeExecution carries the error and the cause.
    let exec = moto::start_execution(&config, &uncaught, "{}").await;
    let token = next_token(&config, &queue).await;
    sfn.send_task_failure()
        .task_token(&token)
        .error("Rsql.ScriptFailed")
        .cause(&cause)
        .send()
        .await
        .expect("SendTaskFailure");
    let done = moto::wait_execution(&config, &exec, DEADLINE).await;
    assert_eq!(*done.status(), ExecutionStatus::Failed, "{done:?}");
    assert_eq!(done.error(), Some("Rsql.ScriptFailed"));
    assert_eq!(done.cause(), Some(cause.as_str()));

    // Success: the task's output becomes the execution's output.
    let exec = moto::start_execution(&config, &caught, "{}").await;
    let token = next_token(&config, &queue).await;
    let result = json!({"job_name": "x", "status": "completed", "exit_code": 0});
    sfn.send_task_success()
        .task_token(&token)
        .output(result.to_string())
        .send()
        .await
        .expect("SendTaskSuccess");
    let done = moto::wait_execution(&config, &exec, DEADLINE).await;
    assert_eq!(*done.status(), ExecutionStatus::Succeeded, "{done:?}");
    let output: Value = serde_json::from_str(done.output().expect("output")).expect("JSON output");
    assert_eq!(output, result);
    let err = sfn
        .send_task_success()
        .task_token(&token)
        .output("{}")
        .send()
        .await
        .expect_err("a second SendTaskSuccess on a closed token must fail");
    assert!(err.code().is_some(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_timeout_retries_with_a_new_token() {
    let moto = Moto::start_private();
    let config = moto.sdk_config().await;
    let sfn = aws_sdk_sfn::Client::new(&config);
    let queue = moto::create_queue(&config, &moto::unique_name("jobs")).await;
    let machine = moto::create_state_machine(
        &config,
        &moto::unique_name("retry"),
        &job_definition(&queue, true, true, 2),
    )
    .await;
    let exec = moto::start_execution(&config, &machine, "{}").await;

    // First attempt: heartbeats keep it alive past HeartbeatSeconds...
    let first = next_token(&config, &queue).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        sfn.send_task_heartbeat()
            .task_token(&first)
            .send()
            .await
            .expect("heartbeat keeps the task alive");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // ...then silence: States.Timeout, and the Retry sends a new message with a new token.
    let second = next_token(&config, &queue).await;
    assert_ne!(first, second, "each Retry attempt gets its own token");
    assert_token_closed(&sfn, &first).await;
    sfn.send_task_success()
        .task_token(&second)
        .output(r#"{"attempt": 2}"#)
        .send()
        .await
        .expect("SendTaskSuccess on the retry's token");
    let done = moto::wait_execution(&config, &exec, DEADLINE).await;
    assert_eq!(*done.status(), ExecutionStatus::Succeeded, "{done:?}");
    assert_eq!(done.output(), Some(r#"{"attempt": 2}"#));
    let history = moto::execution_history(&config, &exec).await;
    assert!(
        history
            .iter()
            .any(|e| *e.r#type() == HistoryEventType::TaskTimedOut),
        "{}",
        moto::format_history(&history)
    );
}

/// SDK settings for calls through the proxy: no retries, short timeouts, so failures show
/// at once.
fn impatient(config: &SdkConfig) -> SdkConfig {
    config
        .to_builder()
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_timeout(Duration::from_secs(2))
                .build(),
        )
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_cuts_restores_and_records() {
    let moto = Moto::start_private();
    let proxy = Proxy::start_recording(moto.addr());
    let config = impatient(&moto::sdk_config_for(&proxy.url()).await);
    let sqs = aws_sdk_sqs::Client::new(&config);

    let queue = moto::create_queue(&config, &moto::unique_name("via-proxy")).await;
    for i in 0..3 {
        sqs.send_message()
            .queue_url(&queue)
            .message_body(format!("hello-proxy-{i}"))
            .send()
            .await
            .expect("SendMessage through the proxy");
    }
    let sends = proxy.requests_for("SendMessage");
    assert_eq!(sends.len(), 3, "{:?}", proxy.requests());
    for (i, send) in sends.iter().enumerate() {
        assert_eq!(send.method, "POST");
        assert_eq!(send.amz_target(), Some("AmazonSQS.SendMessage"));
        let body = send.body_json().expect("JSON body");
        assert_eq!(body["MessageBody"], format!("hello-proxy-{i}"), "{body}");
        assert_eq!(body["QueueUrl"], queue.as_str(), "{body}");
    }
    // A cut resets new connections (moto closes each after one response, so the SDK holds
    // no pooled one here; see `proxy_records_keep_alive_and_chunked_and_cut_kills_live` for
    // those): calls fail, promptly.
    proxy.cut();
    for _ in 0..2 {
        let started = Instant::now();
        let err = sqs
            .get_queue_attributes()
            .queue_url(&queue)
            .send()
            .await
            .expect_err("a call through a cut proxy must fail");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "failed only after {:?}: {err:?}",
            started.elapsed()
        );
    }

    // A blackhole fails by the client's own timeout.
    proxy.blackhole();
    let started = Instant::now();
    sqs.get_queue_attributes()
        .queue_url(&queue)
        .send()
        .await
        .expect_err("a call into a blackhole must time out");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    proxy.restore();
    proxy.clear_requests();
    sqs.get_queue_attributes()
        .queue_url(&queue)
        .send()
        .await
        .expect("the proxy forwards again after restore");
    let got = proxy
        .wait_for_request(Duration::from_secs(1), |r| {
            r.operation() == Some("GetQueueAttributes")
        })
        .expect("the call after restore was recorded");
    assert!(got.body_str().contains(&queue), "{got:?}");

    // Recording off: nothing new is kept, but traffic still flows.
    proxy.set_recording(false);
    proxy.clear_requests();
    sqs.list_queues().send().await.expect("ListQueues");
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_stops_restarts_and_dies_with_its_handle() {
    let mut moto = Moto::start_private();
    let env = moto.env();
    let endpoint = moto.endpoint();
    assert!(env.contains(&("AWS_ENDPOINT_URL".to_string(), endpoint.clone())));
    assert_eq!(endpoint, format!("http://127.0.0.1:{}", moto.port()));
    let config = impatient(&moto.sdk_config().await);
    let sqs = aws_sdk_sqs::Client::new(&config);
    moto::create_queue(&config, "before-stop").await;

    moto.stop();
    sqs.list_queues()
        .send()
        .await
        .expect_err("a stopped emulator does not answer");
    assert!(
        TcpStream::connect(moto.addr()).is_err(),
        "port still open after stop()"
    );

    moto.restart();
    let queues = sqs
        .list_queues()
        .send()
        .await
        .expect("ListQueues after restart");
    assert!(
        queues.queue_urls().is_empty(),
        "state survived a restart: {queues:?}"
    );

    let addr = moto.addr();
    drop(moto);
    assert!(
        TcpStream::connect(addr).is_err(),
        "moto still listening after drop"
    );
}

/// A stand-in server that reads whatever arrives and never answers or closes.
fn silent_server() -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut sink = [0u8; 4096];
                while matches!(std::io::Read::read(&mut conn, &mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    (addr, handle)
}

#[test]
fn proxy_records_keep_alive_and_chunked_and_cut_kills_live() {
    use std::io::{Read, Write};

    let (target, _server) = silent_server();
    let proxy = Proxy::start_recording(target);
    let mut client = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    // Two requests on one connection, the second chunked, written in awkward pieces.
    let wire = b"POST /a HTTP/1.1\r\nHost: x\r\nX-Amz-Target: Svc.First\r\nContent-Length: 11\r\n\r\nhello world\
POST /b HTTP/1.1\r\nHost: x\r\nx-amz-target: Svc.Second\r\nTransfer-Encoding: chunked\r\n\r\n\
5\r\nchunk\r\n7;ext=1\r\ned-body\r\n0\r\nTrailer: t\r\n\r\n";
    for piece in wire.chunks(7) {
        client.write_all(piece).expect("write");
        std::thread::sleep(Duration::from_millis(1));
    }
    let second = proxy
        .wait_for_request(Duration::from_secs(5), |r| r.operation() == Some("Second"))
        .unwrap_or_else(|| panic!("second request not recorded: {:?}", proxy.requests()));
    let requests = proxy.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let first = &requests[0];
    assert_eq!((first.method.as_str(), first.path.as_str()), ("POST", "/a"));
    assert_eq!(first.amz_target(), Some("Svc.First"));
    assert_eq!(first.body, b"hello world");
    assert_eq!(second.path, "/b");
    assert_eq!(second.body_str(), "chunked-body");
    assert_eq!(first.connection, second.connection);
    assert_eq!(proxy.connections_accepted(), 1);

    // cut() kills the live connection: the client's blocked read ends at once.
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let started = Instant::now();
    proxy.cut();
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("read {n} bytes from a cut connection"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // New connections are reset while cut...
    let mut late = TcpStream::connect(proxy.addr()).expect("the port stays bound");
    late.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let _ = late.write_all(b"GET / HTTP/1.1\r\n\r\n");
    match late.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("read {n} bytes through a cut proxy"),
    }
    // ...and forwarded again after restore.
    proxy.restore();
    proxy.clear_requests();
    let mut again = TcpStream::connect(proxy.addr()).expect("connect after restore");
    again
        .write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let got = proxy
        .wait_for_request(Duration::from_secs(5), |r| r.path == "/again")
        .expect("forwarded and recorded after restore");
    assert!(got.body.is_empty());
}

/// The launcher's Auto Scaling lifecycle actions: validated as AWS validates them, recorded
/// with their time (refusals too), visible in DescribeAutoScalingInstances once completed,
/// and named by a recording proxy like any other call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_actions_are_validated_recorded_and_seen_through_a_proxy() {
    use aws_sdk_autoscaling::error::ProvideErrorMetadata as _;
    use aws_sdk_autoscaling::types::LifecycleState;

    let moto = Moto::start_private();
    let proxy = Proxy::start_recording(moto.addr());
    let config = moto::sdk_config_for(&proxy.url()).await;
    let name = moto::unique_name("fleet");
    let hook = format!("{name}-terminating");
    let group = moto::create_group_with_terminating_hook(&config, &name, &hook, 2, 600).await;
    assert_eq!(group.instance_ids.len(), 2);
    let (me, other) = (&group.instance_ids[0], &group.instance_ids[1]);
    assert_eq!(moto::lifecycle_state(&config, me).await, "InService");
    assert!(!moto::is_protected_from_scale_in(&config, me).await);

    let autoscaling = aws_sdk_autoscaling::Client::new(&config);
    let hooks = autoscaling
        .describe_lifecycle_hooks()
        .auto_scaling_group_name(&name)
        .send()
        .await
        .expect("DescribeLifecycleHooks");
    let hooks = hooks.lifecycle_hooks();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].lifecycle_hook_name(), Some(hook.as_str()));
    assert_eq!(
        hooks[0].lifecycle_transition(),
        Some("autoscaling:EC2_INSTANCE_TERMINATING")
    );

    autoscaling
        .set_instance_protection()
        .auto_scaling_group_name(&name)
        .instance_ids(me)
        .protected_from_scale_in(true)
        .send()
        .await
        .expect("SetInstanceProtection");
    assert!(moto::is_protected_from_scale_in(&config, me).await);
    assert!(!moto::is_protected_from_scale_in(&config, other).await);

    let heartbeat = || {
        autoscaling
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(&name)
            .lifecycle_hook_name(&hook)
            .instance_id(me)
    };
    let complete = |hook: &str, result: &str| {
        autoscaling
            .complete_lifecycle_action()
            .auto_scaling_group_name(&name)
            .lifecycle_hook_name(hook)
            .instance_id(me)
            .lifecycle_action_result(result)
    };
    heartbeat()
        .send()
        .await
        .expect("RecordLifecycleActionHeartbeat");
    for (request, expected) in [
        (complete(&hook, "MAYBE"), "CONTINUE or ABANDON"),
        (
            complete("not-a-hook", "CONTINUE"),
            "No Lifecycle Hook found",
        ),
    ] {
        let err = request.send().await.expect_err("refused");
        assert_eq!(err.code(), Some("ValidationError"), "{err:?}");
        assert!(
            err.message().unwrap_or_default().contains(expected),
            "{err:?}"
        );
    }
    let err = autoscaling
        .record_lifecycle_action_heartbeat()
        .auto_scaling_group_name("no-such-group")
        .lifecycle_hook_name(&hook)
        .instance_id(me)
        .send()
        .await
        .expect_err("no such group");
    assert_eq!(err.code(), Some("ValidationError"), "{err:?}");
    assert_eq!(moto::lifecycle_state(&config, me).await, "InService");

    complete(&hook, "CONTINUE")
        .send()
        .await
        .expect("CompleteLifecycleAction");
    assert_eq!(
        moto::describe_auto_scaling_instance(&config, me)
            .await
            .lifecycle_state(),
        Some(LifecycleState::TerminatingProceed.as_str())
    );
    assert_eq!(moto::lifecycle_state(&config, other).await, "InService");
    // Completed: no action is pending any more.
    let err = heartbeat().send().await.expect_err("no active action");
    assert!(
        err.message()
            .unwrap_or_default()
            .contains("No active Lifecycle Action"),
        "{err:?}"
    );

    let calls = moto.lifecycle_actions();
    let summary: Vec<(&str, Option<&str>, bool)> = calls
        .iter()
        .map(|c| (c.op.as_str(), c.result.as_deref(), c.error.is_none()))
        .collect();
    assert_eq!(
        summary,
        [
            ("RecordLifecycleActionHeartbeat", None, true),
            ("CompleteLifecycleAction", Some("MAYBE"), false),
            ("CompleteLifecycleAction", Some("CONTINUE"), false),
            ("RecordLifecycleActionHeartbeat", None, false),
            ("CompleteLifecycleAction", Some("CONTINUE"), true),
            ("RecordLifecycleActionHeartbeat", None, false),
        ]
    );
    let done = moto
        .wait_for_lifecycle_action(&name, "CompleteLifecycleAction", DEADLINE)
        .expect("the accepted completion");
    assert_eq!(done.group.as_deref(), Some(name.as_str()));
    assert_eq!(done.hook.as_deref(), Some(hook.as_str()));
    assert_eq!(done.instance.as_deref(), Some(me.as_str()));
    assert!(calls.windows(2).all(|w| w[0].at() <= w[1].at()));

    // The recording proxy names query-protocol calls by their Action, and reads their form.
    let completions = proxy.requests_for("CompleteLifecycleAction");
    assert_eq!(completions.len(), 3, "{:?}", proxy.requests());
    assert_eq!(
        completions[2]
            .form_param("LifecycleActionResult")
            .as_deref(),
        Some("CONTINUE")
    );
    assert_eq!(
        completions[2].form_param("InstanceId").as_deref(),
        Some(me.as_str())
    );
    let protection = proxy.requests_for("SetInstanceProtection");
    assert_eq!(protection.len(), 1);
    assert_eq!(
        protection[0].form_param("InstanceIds.member.1").as_deref(),
        Some(me.as_str())
    );
    assert_eq!(
        protection[0].form_param("ProtectedFromScaleIn").as_deref(),
        Some("true")
    );
    assert_eq!(
        proxy.requests_for("RecordLifecycleActionHeartbeat").len(),
        3
    );
}
