//! `make bench`: the resident agent measured against the per-job-process approach it
//! replaces, with real processes against a local moto. Prints a table and writes
//! `bench/results.json`. `--smoke` runs a few jobs per figure (seconds, not minutes) and
//! asserts only that every job completed and every number is finite and positive; it is part
//! of `make test` so that this program cannot rot. Targets are judged only in full mode.
//!
//! Method (also printed with the results):
//! - Everything the agent and the baseline say to AWS goes through a timing proxy in this
//!   process (a loopback TCP relay that parses HTTP/1.1). For each request it records the
//!   operation, the task token of Step Functions callbacks, and the wall-clock time at which
//!   the last byte of the *response* was handed back to the client: "acknowledged".
//! - The job scripts stamp their own start and end with bash's `$EPOCHREALTIME` (a builtin,
//!   no fork, µs resolution, the same wall clock). The end stamp is the script's last act.
//! - Task tokens are real: a state machine with one `sqs:sendMessage.waitForTaskToken` task
//!   puts each token on a side queue; the bench collects them before a measurement starts and
//!   then sends the job message to the agent's queue itself, so the `SendMessage` time is
//!   known exactly.
//! - Figure 1, Completion to callback: end stamp → SendTaskSuccess acknowledged, one job at a time.
//!   The baseline is `tests/bench/baseline_callback.py`, started fresh per job (interpreter
//!   start and imports included) by a stand-in for the legacy `rsql_trigger.sh` right after
//!   the job exits; it goes through the same proxy to the same moto.
//! - Figure 2, Dispatch: just before `SendMessage` → the script's start stamp.
//! - Figure 3, Agent CPU per job: utime+stime of the agent (fields 14 and 15 of /proc/PID/stat:
//!   all its threads, without its reaped children, whose time goes to cutime/cstime) across
//!   N trivial jobs, up to the last DeleteMessage being acknowledged, divided by N.
//! - Figure 4, Idle footprint: VmRSS after start-up (first ReceiveMessage seen) and after the CPU
//!   run; utime+stime over an idle window with no messages.
//! - Figure 5, Capture overhead: the script's own start→end wall time writing N MB of 100-byte
//!   lines to stdout, under the agent (local log file only) vs redirected to /dev/null by
//!   the bench (median of the repetitions). Peak RSS is the agent's VmHWM (a fresh agent)
//!   and the highest VmRSS sampled every 20 ms.
//! - Figure 6, Log shipping: a job writes N MB; throughput is the event bytes in successful
//!   PutLogEvents / (last PutLogEvents acknowledged − job start). moto's own limit: this
//!   program's PutLogEvents loop with maximum-size batches (1,000 events of 1,022 bytes,
//!   1,048,000 bytes with overhead), through the same proxy.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::SdkConfig;
use rsql_agent_tests::bins;
use rsql_agent_tests::moto::{self, Moto};
use serde_json::{json, Value};

const LOG_GROUP: &str = "/ops/rsql-logs/";
const JOB_WAIT: Duration = Duration::from_secs(120);

/// How much each figure does.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    warmup: usize,
    callback_jobs: usize,
    cpu_jobs: usize,
    idle: Duration,
    capture_bytes: u64,
    capture_reps: usize,
    ship_bytes: u64,
    moto_limit_bytes: u64,
}

const FULL: Sizes = Sizes {
    warmup: 3,
    callback_jobs: 50,
    cpu_jobs: 500,
    idle: Duration::from_secs(60),
    capture_bytes: 200_000_000,
    capture_reps: 3,
    ship_bytes: 50_000_000,
    moto_limit_bytes: 50_000_000,
};

const SMOKE: Sizes = Sizes {
    warmup: 1,
    callback_jobs: 4,
    cpu_jobs: 10,
    idle: Duration::from_secs(3),
    capture_bytes: 5_000_000,
    capture_reps: 1,
    ship_bytes: 1_000_000,
    moto_limit_bytes: 2_096_000,
};

fn main() -> ExitCode {
    let mut smoke = false;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--out" => match args.next() {
                Some(path) => out = Some(PathBuf::from(path)),
                None => return usage("--out needs a path"),
            },
            "-h" | "--help" => {
                println!(
                    "usage: rsql-bench [--smoke] [--out PATH]  (default out: bench/results.json, --smoke: bench/results-smoke.json)"
                );
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    // A smoke run (part of `make test`) must not overwrite the last full results.
    let out = out.unwrap_or_else(|| {
        bins::workspace_root().join(if smoke {
            "bench/results-smoke.json"
        } else {
            "bench/results.json"
        })
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Job owners are double-forked away from the agent; as their subreaper this process
    // can reap them and count their CPU (figure 3).
    nix::sys::prctl::set_child_subreaper(true).expect("become a child subreaper");
    let results = runtime.block_on(run(if smoke { SMOKE } else { FULL }, smoke));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).expect("create the results directory");
    }
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&results).expect("results JSON") + "\n",
    )
    .expect("write results");
    println!("\nresults written to {}", out.display());
    if smoke {
        let problems = sanity(&results);
        if !problems.is_empty() {
            eprintln!("rsql-bench --smoke: insane results:");
            for p in &problems {
                eprintln!("  {p}");
            }
            return ExitCode::FAILURE;
        }
        println!("smoke: every job completed and every figure is finite and positive");
    }
    ExitCode::SUCCESS
}

