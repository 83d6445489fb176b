//! What the figures share (moto, the queues, the audit table, the scripts, the task tokens)
//! and the figures that need more than one agent: capture, shipping, moto's own limit.

use super::*;

/// Everything the figures share: moto, queues, the audit table, scripts.
#[derive(Debug)]
pub(super) struct World {
    pub(super) moto: Moto,
    pub(super) sdk: SdkConfig,
    pub(super) agent_queue: String,
    pub(super) token_queue: String,
    pub(super) token_machine: String,
    pub(super) table: String,
    pub(super) work: tempfile::TempDir,
    pub(super) scripts: PathBuf,
    pub(super) next_job: usize,
}

impl World {
    pub(super) async fn new() -> World {
        let moto = Moto::start();
        let sdk = moto.sdk_config().await;
        let agent_queue = moto::create_queue(&sdk, &moto::unique_name("bench-jobs")).await;
        let token_queue = moto::create_queue(&sdk, &moto::unique_name("bench-tokens")).await;
        // moto answers a heartbeat for a task without HeartbeatSeconds with InvalidToken;
        // the agent sends one as a job starts.
        let definition = moto::JobTask {
            timeout_seconds: 3600,
            catch: false,
            ..moto::JobTask::new(&token_queue, json!({"task_token.$": "$$.Task.Token"}), 900)
        }
        .definition();
        let token_machine =
            moto::create_state_machine(&sdk, &moto::unique_name("bench"), &definition).await;
        let table = moto::unique_name("rsql-job-audit");
        moto::create_job_audit_table(&sdk, &table).await;
        aws_sdk_cloudwatchlogs::Client::new(&sdk)
            .create_log_group()
            .log_group_name(LOG_GROUP)
            .send()
            .await
            .expect("CreateLogGroup");
        let work = tempfile::Builder::new()
            .prefix("rsql-bench-")
            .tempdir()
            .expect("temp dir");
        let scripts = work.path().join("scripts");
        std::fs::create_dir(&scripts).expect("mkdir scripts");
        std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755))
            .expect("chmod scripts");
        let line = "x".repeat(99);
        for (name, body) in [
            (
                "bench_job.sh",
                "printf 'start %s\\n' \"$EPOCHREALTIME\" >> \"$1\"\n\
                 echo \"bench job: one line of output\"\n\
                 printf 'end %s\\n' \"$EPOCHREALTIME\" >> \"$1\""
                    .to_string(),
            ),
            ("bench_trivial.sh", "true".to_string()),
            (
                "bench_write.sh",
                format!(
                    "printf 'start %s\\n' \"$EPOCHREALTIME\" >> \"$1\"\n\
                     yes '{line}' | head -c \"$2\"\n\
                     printf 'end %s\\n' \"$EPOCHREALTIME\" >> \"$1\""
                ),
            ),
        ] {
            write_script(&scripts, name, &body);
        }
        std::fs::create_dir(work.path().join("markers")).expect("mkdir markers");
        World {
            moto,
            sdk,
            agent_queue,
            token_queue,
            token_machine,
            table,
            work,
            scripts,
            next_job: 0,
        }
    }

    /// A new job queue for a new agent: a killed agent's long poll lives on inside moto and
    /// would take the next message into its visibility timeout.
    pub(super) async fn fresh_queue(&mut self) {
        self.agent_queue = self.new_queue().await;
    }

    /// A job queue of its own, for one more agent.
    pub(super) async fn new_queue(&self) -> String {
        moto::create_queue(&self.sdk, &moto::unique_name("bench-jobs")).await
    }

    pub(super) fn marker(&mut self) -> PathBuf {
        self.next_job += 1;
        self.work
            .path()
            .join("markers")
            .join(format!("job-{}", self.next_job))
    }

    /// `n` real task tokens: one execution each, its token collected from the side queue.
    pub(super) async fn tokens(&self, n: usize) -> Vec<String> {
        let sfn = aws_sdk_sfn::Client::new(&self.sdk);
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        for _ in 0..n {
            sfn.start_execution()
                .state_machine_arn(&self.token_machine)
                .input("{}")
                .send()
                .await
                .expect("StartExecution");
        }
        let mut tokens = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 2);
        while tokens.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} task tokens arrived",
                tokens.len()
            );
            let out = sqs
                .receive_message()
                .queue_url(&self.token_queue)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .expect("ReceiveMessage (tokens)");
            for m in out.messages.unwrap_or_default() {
                let body: Value =
                    serde_json::from_str(m.body().unwrap_or_default()).expect("token message");
                tokens.push(body["task_token"].as_str().expect("task_token").to_string());
                sqs.delete_message()
                    .queue_url(&self.token_queue)
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .send()
                    .await
                    .expect("DeleteMessage (tokens)");
            }
        }
        tokens
    }

    pub(super) fn job_body(&mut self, token: &str, job: &str, args: &[String]) -> String {
        self.next_job += 1;
        json!({
            "task_token": token,
            "workflow_id": "bench",
            "workflow_execution_id": format!("bench_{}_{}", std::process::id(), self.next_job),
            "job_name": job,
            "args": args,
            "timeout_seconds": 600,
            "heartbeat_seconds": 60,
        })
        .to_string()
    }

    /// Sends one job message to `queue`; returns the time just before the call.
    pub(super) async fn send_job(
        &mut self,
        queue: &str,
        token: &str,
        job: &str,
        args: &[String],
    ) -> SystemTime {
        let body = self.job_body(token, job, args);
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let before = SystemTime::now();
        sqs.send_message()
            .queue_url(queue)
            .message_body(body)
            .send()
            .await
            .expect("SendMessage");
        before
    }

    pub(super) async fn send_jobs(&mut self, queue: &str, tokens: &[String], job: &str) {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        for chunk in tokens.chunks(10) {
            let mut batch = sqs.send_message_batch().queue_url(queue);
            for (i, token) in chunk.iter().enumerate() {
                let body = self.job_body(token, job, &[]);
                batch = batch.entries(
                    aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                        .id(format!("m{i}"))
                        .message_body(body)
                        .build()
                        .expect("batch entry"),
                );
            }
            let out = batch.send().await.expect("SendMessageBatch");
            assert!(out.failed.is_empty(), "SendMessageBatch failed: {out:?}");
        }
    }

    /// One baseline job: the legacy trigger runs the job, then a fresh python callback.
    pub(super) fn run_baseline(
        &mut self,
        proxy: &TimingProxy,
        token: &str,
    ) -> (Stamps, SystemTime, Reported) {
        let marker = self.marker();
        let log = marker.with_extension("log");
        let trigger = self.work.path().join("rsql_trigger.sh");
        if !trigger.exists() {
            std::fs::write(
                &trigger,
                "#!/bin/bash\n\
                 # Stand-in for the legacy rsql_trigger.sh: run the job, then call back from a\n\
                 # fresh Python/boto3 process.\n\
                 token=$1 wf=$2 exec_id=$3 script=$4 instance=$5 log=$6 table=$7 group=$8\n\
                 shift 8\n\
                 \"$script\" \"$@\" > \"$log\" 2>&1\n\
                 rc=$?\n\
                 \"$BENCH_PYTHON\" \"$BENCH_CALLBACK\" \"$token\" \"$wf\" \"$exec_id\" \"$(basename \"$script\")\" \\\n\
                   \"$instance\" \"$log\" \"$table\" \"$group\" \"$rc\"\n",
            )
            .expect("write trigger");
        }
        self.next_job += 1;
        let exec_id = format!("base_{}_{}", std::process::id(), self.next_job);
        let out = Command::new("bash")
            .arg(&trigger)
            .args([
                token,
                "bench",
                &exec_id,
                &self.scripts.join("bench_job.sh").display().to_string(),
                "i-0bench",
                &log.display().to_string(),
                &self.table,
                LOG_GROUP,
                &marker.display().to_string(),
            ])
            .envs(moto::aws_env(&proxy.url()))
            .env("BENCH_PYTHON", moto::venv_dir().join("bin/python"))
            .env(
                "BENCH_CALLBACK",
                bins::workspace_root().join("tests/bench/baseline_callback.py"),
            )
            .stdin(Stdio::null())
            .output()
            .expect("run the baseline trigger");
        assert!(
            out.status.success(),
            "baseline callback failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let line: Value = serde_json::from_slice(&out.stdout).expect("baseline prints JSON");
        let acked_ns = line["acked_ns"].as_u64().expect("acked_ns");
        let reported = Reported {
            acked: UNIX_EPOCH + Duration::from_nanos(acked_ns),
            cpu_ms: line["cpu_s"].as_f64().expect("cpu_s") * 1000.0,
        };
        let ack = proxy.wait_ack_plain("SendTaskSuccess", token, JOB_WAIT);
        (Stamps::read(&marker), ack, reported)
    }

    /// Figure 5, for `build`.
    pub(super) async fn capture(&mut self, sizes: Sizes, build: &Build) -> Value {
        let bytes = sizes.capture_bytes.to_string();
        let script = self.scripts.join("bench_write.sh");
        let direct = |world: &mut World, sink: Stdio| -> f64 {
            let marker = world.marker();
            let status = Command::new(&script)
                .arg(&marker)
                .arg(&bytes)
                .stdin(Stdio::null())
                .stdout(sink)
                .status()
                .expect("run the writer directly");
            assert!(status.success(), "direct writer failed: {status}");
            let s = Stamps::read(&marker);
            ms_between(s.start, s.end)
        };
        let mut devnull = Vec::new();
        let mut to_file = Vec::new();
        for _ in 0..sizes.capture_reps {
            devnull.push(direct(self, Stdio::null()));
            let file = self.work.path().join("direct.out");
            to_file.push(direct(
                self,
                Stdio::from(File::create(&file).expect("direct.out")),
            ));
            let _ = std::fs::remove_file(&file);
        }

        let proxy = TimingProxy::start(self.moto.addr());
        self.fresh_queue().await;
        let queue = self.agent_queue.clone();
        let mut agent = BenchAgent::start(self, build, &queue, &proxy, false);
        let tokens = self.tokens(sizes.capture_reps).await;
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            let pid = agent.pid();
            std::thread::spawn(move || {
                let mut max = 0;
                while !stop.load(Ordering::SeqCst) {
                    max = max.max(proc_status_kb(pid, "VmRSS"));
                    std::thread::sleep(Duration::from_millis(20));
                }
                max
            })
        };
        let mut under_agent = Vec::new();
        for token in &tokens {
            let marker = self.marker();
            let deletes = proxy.count_ok("DeleteMessage");
            self.send_job(
                &queue,
                token,
                "bench_write.sh",
                &[marker.display().to_string(), bytes.clone()],
            )
            .await;
            proxy.wait_ack("SendTaskSuccess", token, JOB_WAIT * 5, || agent.log());
            proxy.wait_count("DeleteMessage", deletes + 1, JOB_WAIT, || agent.log());
            let s = Stamps::read(&marker);
            under_agent.push(ms_between(s.start, s.end));
        }
        stop.store(true, Ordering::SeqCst);
        let sampled_kb = sampler.join().expect("RSS sampler");
        let hwm_kb = proc_status_kb(agent.pid(), "VmHWM");
        agent.stop();
        let a = median(&under_agent);
        let d = median(&devnull);
        let f = median(&to_file);
        json!({
            "mb": sizes.capture_bytes as f64 / 1e6,
            "line_bytes": 100,
            "runs_each": sizes.capture_reps,
            "under_agent_ms": a,
            "devnull_ms": d,
            "plain_file_ms": f,
            "overhead_vs_devnull_percent": (a - d) / d * 100.0,
            "overhead_vs_plain_file_percent": (a - f) / f * 100.0,
            "agent_peak_rss_mb": hwm_kb as f64 / 1024.0,
            "agent_max_sampled_rss_mb": sampled_kb as f64 / 1024.0,
            "samples_under_agent_ms": under_agent,
            "samples_devnull_ms": devnull,
            "samples_plain_file_ms": to_file,
        })
    }

    /// Figure 6, for `build`.
    pub(super) async fn shipping(&mut self, sizes: Sizes, build: &Build) -> Value {
        let moto_limit = self.moto_limit(sizes.moto_limit_bytes).await;
        let proxy = TimingProxy::start(self.moto.addr());
        self.fresh_queue().await;
        let queue = self.agent_queue.clone();
        let mut agent = BenchAgent::start(self, build, &queue, &proxy, true);
        let token = self.tokens(1).await.remove(0);
        let marker = self.marker();
        let lines = sizes.ship_bytes / 100;
        let expected = lines * 99;
        self.send_job(
            &queue,
            &token,
            "bench_write.sh",
            &[marker.display().to_string(), (lines * 100).to_string()],
        )
        .await;
        proxy.wait_ack("SendTaskSuccess", &token, JOB_WAIT * 5, || agent.log());
        let stamps = Stamps::read(&marker);
        // Lines still unsent after the final flush keep shipping: wait for all of them, or
        // for the shipping to stall.
        let mut last_change = Instant::now();
        let mut last = proxy.shipped();
        let idle_limit = Duration::from_secs(15);
        while last.bytes < expected && last_change.elapsed() < idle_limit {
            std::thread::sleep(Duration::from_millis(200));
            let now = proxy.shipped();
            if now.requests != last.requests {
                last_change = Instant::now();
            }
            last = now;
        }
        let created_streams = proxy.count_ok("CreateLogStream");
        agent.stop();
        let mut out = json!({
            "mb": sizes.ship_bytes as f64 / 1e6,
            "event_bytes_expected": expected,
            "moto_limit": moto_limit,
        });
        if last.requests == 0 {
            out["agent"] = Value::Null;
            out["agent_note"] = json!(format!(
                "not available: shipper not built ([logs.cloudwatch] is configured, but the \
                 agent made no PutLogEvents call; CreateLogStream calls: {created_streams})"
            ));
            return out;
        }
        let Some(last_ack) = last.last_ack else {
            unreachable!("requests counted without an acknowledgement")
        };
        let secs = ms_between(stamps.start, last_ack) / 1000.0;
        let mbps = last.bytes as f64 / 1e6 / secs;
        out["agent"] = json!({
            "event_bytes_shipped": last.bytes,
            "complete": last.bytes >= expected,
            "put_log_events_calls": last.requests,
            "seconds_job_start_to_last_ack": secs,
            "mb_per_s": mbps,
        });
        if let Some(limit) = moto_limit["mb_per_s"].as_f64() {
            out["ratio_to_moto_limit"] = json!(mbps / limit);
        }
        out
    }

    /// moto's own PutLogEvents throughput: maximum-size batches, one at a time.
    pub(super) async fn moto_limit(&self, bytes: u64) -> Value {
        let proxy = TimingProxy::start(self.moto.addr());
        let sdk = moto::sdk_config_for(&proxy.url()).await;
        let logs = aws_sdk_cloudwatchlogs::Client::new(&sdk);
        let stream = moto::unique_name("bench-moto-limit");
        logs.create_log_stream()
            .log_group_name(LOG_GROUP)
            .log_stream_name(&stream)
            .send()
            .await
            .expect("CreateLogStream");
        let message = "y".repeat(1022);
        let batches = bytes.div_ceil(1000 * 1022).max(1);
        let mut sent = 0u64;
        let t0 = Instant::now();
        for _ in 0..batches {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let events: Vec<_> = (0..1000)
                .map(|_| {
                    aws_sdk_cloudwatchlogs::types::InputLogEvent::builder()
                        .timestamp(ts)
                        .message(&message)
                        .build()
                        .expect("event")
                })
                .collect();
            logs.put_log_events()
                .log_group_name(LOG_GROUP)
                .log_stream_name(&stream)
                .set_log_events(Some(events))
                .send()
                .await
                .expect("PutLogEvents");
            sent += 1000 * 1022;
        }
        let secs = t0.elapsed().as_secs_f64();
        json!({
            "batches": batches,
            "batch_bytes_with_overhead": 1000 * (1022 + 26),
            "event_bytes": sent,
            "seconds": secs,
            "mb_per_s": sent as f64 / 1e6 / secs,
        })
    }
}

#[derive(Debug)]
pub(super) struct Reported {
    pub(super) acked: SystemTime,
    pub(super) cpu_ms: f64,
}

pub(super) fn write_script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}
