//! `make bench`: the resident agent measured against the per-job-process approach it
//! replaces, with real processes against a local moto. Prints a table and writes
//! `bench/results.json`. `--smoke` runs a few jobs per figure (seconds, not minutes) and
//! asserts only that every job completed and every number is finite and positive; it is part
//! of `make test` so that this program cannot rot. Targets are judged only in full mode.
//!
//! Side by side: with `--baseline-bin-dir DIR` (`make bench` passes the previous main's
//! build, see `make bench-baseline`), figures 1-3 are measured for both builds in the same
//! sitting, their agents running at once and taking turns job by job (figures 1-2) or in
//! alternating rounds (figure 3; see `side.rs`), and a second table shows previous main |
//! new | new/previous; `bench/results.json` has both under `side_by_side`. Each build's agent
//! runs its own `rsql-job-owner` (the direct launcher takes the one next to the agent).
//! Figures 4-6 are the current build's alone.
//!
//! Profiling: `--only cpu [--jobs N]` runs figure 3 alone (N jobs per build, default 500),
//! and `RSQL_BENCH_WRAP="strace -f -c -o /tmp/strace-{build}.txt"` (or `perf record ...
//! --`) puts a command in front of every agent it starts; `{build}` becomes `new` or
//! `previous`, and a wrapped agent is stopped with SIGTERM so the wrapper writes its report.
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

use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::SdkConfig;
use rsql_agent_tests::bins;
use rsql_agent_tests::moto::{self, Moto};
use rsql_agent_tests::timing::{ms_between, Pcts, Stamps, TimingProxy};
use serde_json::{json, Value};

mod agent;
mod measure;
mod report;
mod side;
mod world;

use agent::{BenchAgent, Build};
use measure::*;
use report::*;
use side::*;
use world::*;

const LOG_GROUP: &str = "/ops/rsql-logs/";
const JOB_WAIT: Duration = Duration::from_secs(120);

/// How much each figure does.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    warmup: usize,
    callback_jobs: usize,
    cpu_jobs: usize,
    /// Figure 3 side by side: each build's jobs in this many rounds, the builds alternating.
    cpu_rounds: usize,
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
    cpu_rounds: 5,
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
    cpu_rounds: 2,
    idle: Duration::from_secs(3),
    capture_bytes: 5_000_000,
    capture_reps: 1,
    ship_bytes: 1_000_000,
    moto_limit_bytes: 2_096_000,
};

const USAGE: &str =
    "usage: rsql-bench [--smoke] [--baseline-bin-dir DIR] [--only cpu [--jobs N]] [--out PATH]
  --smoke                  a few jobs per figure (checks sanity, not targets)
  --baseline-bin-dir DIR   also measure the previous main's build in DIR (rsql-agent and
                           rsql-job-owner, from `make bench-baseline`), side by side with this
                           tree's, interleaved, for figures 1-3
  --only cpu               figure 3 alone (agent and agent + owner CPU per job), N jobs
                           (default 500, --smoke 10) per build, for profiling under
                           RSQL_BENCH_WRAP
  --out PATH               default: bench/results.json (--smoke: bench/results-smoke.json,
                           --only cpu: bench/results-cpu.json)
environment: RSQL_BENCH_WRAP=\"CMD ARGS\" runs every agent as `CMD ARGS rsql-agent run ...`
  ({build} in it becomes new or previous), e.g. 'strace -f -c -o /tmp/strace-{build}.txt'";

/// What the command line asked for.
#[derive(Debug)]
struct Options {
    smoke: bool,
    out: Option<PathBuf>,
    baseline: Option<PathBuf>,
    only_cpu: bool,
    jobs: Option<usize>,
}