/// When the run started, for the progress lines.
fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn usage(message: &str) -> ExitCode {
    eprintln!("rsql-bench: {message}\nusage: rsql-bench [--smoke] [--out PATH]");
    ExitCode::from(2)
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// Everything the figures share: moto, queues, the audit table, scripts.
#[derive(Debug)]
struct World {
    moto: Moto,
    sdk: SdkConfig,
    agent_queue: String,
    token_queue: String,
    token_machine: String,
    table: String,
    work: tempfile::TempDir,
    scripts: PathBuf,
    next_job: usize,
}

async fn run(sizes: Sizes, smoke: bool) -> Value {
    let mode = if smoke { "smoke" } else { "full" };
    started();
    println!(
        "rsql-bench ({mode}): agent {}, moto from {}",
        bins::agent().display(),
        moto::venv_dir().display()
    );
    let mut world = World::new().await;
    let mut figures = serde_json::Map::new();

    // Figures 1-4 share one agent, started fresh here.
    let proxy = TimingProxy::start(world.moto.addr());
    let mut agent = BenchAgent::start(&world, &proxy, true);
    let mut ready = false;
    for _ in 0..600 {
        if proxy.count_requests("ReceiveMessage") > 0 {
            ready = true;
            break;
        }
        agent.assert_running();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ready, "the agent never polled its queue:\n{}", agent.log());
    std::thread::sleep(Duration::from_secs(1));
    let rss_start_kb = proc_status_kb(agent.pid(), "VmRSS");

    // 1 + 2: one job at a time through the agent.
    println!(
        "{:6.1}s [1/6] completion to callback and dispatch: {} agent jobs",
        started().elapsed().as_secs_f64(),
        sizes.callback_jobs
    );
    let tokens = world.tokens(sizes.warmup + sizes.callback_jobs).await;
    let mut agent_cb = Vec::new();
    let mut dispatch = Vec::new();
    let mut token_check = Vec::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let marker = world.marker();
        let deletes = proxy.count_ok("DeleteMessage");
        let sent = world
            .send_job(&token, "bench_job.sh", &[marker.display().to_string()])
            .await;
        let ack = proxy.wait_ack("SendTaskSuccess", &token, JOB_WAIT, &agent);
        proxy.wait_count("DeleteMessage", deletes + 1, JOB_WAIT, &agent);
        let stamps = Stamps::read(&marker);
        if i >= sizes.warmup {
            agent_cb.push(ms_between(stamps.end, ack));
            dispatch.push(ms_between(sent, stamps.start));
            // The one SendTaskHeartbeat that checks the task is open before the start.
            if let Some(ms) = proxy.first_round_trip_ms("SendTaskHeartbeat", &token) {
                token_check.push(ms);
            }
        }
    }
    let shipping_during_fig1 = proxy.count_ok("PutLogEvents");

    // 1 (baseline): the legacy trigger + a fresh python callback per job, same moto.
    println!(
        "{:6.1}s [1/6] completion to callback: {} baseline jobs (fresh python per job)",
        started().elapsed().as_secs_f64(),
        sizes.callback_jobs
    );
    let tokens = world.tokens(sizes.warmup + sizes.callback_jobs).await;
    let mut base_cb = Vec::new();
    let mut base_cb_self = Vec::new();
    let mut base_cpu = Vec::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let (stamps, ack, reported) = world.run_baseline(&proxy, &token);
        if i >= sizes.warmup {
            base_cb.push(ms_between(stamps.end, ack));
            base_cb_self.push(ms_between(stamps.end, reported.acked));
            base_cpu.push(reported.cpu_ms);
        }
    }
    let agent_p = Pcts::of(&agent_cb);
    let base_p = Pcts::of(&base_cb);
    figures.insert(
        "completion_to_callback_ms".into(),
        json!({
            "jobs": agent_cb.len(),
            "warmup_jobs_excluded": sizes.warmup,
            "agent": agent_p.json(),
            "baseline": base_p.json(),
            "baseline_python_side": Pcts::of(&base_cb_self).json(),
            "ratio_p50": base_p.p50 / agent_p.p50,
            "ratio_p95": base_p.p95 / agent_p.p95,
            "agent_shipped_logs": shipping_during_fig1 > 0,
            "samples_agent": agent_cb,
            "samples_baseline": base_cb,
        }),
    );
    figures.insert(
        "dispatch_ms".into(),
        json!({
            "jobs": dispatch.len(),
            "agent": Pcts::of(&dispatch).json(),
            "baseline": null,
            "baseline_note": "the old dispatch was Lambda -> SSM SendCommand -> nohup; no local equivalent",
            "token_check": Pcts::of(&token_check).json(),
            "token_check_share_p50": Pcts::of(&token_check).p50 / Pcts::of(&dispatch).p50,
            "token_check_note": "the SendTaskHeartbeat round trip that checks the task is still open before each start (part of dispatch)",
            "samples": dispatch,
        }),
    );

    // 3: CPU per job over many trivial jobs, up to 4 at a time.
    println!(
        "{:6.1}s [3/6] agent CPU per job: {} trivial jobs",
        started().elapsed().as_secs_f64(),
        sizes.cpu_jobs
    );
    let tokens = world.tokens(sizes.cpu_jobs).await;
    let deletes = proxy.count_ok("DeleteMessage");
    // Each job's owner process is double-forked away from the agent and re-parented to this
    // process (a child subreaper): reaping it adds its CPU, and its job's, to our
    // RUSAGE_CHILDREN. Owners of earlier figures are reaped first.
    reap_owners();
    let owners0 = children_cpu_ms();
    let cpu0 = proc_cpu_ms(agent.pid());
    let t0 = Instant::now();
    world.send_jobs(&tokens, "bench_trivial.sh").await;
    proxy.wait_count(
        "DeleteMessage",
        deletes + tokens.len(),
        JOB_WAIT * 4,
        &agent,
    );
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = proc_cpu_ms(agent.pid());
    for token in &tokens {
        proxy.wait_ack("SendTaskSuccess", token, JOB_WAIT, &agent);
    }
    let per_job = (cpu1 - cpu0) / tokens.len() as f64;
    // An owner exits before its job is reported, so every one has exited by now.
    let mut reaped = 0;
    let reap_deadline = Instant::now() + JOB_WAIT;
    while reaped < tokens.len() && Instant::now() < reap_deadline {
        reaped += reap_owners();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(reaped, tokens.len(), "not every job owner exited");
    let owners_and_jobs = (children_cpu_ms() - owners0) / tokens.len() as f64;
    let job_alone = job_alone_cpu_ms(&world.scripts.join("bench_trivial.sh"), 20);
    let owner_per_job = (owners_and_jobs - job_alone).max(0.0);
    let base_cpu_p = Pcts::of(&base_cpu);
    figures.insert(
        "agent_cpu_per_job_ms".into(),
        json!({
            "jobs": tokens.len(),
            "agent_ms": per_job,
            "agent_total_ms": cpu1 - cpu0,
            "owner_ms": owner_per_job,
            "agent_plus_owner_ms": per_job + owner_per_job,
            "owner_and_job_ms": owners_and_jobs,
            "job_alone_ms": job_alone,
            "wall_s": wall,
            "jobs_per_s": tokens.len() as f64 / wall,
            "clock_tick_ms": 1000.0 / clk_tck(),
            "baseline_python_cpu_ms": base_cpu_p.json(),
            "ratio_p50": base_cpu_p.p50 / per_job,
        }),
    );

    // 4: footprint after the jobs, and CPU while idle.
    println!(
        "{:6.1}s [4/6] idle footprint: {} s idle",
        started().elapsed().as_secs_f64(),
        sizes.idle.as_secs()
    );
    std::thread::sleep(Duration::from_secs(2));
    let rss_after_kb = proc_status_kb(agent.pid(), "VmRSS");
    let idle0 = proc_cpu_ms(agent.pid());
    std::thread::sleep(sizes.idle);
    let idle_cpu = proc_cpu_ms(agent.pid()) - idle0;
    figures.insert(
        "idle_footprint".into(),
        json!({
            "rss_after_start_mb": rss_start_kb as f64 / 1024.0,
            "rss_after_jobs_mb": rss_after_kb as f64 / 1024.0,
            "jobs_before": sizes.warmup + sizes.callback_jobs + sizes.cpu_jobs,
            "idle_window_s": sizes.idle.as_secs_f64(),
            "idle_cpu_ms": idle_cpu,
            "idle_cpu_percent_of_core": idle_cpu / sizes.idle.as_secs_f64() / 10.0,
            "hwm_mb": proc_status_kb(agent.pid(), "VmHWM") as f64 / 1024.0,
        }),
    );
    agent.stop();
    drop(proxy);

    // 5: capture overhead, fresh agent, local log file only.
    println!(
        "{:6.1}s [5/6] capture overhead: {} MB to stdout, {} run(s) each way",
        started().elapsed().as_secs_f64(),
        sizes.capture_bytes / 1_000_000,
        sizes.capture_reps
    );
    figures.insert("capture".into(), world.capture(sizes).await);

    // 6: log shipping to moto, and moto's own limit.
    println!(
        "{:6.1}s [6/6] log shipping: {} MB through the agent; moto's limit with max-size batches",
        started().elapsed().as_secs_f64(),
        sizes.ship_bytes / 1_000_000
    );
    figures.insert("log_shipping".into(), world.shipping(sizes).await);

    let results = json!({
        "mode": mode,
        "when_unix_s": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        },
        "agent_binary": bins::agent().display().to_string(),
        "method": method_notes(),
        "figures": Value::Object(figures),
    });
    println!("{:6.1}s done", started().elapsed().as_secs_f64());
    let targets = targets(&results, smoke);
    let mut results = results;
    results["targets"] = targets;
    print_table(&results);
    results
}

