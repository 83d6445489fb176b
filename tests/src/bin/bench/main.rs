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

mod agent;
mod measure;
mod report;
mod timing_proxy;
mod world;

use agent::BenchAgent;
use measure::*;
use report::*;
use timing_proxy::*;
use world::*;

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