fn parse_args() -> Result<Option<Options>, String> {
    let mut o = Options {
        smoke: false,
        out: None,
        baseline: None,
        only_cpu: false,
        jobs: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{arg} needs {what}"));
        match arg.as_str() {
            "--smoke" => o.smoke = true,
            "--out" => o.out = Some(PathBuf::from(value("a path")?)),
            "--baseline-bin-dir" => o.baseline = Some(PathBuf::from(value("a directory")?)),
            "--only" => match value("a figure")?.as_str() {
                "cpu" => o.only_cpu = true,
                other => return Err(format!("--only {other:?}: only `cpu` is known")),
            },
            "--jobs" => {
                let n = value("a number")?;
                o.jobs = Some(
                    n.parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("--jobs {n:?}: not a positive number"))?,
                );
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.jobs.is_some() && !o.only_cpu {
        return Err("--jobs goes with --only cpu".into());
    }
    Ok(Some(o))
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => return usage(&message),
    };
    let current = Build::current();
    let baseline = match &o.baseline {
        None => None,
        Some(dir) => match Build::baseline(dir, &current) {
            Ok(b) => Some(b),
            Err(message) => {
                eprintln!("rsql-bench: {message}");
                return ExitCode::FAILURE;
            }
        },
    };
    // A smoke run (part of `make test`) must not overwrite the last full results.
    let out = o.out.clone().unwrap_or_else(|| {
        bins::workspace_root().join(if o.only_cpu {
            "bench/results-cpu.json"
        } else if o.smoke {
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
    let mut sizes = if o.smoke { SMOKE } else { FULL };
    let mut builds: Vec<Build> = baseline.into_iter().collect();
    builds.push(current);
    let results = if o.only_cpu {
        sizes.cpu_jobs = o.jobs.unwrap_or(sizes.cpu_jobs);
        runtime.block_on(run_cpu_only(sizes, &builds))
    } else {
        runtime.block_on(run(sizes, o.smoke, &builds))
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).expect("create the results directory");
    }
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&results).expect("results JSON") + "\n",
    )
    .expect("write results");
    println!("\nresults written to {}", out.display());
    if o.smoke && !o.only_cpu {
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
    eprintln!("rsql-bench: {message}\n{USAGE}");
    ExitCode::from(2)
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// The whole run. `builds` ends with the current tree's; one before it is the previous
/// main's, measured beside it for figures 1-3.
async fn run(sizes: Sizes, smoke: bool, builds: &[Build]) -> Value {
    let mode = if smoke { "smoke" } else { "full" };
    started();
    let current = builds.last().expect("the current build");
    for b in builds {
        println!(
            "rsql-bench ({mode}): {} agent {} ({})",
            b.label,
            b.agent().display(),
            b.commit.as_deref().unwrap_or("commit unknown")
        );
    }
    println!("moto from {}", moto::venv_dir().display());
    let mut world = World::new().await;
    let mut figures = serde_json::Map::new();

    // Figures 1-4 share one agent per build, started fresh here.
    let mut contenders = Vec::new();
    for b in builds {
        contenders.push(Contender::start(&mut world, b.clone()).await);
    }
    let new = contenders.len() - 1;
    let rss_start_kb = proc_status_kb(contenders[new].agent.pid(), "VmRSS");

    // 1 + 2: one job at a time through each agent, the builds taking turns.
    println!(
        "{:6.1}s [1/6] completion to callback and dispatch: {} jobs per build",
        started().elapsed().as_secs_f64(),
        sizes.callback_jobs
    );
    let latencies = latency(&mut world, &contenders, sizes.warmup, sizes.callback_jobs).await;
    let shipping_during_fig1 = contenders[new].proxy.count_ok("PutLogEvents");

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
        let (stamps, ack, reported) = world.run_baseline(&contenders[new].proxy, &token);
        if i >= sizes.warmup {
            base_cb.push(ms_between(stamps.end, ack));
            base_cb_self.push(ms_between(stamps.end, reported.acked));
            base_cpu.push(reported.cpu_ms);
        }
    }
    let ours = &latencies[new];
    let agent_p = Pcts::of(&ours.callback);
    let base_p = Pcts::of(&base_cb);
    figures.insert(
        "completion_to_callback_ms".into(),
        json!({
            "jobs": ours.callback.len(),
            "warmup_jobs_excluded": sizes.warmup,
            "agent": agent_p.json(),
            "baseline": base_p.json(),
            "baseline_python_side": Pcts::of(&base_cb_self).json(),
            "ratio_p50": base_p.p50 / agent_p.p50,
            "ratio_p95": base_p.p95 / agent_p.p95,
            "agent_shipped_logs": shipping_during_fig1 > 0,
            "samples_agent": ours.callback,
            "samples_baseline": base_cb,
        }),
    );
    figures.insert(
        "dispatch_ms".into(),
        json!({
            "jobs": ours.dispatch.len(),
            "agent": Pcts::of(&ours.dispatch).json(),
            "baseline": null,
            "baseline_note": "the old dispatch was Lambda -> SSM SendCommand -> nohup; no local equivalent",
            "token_check": Pcts::of(&ours.token_check).json(),
            "token_check_share_p50": Pcts::of(&ours.token_check).p50 / Pcts::of(&ours.dispatch).p50,
            "token_check_note": "the SendTaskHeartbeat round trip that checks the task is still open before each start (part of dispatch)",
            "samples": ours.dispatch,
        }),
    );

    // 3: CPU per job over many trivial jobs, up to 4 at a time.
    println!(
        "{:6.1}s [3/6] agent CPU per job: {} trivial jobs per build",
        started().elapsed().as_secs_f64(),
        sizes.cpu_jobs
    );
    let rounds = if contenders.len() > 1 {
        sizes.cpu_rounds
    } else {
        1
    };
    let cpu = cpu_rounds(&mut world, &contenders, sizes.cpu_jobs, rounds).await;
    let job_alone = job_alone_cpu_ms(&world.scripts.join("bench_trivial.sh"), 20);
    let base_cpu_p = Pcts::of(&base_cpu);
    let mut cpu_figure = cpu[new].json(job_alone);
    cpu_figure["baseline_python_cpu_ms"] = base_cpu_p.json();
    cpu_figure["ratio_p50"] = json!(base_cpu_p.p50 / cpu[new].agent_per_job());
    figures.insert("agent_cpu_per_job_ms".into(), cpu_figure);
    let side_by_side = (contenders.len() > 1)
        .then(|| side_by_side(&contenders, &latencies, &cpu, job_alone, rounds));

    // 4: footprint after the jobs, and CPU while idle: the current build's agent alone.
    let mut ours = contenders.pop().expect("the current build's agent");
    drop(contenders);
    println!(
        "{:6.1}s [4/6] idle footprint: {} s idle",
        started().elapsed().as_secs_f64(),
        sizes.idle.as_secs()
    );
    std::thread::sleep(Duration::from_secs(2));
    let agent = &mut ours.agent;
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
    drop(ours);

    // 5: capture overhead, fresh agent, local log file only.
    println!(
        "{:6.1}s [5/6] capture overhead: {} MB to stdout, {} run(s) each way",
        started().elapsed().as_secs_f64(),
        sizes.capture_bytes / 1_000_000,
        sizes.capture_reps
    );
    figures.insert("capture".into(), world.capture(sizes, current).await);

    // 6: log shipping to moto, and moto's own limit.
    println!(
        "{:6.1}s [6/6] log shipping: {} MB through the agent; moto's limit with max-size batches",
        started().elapsed().as_secs_f64(),
        sizes.ship_bytes / 1_000_000
    );
    figures.insert("log_shipping".into(), world.shipping(sizes, current).await);

    let mut results = json!({
        "mode": mode,
        "when_unix_s": unix_now_s(),
        "host": host_json(),
        "agent_binary": current.agent().display().to_string(),
        "builds": builds.iter().map(|b| (b.key.to_string(), b.json())).collect::<serde_json::Map<_, _>>(),
        "method": method_notes(),
        "figures": Value::Object(figures),
    });
    if let Some(side) = side_by_side {
        results["side_by_side"] = side;
    }
    println!("{:6.1}s done", started().elapsed().as_secs_f64());
    results["targets"] = targets(&results, smoke);
    print_table(&results);
    if !results["side_by_side"].is_null() {
        print_side_by_side(&results["side_by_side"]);
    }
    results
}

/// `--only cpu`: figure 3 alone, for each build (side by side in rounds when there are
/// two), e.g. under `RSQL_BENCH_WRAP` to profile it.
async fn run_cpu_only(sizes: Sizes, builds: &[Build]) -> Value {
    started();
    let mut world = World::new().await;
    let mut contenders = Vec::new();
    for b in builds {
        println!(
            "rsql-bench --only cpu: {} agent {} ({}){}",
            b.label,
            b.agent().display(),
            b.commit.as_deref().unwrap_or("commit unknown"),
            match agent::wrap_prefix(b) {
                w if w.is_empty() => String::new(),
                w => format!(", under {w:?}"),
            }
        );
        contenders.push(Contender::start(&mut world, b.clone()).await);
    }
    let rounds = if contenders.len() > 1 {
        sizes.cpu_rounds
    } else {
        1
    };
    println!(
        "{:6.1}s agent CPU per job: {} trivial jobs per build, {rounds} round(s)",
        started().elapsed().as_secs_f64(),
        sizes.cpu_jobs
    );
    let cpu = cpu_rounds(&mut world, &contenders, sizes.cpu_jobs, rounds).await;
    let job_alone = job_alone_cpu_ms(&world.scripts.join("bench_trivial.sh"), 20);
    let mut per_build = serde_json::Map::new();
    println!(
        "\n{:14} {:>8} {:>14} {:>14} {:>20} {:>10}",
        "build", "jobs", "agent ms/job", "owner ms/job", "agent+owner ms/job", "jobs/s"
    );
    for (c, t) in contenders.iter().zip(&cpu) {
        let f = t.json(job_alone);
        println!(
            "{:14} {:>8} {:>14.2} {:>14.2} {:>20.2} {:>10.1}",
            c.build.label,
            t.jobs,
            t.agent_per_job(),
            f["owner_ms"].as_f64().unwrap_or(f64::NAN),
            f["agent_plus_owner_ms"].as_f64().unwrap_or(f64::NAN),
            f["jobs_per_s"].as_f64().unwrap_or(f64::NAN),
        );
        per_build.insert(c.build.key.into(), f);
    }
    // Stop the agents before the report, so that a wrapper's own report is written.
    drop(contenders);
    json!({
        "mode": "only cpu",
        "when_unix_s": unix_now_s(),
        "host": host_json(),
        "wrap": std::env::var("RSQL_BENCH_WRAP").ok(),
        "builds": builds.iter().map(|b| (b.key.to_string(), b.json())).collect::<serde_json::Map<_, _>>(),
        "rounds": rounds,
        "agent_cpu_per_job_ms": Value::Object(per_build),
    })
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn host_json() -> Value {
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}