impl World {
    async fn new() -> World {
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
    async fn fresh_queue(&mut self) {
        self.agent_queue = moto::create_queue(&self.sdk, &moto::unique_name("bench-jobs")).await;
    }

    fn marker(&mut self) -> PathBuf {
        self.next_job += 1;
        self.work
            .path()
            .join("markers")
            .join(format!("job-{}", self.next_job))
    }

    /// `n` real task tokens: one execution each, its token collected from the side queue.
    async fn tokens(&self, n: usize) -> Vec<String> {
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

    fn job_body(&mut self, token: &str, job: &str, args: &[String]) -> String {
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

    /// Sends one job message; returns the time just before the call.
    async fn send_job(&mut self, token: &str, job: &str, args: &[String]) -> SystemTime {
        let body = self.job_body(token, job, args);
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let before = SystemTime::now();
        sqs.send_message()
            .queue_url(&self.agent_queue)
            .message_body(body)
            .send()
            .await
            .expect("SendMessage");
        before
    }

    async fn send_jobs(&mut self, tokens: &[String], job: &str) {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        for chunk in tokens.chunks(10) {
            let mut batch = sqs.send_message_batch().queue_url(&self.agent_queue);
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
    fn run_baseline(&mut self, proxy: &TimingProxy, token: &str) -> (Stamps, SystemTime, Reported) {
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

    /// Figure 5.
    async fn capture(&mut self, sizes: Sizes) -> Value {
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
        let mut agent = BenchAgent::start(self, &proxy, false);
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
                token,
                "bench_write.sh",
                &[marker.display().to_string(), bytes.clone()],
            )
            .await;
            proxy.wait_ack("SendTaskSuccess", token, JOB_WAIT * 5, &agent);
            proxy.wait_count("DeleteMessage", deletes + 1, JOB_WAIT, &agent);
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

    /// Figure 6.
    async fn shipping(&mut self, sizes: Sizes) -> Value {
        let moto_limit = self.moto_limit(sizes.moto_limit_bytes).await;
        let proxy = TimingProxy::start(self.moto.addr());
        self.fresh_queue().await;
        let mut agent = BenchAgent::start(self, &proxy, true);
        let token = self.tokens(1).await.remove(0);
        let marker = self.marker();
        let lines = sizes.ship_bytes / 100;
        let expected = lines * 99;
        self.send_job(
            &token,
            "bench_write.sh",
            &[marker.display().to_string(), (lines * 100).to_string()],
        )
        .await;
        proxy.wait_ack("SendTaskSuccess", &token, JOB_WAIT * 5, &agent);
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
    async fn moto_limit(&self, bytes: u64) -> Value {
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
struct Reported {
    acked: SystemTime,
    cpu_ms: f64,
}

fn write_script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

// ---------------------------------------------------------------------------------------
// The agent under test
// ---------------------------------------------------------------------------------------

/// A release-like `rsql-agent run`: default log level, long polling, audit table, and
/// `[logs.cloudwatch]` when `ship` (the shipper, when built, then runs as in production).
#[derive(Debug)]
struct BenchAgent {
    child: Option<Child>,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl BenchAgent {
    fn start(world: &World, proxy: &TimingProxy, ship: bool) -> BenchAgent {
        let dir = tempfile::Builder::new()
            .prefix("rsql-bench-agent-")
            .tempdir()
            .expect("agent dir");
        let state = dir.path().join("state");
        let mut config = format!(
            "[agent]\nstate_dir = \"{state}\"\nmax_concurrent_jobs = 4\ninstance_id = \"i-0bench\"\n\
             shutdown_grace = \"30s\"\n\
             [jobs]\nscript_dir = \"{scripts}\"\nlog_dir = \"{state}/jobs\"\ndefault_timeout = \"10m\"\n\
             kill_grace = \"2s\"\nheartbeat_interval = \"20s\"\n\
             [intake.sqs]\nqueue_url = \"{queue}\"\nwait_time = \"20s\"\nvisibility_timeout = \"120s\"\n\
             [lock]\ndir = \"{locks}\"\n\
             [report.audit]\njob_table = \"{table}\"\n",
            state = state.display(),
            scripts = world.scripts.display(),
            queue = world.agent_queue,
            locks = dir.path().join("locks").display(),
            table = world.table,
        );
        if ship {
            config.push_str(&format!(
                "[logs.cloudwatch]\nlog_group = \"{LOG_GROUP}\"\ncreate_group = true\n"
            ));
        }
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, config).expect("write agent config");
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod agent config");
        let log_path = dir.path().join("agent.log");
        let log = File::create(&log_path).expect("agent log");
        let child = Command::new(bins::agent())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .envs(moto::aws_env(&proxy.url()))
            .env_remove("RSQL_AGENT_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start rsql-agent");
        BenchAgent {
            child: Some(child),
            log_path,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the agent exited ({status}):\n{}", self.log());
            }
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Timing proxy
// ---------------------------------------------------------------------------------------

/// One request through the proxy, and when its response was handed back.
#[derive(Debug, Clone)]
struct Rec {
    op: String,
    token: Option<String>,
    /// Event message bytes, for PutLogEvents.
    event_bytes: u64,
    status: u16,
    /// When the request had reached the proxy.
    sent: SystemTime,
    acked: Option<SystemTime>,
}

#[derive(Debug)]
struct ProxyShared {
    target: SocketAddr,
    recs: Mutex<Vec<Rec>>,
    changed: Condvar,
    stopping: AtomicBool,
}

impl ProxyShared {
    fn lock(&self) -> MutexGuard<'_, Vec<Rec>> {
        self.recs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy)]
struct Shipped {
    requests: usize,
    bytes: u64,
    last_ack: Option<SystemTime>,
}

/// A loopback HTTP/1.1 relay that timestamps each response's last byte.
#[derive(Debug)]
struct TimingProxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
}

impl TimingProxy {
    fn start(target: SocketAddr) -> TimingProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(ProxyShared {
            target,
            recs: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let shared = accept_shared.clone();
                std::thread::spawn(move || relay(client, shared));
            }
        });
        TimingProxy { addr, shared }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count_requests(&self, op: &str) -> usize {
        self.shared.lock().iter().filter(|r| r.op == op).count()
    }

    /// The round trip of the first `op` request that carried `token`.
    fn first_round_trip_ms(&self, op: &str, token: &str) -> Option<f64> {
        self.shared
            .lock()
            .iter()
            .find(|r| r.op == op && r.token.as_deref() == Some(token))
            .and_then(|r| Some(ms_between(r.sent, r.acked?)))
    }

    fn count_ok(&self, op: &str) -> usize {
        self.shared
            .lock()
            .iter()
            .filter(|r| r.op == op && r.acked.is_some() && r.status == 200)
            .count()
    }

    fn shipped(&self) -> Shipped {
        let recs = self.shared.lock();
        let mut s = Shipped {
            requests: 0,
            bytes: 0,
            last_ack: None,
        };
        for r in recs.iter() {
            if r.op == "PutLogEvents" && r.status == 200 {
                if let Some(at) = r.acked {
                    s.requests += 1;
                    s.bytes += r.event_bytes;
                    s.last_ack = Some(s.last_ack.map_or(at, |l: SystemTime| l.max(at)));
                }
            }
        }
        s
    }

    fn wait<T>(&self, timeout: Duration, mut f: impl FnMut(&[Rec]) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut recs = self.shared.lock();
        loop {
            if let Some(v) = f(&recs) {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            recs = self
                .shared
                .changed
                .wait_timeout(recs, left.min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn find_ack(recs: &[Rec], op: &str, token: &str) -> Option<SystemTime> {
        recs.iter()
            .find(|r| r.op == op && r.status == 200 && r.token.as_deref() == Some(token))
            .and_then(|r| r.acked)
    }

    fn wait_ack_plain(&self, op: &str, token: &str, timeout: Duration) -> SystemTime {
        self.wait(timeout, |recs| Self::find_ack(recs, op, token))
            .unwrap_or_else(|| panic!("no acknowledged {op} for a job within {timeout:?}"))
    }

    fn wait_ack(&self, op: &str, token: &str, timeout: Duration, agent: &BenchAgent) -> SystemTime {
        self.wait(timeout, |recs| Self::find_ack(recs, op, token))
            .unwrap_or_else(|| {
                panic!(
                    "no acknowledged {op} for a job within {timeout:?}; agent log:\n{}",
                    agent.log()
                )
            })
    }

    fn wait_count(&self, op: &str, n: usize, timeout: Duration, agent: &BenchAgent) {
        let ok = self.wait(timeout, |recs| {
            let c = recs
                .iter()
                .filter(|r| r.op == op && r.status == 200 && r.acked.is_some())
                .count();
            (c >= n).then_some(())
        });
        if ok.is_none() {
            panic!(
                "only {} of {n} {op} acknowledged within {timeout:?}; agent log:\n{}",
                self.count_ok(op),
                agent.log()
            );
        }
    }
}

impl Drop for TimingProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// One HTTP message as read off the wire: its raw bytes (forwarded unchanged), first line,
/// headers and (de-chunked) body.
#[derive(Debug)]
struct HttpMessage {
    raw: Vec<u8>,
    first_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpMessage {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_line(r: &mut impl BufRead, raw: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    let start = raw.len();
    if r.read_until(b'\n', raw)? == 0 {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&raw[start..])
            .trim_end_matches(['\r', '\n'])
            .to_string(),
    ))
}

/// Reads one message. `None` at a clean end of stream. `until_eof` bodies (a response with
/// neither length nor chunking) are read to the end of the stream.
fn read_message(
    r: &mut impl BufRead,
    response: bool,
    request_method: Option<&str>,
) -> std::io::Result<Option<HttpMessage>> {
    let mut raw = Vec::new();
    let Some(first_line) = read_line(r, &mut raw)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut raw)?
            .ok_or_else(|| std::io::Error::other("end of stream inside headers"))?;
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut msg = HttpMessage {
        raw,
        first_line,
        headers,
        body: Vec::new(),
    };
    let status: u16 = if response {
        msg.first_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let no_body = response && ((100..200).contains(&status) || status == 204 || status == 304)
        || request_method == Some("HEAD");
    let chunked = msg
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    let length = msg
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok());
    if no_body {
    } else if chunked {
        loop {
            let line = read_line(r, &mut msg.raw)?
                .ok_or_else(|| std::io::Error::other("end of stream in chunked body"))?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                while let Some(t) = read_line(r, &mut msg.raw)? {
                    if t.is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            msg.raw.extend_from_slice(&chunk);
            msg.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = length {
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        msg.raw.extend_from_slice(&body);
        msg.body = body;
    } else if response {
        r.read_to_end(&mut msg.body)?;
        msg.raw.extend_from_slice(&msg.body);
    }
    Ok(Some(msg))
}

fn relay(client: TcpStream, shared: Arc<ProxyShared>) {
    let Ok(server) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client_w), Ok(server_r)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // Indexes of requests forwarded and not yet answered, with their methods, in order.
    let pending: Arc<Mutex<VecDeque<(usize, String)>>> = Arc::new(Mutex::new(VecDeque::new()));
    let up = {
        let shared = shared.clone();
        let pending = pending.clone();
        std::thread::spawn(move || {
            let mut from = BufReader::new(client);
            let mut to = server;
            loop {
                match read_message(&mut from, false, None) {
                    Ok(Some(msg)) => {
                        let op = msg
                            .header("x-amz-target")
                            .map(|t| t.rsplit('.').next().unwrap_or(t).to_string())
                            .unwrap_or_else(|| msg.first_line.clone());
                        let json: Option<Value> =
                            if op == "PutLogEvents" || op.starts_with("SendTask") {
                                serde_json::from_slice(&msg.body).ok()
                            } else {
                                None
                            };
                        let token = json
                            .as_ref()
                            .and_then(|j| j["taskToken"].as_str())
                            .map(str::to_string);
                        let event_bytes = json
                            .as_ref()
                            .and_then(|j| j["logEvents"].as_array())
                            .map(|events| {
                                events
                                    .iter()
                                    .map(|e| e["message"].as_str().map_or(0, |m| m.len() as u64))
                                    .sum()
                            })
                            .unwrap_or(0);
                        let method = msg.first_line.split(' ').next().unwrap_or("").to_string();
                        {
                            let mut recs = shared.lock();
                            recs.push(Rec {
                                op,
                                token,
                                event_bytes,
                                status: 0,
                                sent: SystemTime::now(),
                                acked: None,
                            });
                            pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push_back((recs.len() - 1, method));
                            shared.changed.notify_all();
                        }
                        if to.write_all(&msg.raw).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        // Not HTTP we understand: forward the rest unparsed.
                        let _ = std::io::copy(&mut from, &mut to);
                        break;
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    let mut from = BufReader::new(server_r);
    let mut to = client_w;
    loop {
        let method = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .front()
            .map(|(_, m)| m.clone());
        match read_message(&mut from, true, method.as_deref()) {
            Ok(Some(msg)) => {
                if to.write_all(&msg.raw).is_err() {
                    break;
                }
                let at = SystemTime::now();
                let status: u16 = msg
                    .first_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if (100..200).contains(&status) {
                    continue;
                }
                let front = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop_front();
                if let Some((i, _)) = front {
                    let mut recs = shared.lock();
                    recs[i].status = status;
                    recs[i].acked = Some(at);
                    shared.changed.notify_all();
                }
            }
            Ok(None) => break,
            Err(_) => {
                let _ = std::io::copy(&mut from, &mut to);
                break;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = up.join();
}

// ---------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------

/// A script's own start and end stamps.
#[derive(Debug, Clone, Copy)]
struct Stamps {
    start: SystemTime,
    end: SystemTime,
}

impl Stamps {
    fn read(marker: &Path) -> Stamps {
        let text = std::fs::read_to_string(marker)
            .unwrap_or_else(|e| panic!("job marker {}: {e}", marker.display()));
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| parse_epoch(v.trim()))
                .unwrap_or_else(|| panic!("no {key:?} stamp in {}: {text:?}", marker.display()))
        };
        Stamps {
            start: get("start "),
            end: get("end "),
        }
    }
}

/// `$EPOCHREALTIME`: seconds, a locale's decimal point, microseconds.
fn parse_epoch(s: &str) -> SystemTime {
    let (secs, frac) = s
        .split_once(['.', ','])
        .unwrap_or_else(|| panic!("bad stamp {s:?}"));
    let secs: u64 = secs.parse().expect("stamp seconds");
    let mut micros = frac.to_string();
    micros.truncate(6);
    while micros.len() < 6 {
        micros.push('0');
    }
    UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.parse().expect("µs"))
}

/// Milliseconds from `a` to `b` (negative when `b` is earlier).
fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

#[derive(Debug, Clone, Copy)]
struct Pcts {
    n: usize,
    p50: f64,
    p95: f64,
    min: f64,
    max: f64,
}

impl Pcts {
    /// Nearest-rank percentiles of real samples.
    fn of(samples: &[f64]) -> Pcts {
        assert!(!samples.is_empty(), "no samples");
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let rank = |p: f64| s[((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Pcts {
            n: s.len(),
            p50: rank(50.0),
            p95: rank(95.0),
            min: s[0],
            max: s[s.len() - 1],
        }
    }

    fn json(&self) -> Value {
        json!({"n": self.n, "p50": self.p50, "p95": self.p95, "min": self.min, "max": self.max})
    }
}

fn median(samples: &[f64]) -> f64 {
    Pcts::of(samples).p50
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Reaps the job owner processes (`rsql-job-owner`) that exited as this process's children
/// (it is their subreaper); returns how many. Only those: other children (the agent, moto)
/// are waited for by their own handles.
fn reap_owners() -> usize {
    let me = std::process::id() as i32;
    let mut reaped = 0;
    for entry in std::fs::read_dir("/proc").expect("list /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let zombie_child =
            fields.first() == Some(&"Z") && fields.get(1) == Some(&me.to_string().as_str());
        if zombie_child && comm == "rsql-job-owner" {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            reaped += 1;
        }
    }
    reaped
}

/// utime + stime of this process's reaped children (RUSAGE_CHILDREN), in ms.
fn children_cpu_ms() -> f64 {
    // SAFETY: getrusage only writes the struct it is given, which is zeroed plain data.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

/// The CPU of the job itself (the trivial script run directly, `runs` times), per run, in ms:
/// what the owner's share of RUSAGE_CHILDREN includes besides the owner.
fn job_alone_cpu_ms(script: &Path, runs: usize) -> f64 {
    let before = children_cpu_ms();
    for _ in 0..runs {
        let status = std::process::Command::new(script)
            .status()
            .expect("run the trivial job");
        assert!(status.success());
    }
    (children_cpu_ms() - before) / runs as f64
}

/// utime + stime of a process (all its threads, without its children), in ms.
fn proc_cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let rest = stat.rsplit_once(')').map(|(_, r)| r).expect("stat format");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    (utime + stime) as f64 * 1000.0 / clk_tck()
}

/// A `kB` line of /proc/PID/status, e.g. VmRSS or VmHWM.
fn proc_status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::to_string))
        })
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn method_notes() -> Value {
    json!({
        "clock": "wall clock (CLOCK_REALTIME) everywhere; scripts stamp with bash $EPOCHREALTIME (builtin, µs)",
        "acknowledged": "a timing proxy in the bench relays all AWS traffic of the agent and the baseline and stamps the moment the last byte of each response is written back to the client",
        "completion_to_callback": "script's last act (end stamp) -> SendTaskSuccess acknowledged, one job at a time, warm-up jobs excluded; baseline = legacy trigger stand-in + fresh python3/boto3 process (interpreter start included) making DescribeTable, UpdateItem, CreateLogStream, PutLogEvents, SendTaskSuccess",
        "dispatch": "just before the bench's SendMessage -> script's start stamp (agent long-polls with wait_time 20 s)",
        "cpu_per_job": "agent utime+stime (/proc/PID/stat fields 14+15: all threads, reaped children excluded) across the trivial jobs up to the last DeleteMessage acknowledged, / jobs; resolution one clock tick. Job owners: the bench is their subreaper and reaps them; RUSAGE_CHILDREN over the same jobs, / jobs, less the trivial script's own CPU run directly (20 runs) = owner per job",
        "idle": "VmRSS after start-up (first ReceiveMessage) and after the CPU run; utime+stime over the idle window",
        "capture": "script's own start->end wall time writing 100-byte lines to stdout: under the agent (local log file only, no shipping) vs redirected to /dev/null (median); peak RSS = VmHWM of a fresh agent and max VmRSS sampled every 20 ms",
        "log_shipping": "event bytes in acknowledged PutLogEvents / (job start -> last PutLogEvents acknowledged); moto limit = the bench's own PutLogEvents loop, 1,000 x 1,022-byte events per batch, through the same proxy",
        "baseline_dispatch": "not measured: the old Lambda -> SSM SendCommand -> nohup path has no local equivalent",
    })
}

/// The performance targets in docs/performance.md, judged against the numbers (full mode only).
fn targets(r: &Value, smoke: bool) -> Value {
    let f = &r["figures"];
    let rows = [
        (
            "completion-to-callback p50 at least 30x faster than the baseline",
            f["completion_to_callback_ms"]["ratio_p50"].as_f64(),
            30.0,
            true,
        ),
        (
            "agent + job owner CPU per job at most 3 ms",
            f["agent_cpu_per_job_ms"]["agent_plus_owner_ms"].as_f64(),
            3.0,
            false,
        ),
        (
            "idle RSS at most 15 MB (after start-up)",
            f["idle_footprint"]["rss_after_start_mb"].as_f64(),
            15.0,
            false,
        ),
        (
            "idle RSS at most 15 MB (after the jobs)",
            f["idle_footprint"]["rss_after_jobs_mb"].as_f64(),
            15.0,
            false,
        ),
        (
            "capture overhead at most 10 %",
            f["capture"]["overhead_vs_devnull_percent"].as_f64(),
            10.0,
            false,
        ),
        (
            "agent RSS while capturing at most 40 MB",
            f["capture"]["agent_peak_rss_mb"].as_f64(),
            40.0,
            false,
        ),
    ];
    Value::Array(
        rows.iter()
            .map(|(name, value, limit, at_least)| {
                let met = if smoke {
                    Value::Null
                } else {
                    value.map_or(Value::Null, |v| {
                        json!(if *at_least { v >= *limit } else { v <= *limit })
                    })
                };
                json!({"target": name, "measured": value, "limit": limit, "met": met})
            })
            .collect(),
    )
}

fn print_table(r: &Value) {
    let f = &r["figures"];
    let n = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.2}"));
    let mut rows: Vec<[String; 4]> = Vec::new();
    let cb = &f["completion_to_callback_ms"];
    for p in ["p50", "p95"] {
        rows.push([
            format!("1. completion to callback {p} (ms)"),
            n(&cb["agent"][p]),
            n(&cb["baseline"][p]),
            format!("{}x", n(&cb[format!("ratio_{p}")])),
        ]);
    }
    let d = &f["dispatch_ms"]["agent"];
    for p in ["p50", "p95"] {
        rows.push([
            format!("2. dispatch SendMessage -> start {p} (ms)"),
            n(&d[p]),
            "n/a".into(),
            "".into(),
        ]);
    }
    let t = &f["dispatch_ms"]["token_check"];
    rows.push([
        "2. of which: task-open check p50 (ms)".into(),
        n(&t["p50"]),
        "n/a".into(),
        format!(
            "{:.0}% of dispatch",
            f["dispatch_ms"]["token_check_share_p50"]
                .as_f64()
                .unwrap_or(f64::NAN)
                * 100.0
        ),
    ]);
    let c = &f["agent_cpu_per_job_ms"];
    rows.push([
        format!("3. agent CPU per job (ms, {} jobs)", c["jobs"]),
        n(&c["agent_ms"]),
        format!("{} (python p50)", n(&c["baseline_python_cpu_ms"]["p50"])),
        format!("{}x", n(&c["ratio_p50"])),
    ]);
    rows.push([
        "3. agent + job owner CPU per job (ms)".into(),
        n(&c["agent_plus_owner_ms"]),
        format!("owner {}", n(&c["owner_ms"])),
        "".into(),
    ]);
    let i = &f["idle_footprint"];
    rows.push([
        "4. RSS after start-up (MB)".into(),
        n(&i["rss_after_start_mb"]),
        "".into(),
        "".into(),
    ]);
    rows.push([
        format!("4. RSS after {} jobs (MB)", i["jobs_before"]),
        n(&i["rss_after_jobs_mb"]),
        "".into(),
        "".into(),
    ]);
    rows.push([
        format!("4. idle CPU over {} s (ms)", i["idle_window_s"]),
        n(&i["idle_cpu_ms"]),
        "".into(),
        format!("{}% of a core", n(&i["idle_cpu_percent_of_core"])),
    ]);
    let cap = &f["capture"];
    rows.push([
        format!("5. write {} MB: under agent vs /dev/null (ms)", cap["mb"]),
        n(&cap["under_agent_ms"]),
        n(&cap["devnull_ms"]),
        format!("+{}%", n(&cap["overhead_vs_devnull_percent"])),
    ]);
    rows.push([
        "5. same, vs a plain file (ms)".into(),
        n(&cap["under_agent_ms"]),
        n(&cap["plain_file_ms"]),
        format!("+{}%", n(&cap["overhead_vs_plain_file_percent"])),
    ]);
    rows.push([
        "5. agent peak RSS while capturing (MB)".into(),
        n(&cap["agent_peak_rss_mb"]),
        "".into(),
        "".into(),
    ]);
    let s = &f["log_shipping"];
    rows.push([
        format!("6. log shipping to moto, {} MB (MB/s)", s["mb"]),
        if s["agent"].is_null() {
            "not available".into()
        } else {
            n(&s["agent"]["mb_per_s"])
        },
        format!("{} (moto limit)", n(&s["moto_limit"]["mb_per_s"])),
        s.get("ratio_to_moto_limit")
            .map_or(String::new(), |v| format!("{}x", n(v))),
    ]);
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
    println!(
        "\n{:w0$}  {:>14}  {:>22}  {:>16}",
        "figure", "agent", "baseline / reference", "ratio"
    );
    println!("{}", "-".repeat(w0 + 58));
    for row in &rows {
        println!(
            "{:w0$}  {:>14}  {:>22}  {:>16}",
            row[0], row[1], row[2], row[3]
        );
    }
    if let Some(note) = s["agent_note"].as_str() {
        println!("6. {note}");
    }
    println!("\ntargets ({}):", r["mode"].as_str().unwrap_or(""));
    for t in r["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not judged (smoke)",
        };
        println!(
            "  {:62} measured {:>10}  {met}",
            t["target"].as_str().unwrap_or(""),
            n(&t["measured"])
        );
    }
    println!("\nmethod:");
    if let Some(m) = r["method"].as_object() {
        for (k, v) in m {
            println!("  {k}: {}", v.as_str().unwrap_or(""));
        }
    }
}

/// Smoke-mode sanity: every figure present, finite and positive (CPU counters, which count
/// whole clock ticks, may be zero over a few jobs).
fn sanity(r: &Value) -> Vec<String> {
    let f = &r["figures"];
    let problems = std::cell::RefCell::new(Vec::new());
    let check = |name: &str, v: &Value, zero_ok: bool| match v.as_f64() {
        Some(x) if x.is_finite() && (x > 0.0 || zero_ok && x == 0.0) => {}
        _ => problems.borrow_mut().push(format!("{name} = {v}")),
    };
    let cb = &f["completion_to_callback_ms"];
    for who in ["agent", "baseline"] {
        for p in ["p50", "p95", "min"] {
            check(
                &format!("completion_to_callback {who} {p}"),
                &cb[who][p],
                false,
            );
        }
    }
    check("ratio_p50", &cb["ratio_p50"], false);
    for p in ["p50", "p95", "min"] {
        check(
            &format!("dispatch {p}"),
            &f["dispatch_ms"]["agent"][p],
            false,
        );
    }
    let c = &f["agent_cpu_per_job_ms"];
    check("agent_cpu_per_job", &c["agent_ms"], true);
    check(
        "agent_plus_owner_cpu_per_job",
        &c["agent_plus_owner_ms"],
        false,
    );
    check("jobs_per_s", &c["jobs_per_s"], false);
    check(
        "baseline python cpu",
        &c["baseline_python_cpu_ms"]["p50"],
        false,
    );
    let i = &f["idle_footprint"];
    check("rss_after_start_mb", &i["rss_after_start_mb"], false);
    check("rss_after_jobs_mb", &i["rss_after_jobs_mb"], false);
    check("idle_cpu_ms", &i["idle_cpu_ms"], true);
    let cap = &f["capture"];
    for k in [
        "under_agent_ms",
        "devnull_ms",
        "plain_file_ms",
        "agent_peak_rss_mb",
    ] {
        check(&format!("capture {k}"), &cap[k], false);
    }
    if !cap["overhead_vs_devnull_percent"]
        .as_f64()
        .is_some_and(f64::is_finite)
    {
        problems
            .borrow_mut()
            .push("capture overhead is not finite".into());
    }
    let s = &f["log_shipping"];
    check("moto limit MB/s", &s["moto_limit"]["mb_per_s"], false);
    if !s["agent"].is_null() {
        check("agent shipping MB/s", &s["agent"]["mb_per_s"], false);
        if s["agent"]["complete"] != json!(true) {
            problems
                .borrow_mut()
                .push(format!("agent shipping incomplete: {}", s["agent"]));
        }
    } else if s["agent_note"].as_str().is_none() {
        problems
            .borrow_mut()
            .push("log shipping has neither a number nor a note".into());
    }
    problems.into_inner()
}
