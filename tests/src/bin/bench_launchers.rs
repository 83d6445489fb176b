//! `make bench-launchers` (and the second half of `make bench`): what starting a job costs
//! under each launcher, on the installed package in a real systemd (the sandbox of
//! `tests/src/sandbox.rs`), for the current tree's build and, with `--baseline-bin-dir`, the
//! previous main's, all side by side in one run on the same machine. Prints a table and
//! writes `bench/launchers.json`.
//!
//! One cell per launcher and build, each a sandbox of its own, all booted at once: the `.deb`
//! that `make package` built, installed, then the build's own binaries bound over the
//! packaged ones (`rsql-agent` and `rsql-wrapper` in /usr/bin, `rsql-job-owner` in
//! /usr/libexec/rsql-agent), so both builds run under the same unit files; the agent started
//! by systemd; its AWS traffic through a timing proxy of this process (the sandbox shares
//! the host's network) to the emulator on the host's loopback. Then trivial jobs (`noop.sh`:
//! it stamps its start and end with `$EPOCHREALTIME` and exits 0), each with a real task
//! token, one at a time, the cells taking turns (which goes first swaps every turn), so
//! that every cell sees the same noise of the machine:
//! - `systemd`: the packaged setup: the owner is an `rsql-job-owner@.service` unit that
//!   systemd starts from `rsql-job-owner.socket` (socket activation, no D-Bus), and the job
//!   runs as `rsql-job`;
//! - `direct`: `[jobs] launcher = "direct"`: the agent double-forks the owner, which stays
//!   in the agent's unit, and the job runs as the agent's user.
//!
//! Figures, per cell:
//! - dispatch: `date +%s%N` in the sandbox just before `rsql-wrapper submit` execs → the
//!   job's start stamp (read back from the job log), p50 and p95;
//! - completion to callback: the job's end stamp → SendTaskSuccess acknowledged by the
//!   proxy (the last byte of the answer handed back to the agent), p50 and p95; the sandbox
//!   shares the host's kernel, so its clock is the host's;
//! - CPU per job, from the cgroups (`cpu.stat` `usage_usec`, read on the host) from the
//!   first to the last measured job, divided by the jobs: `rsql-agent.service` plus
//!   `rsql-jobs.slice` (the agent, the owners and the jobs; under `direct` everything is in
//!   the agent's unit); PID 1 (`init.scope`: systemd's work for each unit start and stop);
//!   `systemd-journald.service` (what the units' starts log); `dbus.service`, when a
//!   dbus-daemon runs in the sandbox at all; and the whole sandbox. Every cell's window spans
//!   the other cells' turns too, so it includes idle time; the idle rate measured before the
//!   jobs is reported beside it (`idle_ms_per_s`). The trivial job itself (one bash) is in
//!   every cell.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_sfn::types::ExecutionStatus;
use rsql_agent_tests::bins;
use rsql_agent_tests::moto;
use rsql_agent_tests::sandbox::{package, show, Sandbox};
use rsql_agent_tests::timing::{ms_between, Pcts, Stamps, TimingProxy};
use rsql_agent_tests::world::{StateMachine, World};
use serde_json::{json, Value};

/// Stamps its start and end into its log, which both launchers write (under `direct` the
/// job shares the agent unit's read-only file system).
const NOOP: &str = "#!/bin/bash\necho \"start $EPOCHREALTIME\"\necho \"end $EPOCHREALTIME\"\n";

/// Jobs per cell before the measured ones.
const WARMUP: usize = 3;
/// The idle window before the jobs.
const IDLE: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: rsql-bench-launchers [--jobs N | N] [--baseline-bin-dir DIR] [--bin-dir DIR] [--launchers systemd,direct] [--out PATH]
  N / --jobs N             measured jobs per cell (default 100), after 3 warm-up jobs
  --baseline-bin-dir DIR   also the previous main's rsql-agent, rsql-job-owner and rsql-wrapper
                           in DIR (`make bench-baseline`), side by side
  --bin-dir DIR            the current build's binaries (default: next to this program)
  --launchers LIST         default systemd,direct
  --out PATH               default bench/launchers.json
needs root (it boots systemd in its own namespaces) and the .deb of `make package`
(RSQL_AGENT_DEB or target/debian)";

/// One build's binaries.
#[derive(Debug, Clone)]
struct Build {
    key: &'static str,
    label: &'static str,
    dir: PathBuf,
    commit: Option<String>,
}

/// Where each build's binary goes in the sandbox.
const BINARIES: [(&str, &str); 3] = [
    ("rsql-agent", "/usr/bin/rsql-agent"),
    ("rsql-wrapper", "/usr/bin/rsql-wrapper"),
    ("rsql-job-owner", "/usr/libexec/rsql-agent/rsql-job-owner"),
];

impl Build {
    fn new(key: &'static str, label: &'static str, dir: PathBuf) -> Result<Build, String> {
        for (name, _) in BINARIES {
            if !dir.join(name).is_file() {
                return Err(format!(
                    "{} is missing ({label} build)",
                    dir.join(name).display()
                ));
            }
        }
        let commit = std::fs::read_to_string(dir.join("COMMIT"))
            .ok()
            .map(|c| c.trim().to_string())
            .or_else(|| (key == "new").then(git_describe).flatten());
        Ok(Build {
            key,
            label,
            dir,
            commit,
        })
    }
}

fn git_describe() -> Option<String> {
    std::process::Command::new("git")
        .arg("-C")
        .arg(bins::workspace_root())
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// One launcher × build: its sandbox and its proxy.
struct Cell {
    launcher: &'static str,
    build: Build,
    sandbox: Sandbox,
    proxy: TimingProxy,
    /// `--version` of each of [`BINARIES`] as installed in the sandbox.
    versions: Vec<String>,
    dispatch: Vec<f64>,
    callback: Vec<f64>,
}

/// The cgroups a cell's CPU is read from, under the sandbox's cgroup; `None` for one that
/// does not exist (no dbus-daemon ran, say).
const CGROUPS: [(&str, &str); 6] = [
    ("agent", "system.slice/rsql-agent.service"),
    ("jobs_slice", "rsql.slice/rsql-jobs.slice"),
    ("pid1", "init.scope"),
    ("journald", "system.slice/systemd-journald.service"),
    ("dbus", "system.slice/dbus.service"),
    ("sandbox", ""),
];

/// `usage_usec` of each of [`CGROUPS`], in ms.
fn cpu_ms(cell: &Cell) -> Vec<Option<f64>> {
    let root = cell.sandbox.cgroup();
    CGROUPS
        .iter()
        .map(|(_, rel)| {
            let stat = std::fs::read_to_string(root.join(rel).join("cpu.stat")).ok()?;
            stat.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|us| us as f64 / 1000.0)
        })
        .collect()
}

fn boot(world: &World, deb: &Path, launcher: &'static str, build: &Build) -> Cell {
    let t0 = Instant::now();
    let sandbox = Sandbox::boot(&format!("bench-{launcher}-{}", build.key));
    sandbox.install(deb);
    for (name, path) in BINARIES {
        sandbox.bind_file(&build.dir.join(name), path);
    }
    // What the units will run: the build's own binaries, as they say themselves.
    let versions: Vec<String> = BINARIES
        .iter()
        .map(|(_, path)| sandbox.ok(&[path, "--version"]).trim().to_string())
        .collect();
    let proxy = TimingProxy::start(world.moto.addr());
    let launcher_line = match launcher {
        "direct" => "launcher = \"direct\"\n",
        _ => "",
    };
    sandbox.configure_agent(
        &proxy.url(),
        &format!(
            "[agent]\nstate_dir = \"/var/lib/rsql-agent\"\ninstance_id = \"i-bench\"\n\
             [jobs]\nscript_dir = \"/opt/rsql/rsql_scripts\"\n{launcher_line}\
             [intake.socket]\npath = \"/run/rsql-agent/agent.sock\"\n"
        ),
    );
    sandbox.write("/opt/rsql/rsql_scripts/noop.sh", NOOP, 0o755);
    sandbox.ok(&["systemctl", "enable", "--now", "rsql-agent"]);
    sandbox.wait_active("rsql-agent", Duration::from_secs(60));
    println!(
        "{launcher:8} {:14} sandbox up in {:.1} s ({}: {})",
        build.label,
        t0.elapsed().as_secs_f64(),
        build.dir.display(),
        versions.join(", ")
    );
    Cell {
        launcher,
        build: build.clone(),
        sandbox,
        proxy,
        versions,
        dispatch: Vec::new(),
        callback: Vec::new(),
    }
}

/// One job through `cell`: (dispatch, completion to callback), in ms.
async fn run_job(world: &World, cell: &Cell, id: &str) -> (f64, f64) {
    let (exec, token) = world.execution(id).await;
    let script = format!(
        "date +%s%N; exec rsql-wrapper submit --task-token '{token}' --workflow-id bench \
         --workflow-execution-id {id} --job-name noop.sh --timeout-seconds 60 \
         --socket /run/rsql-agent/agent.sock >/dev/null"
    );
    let out = cell.sandbox.exec(&["sh", "-c", &script]);
    assert!(out.status.success(), "submit failed: {}", show(&out));
    let before_ns: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("date +%s%N");
    let before = std::time::UNIX_EPOCH + Duration::from_nanos(before_ns);
    let ack = cell.proxy.wait_ack(
        "SendTaskSuccess",
        &token,
        rsql_agent_tests::world::WAIT,
        || cell.sandbox.journal_all(),
    );
    let done = world.wait_execution(&exec).await;
    assert_eq!(*done.status(), ExecutionStatus::Succeeded, "{id}");
    let output = moto::execution_output(&done);
    assert_eq!(output["status"], "completed", "{id}: {output}");
    let log = cell
        .sandbox
        .sh(&format!("cat /var/log/rsql-agent/jobs/{id}/noop.sh.*.log"));
    let stamps = Stamps::parse(&log)
        .unwrap_or_else(|| panic!("no start and end stamps in the job log of {id}: {log}"));
    (
        ms_between(before, stamps.start),
        ms_between(stamps.end, ack),
    )
}

/// What the command line asked for.
struct Options {
    jobs: usize,
    baseline: Option<PathBuf>,
    bin_dir: PathBuf,
    launchers: Vec<&'static str>,
    out: PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        jobs: 100,
        baseline: None,
        bin_dir: bins::target_dir(),
        launchers: vec!["systemd", "direct"],
        out: bins::workspace_root().join("bench/launchers.json"),
    };
    let mut args = std::env::args().skip(1);
    let number = |n: &str| {
        n.parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{n:?} is not a positive number of jobs"))
    };
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{arg} needs {what}"));
        match arg.as_str() {
            "--jobs" => o.jobs = number(&value("a number")?)?,
            "--baseline-bin-dir" => o.baseline = Some(PathBuf::from(value("a directory")?)),
            "--bin-dir" => o.bin_dir = PathBuf::from(value("a directory")?),
            "--out" => o.out = PathBuf::from(value("a path")?),
            "--launchers" => {
                o.launchers = Vec::new();
                for l in value("a list")?.split(',') {
                    o.launchers.push(match l {
                        "systemd" => "systemd",
                        "direct" => "direct",
                        other => return Err(format!("unknown launcher {other:?}")),
                    });
                }
            }
            "-h" | "--help" => return Err(String::new()),
            n if n.chars().all(|c| c.is_ascii_digit()) => o.jobs = number(n)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::process::ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("rsql-bench-launchers: {message}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("rsql-bench-launchers: needs root: it boots systemd in its own namespaces; nothing was measured");
        return std::process::ExitCode::FAILURE;
    }
    let mut builds = Vec::new();
    if let Some(dir) = &o.baseline {
        builds.push(Build::new("previous", "previous main", dir.clone()));
    }
    builds.push(Build::new("new", "new", o.bin_dir.clone()));
    let builds: Vec<Build> = match builds.into_iter().collect() {
        Ok(b) => b,
        Err(message) => {
            eprintln!("rsql-bench-launchers: {message}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let results = measure(&o, &builds).await;
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir).expect("mkdir bench");
    }
    std::fs::write(
        &o.out,
        serde_json::to_string_pretty(&results).expect("json") + "\n",
    )
    .expect("write the results");
    println!("written to {}", o.out.display());
    std::process::ExitCode::SUCCESS
}

async fn measure(o: &Options, builds: &[Build]) -> Value {
    let t0 = Instant::now();
    let deb = package();
    let world = World::builder("bench-launchers")
        .socket_only()
        .state_machine(StateMachine::Capture)
        .build()
        .await;
    let mut cells = Vec::new();
    for &launcher in &o.launchers {
        for build in builds {
            cells.push(boot(&world, &deb, launcher, build));
        }
    }
    for i in 0..WARMUP {
        for k in turn_order(cells.len(), i) {
            let cell = &cells[k];
            run_job(
                &world,
                cell,
                &format!("warm_{}_{}_{i}", cell.launcher, cell.build.key),
            )
            .await;
        }
    }
    // Idle rate: every cell at rest, before the jobs.
    let idle0: Vec<_> = cells.iter().map(cpu_ms).collect();
    std::thread::sleep(IDLE);
    let idle1: Vec<_> = cells.iter().map(cpu_ms).collect();
    println!(
        "{:6.1}s {} cells up and warm; {} jobs per cell, one at a time, taking turns",
        t0.elapsed().as_secs_f64(),
        cells.len(),
        o.jobs
    );
    let window0 = Instant::now();
    let before: Vec<_> = cells.iter().map(cpu_ms).collect();
    for i in 0..o.jobs {
        for k in turn_order(cells.len(), i) {
            let id = format!("job_{}_{}_{i}", cells[k].launcher, cells[k].build.key);
            let (dispatch, callback) = run_job(&world, &cells[k], &id).await;
            cells[k].dispatch.push(dispatch);
            cells[k].callback.push(callback);
        }
    }
    let after: Vec<_> = cells.iter().map(cpu_ms).collect();
    let window_s = window0.elapsed().as_secs_f64();
    let dbus: Vec<bool> = cells
        .iter()
        .map(|c| {
            let out = c.sandbox.exec(&["systemctl", "is-active", "dbus.service"]);
            String::from_utf8_lossy(&out.stdout).trim() == "active"
        })
        .collect();
    let mut json_cells = Vec::new();
    for (k, cell) in cells.iter().enumerate() {
        let delta =
            |i: usize, a: &[Vec<Option<f64>>], b: &[Vec<Option<f64>>]| match (a[k][i], b[k][i]) {
                (Some(x), Some(y)) => Some(y - x),
                (None, Some(y)) => Some(y),
                _ => None,
            };
        let mut cpu = serde_json::Map::new();
        for (i, (name, _)) in CGROUPS.iter().enumerate() {
            cpu.insert(
                (*name).into(),
                json!(delta(i, &before, &after).map(|ms| ms / o.jobs as f64)),
            );
        }
        let per = |name: &str| cpu[name].as_f64().unwrap_or(0.0);
        let agent_owner_job = per("agent") + per("jobs_slice");
        let known = agent_owner_job + per("pid1") + per("journald") + per("dbus");
        let other = per("sandbox") - known;
        cpu.insert("agent_owner_job".into(), json!(agent_owner_job));
        cpu.insert("other".into(), json!(other));
        let idle = delta(5, &idle0, &idle1).map(|ms| ms / IDLE.as_secs_f64());
        json_cells.push(json!({
            "launcher": cell.launcher,
            "build": cell.build.key,
            "versions_inside": cell.versions,
            "jobs": cell.dispatch.len(),
            "dispatch_ms": Pcts::of(&cell.dispatch).json(),
            "completion_to_callback_ms": Pcts::of(&cell.callback).json(),
            "cpu_ms_per_job": Value::Object(cpu),
            "dbus_daemon_ran": dbus[k],
            "idle_ms_per_s": idle,
            "samples_dispatch_ms": cell.dispatch,
            "samples_completion_to_callback_ms": cell.callback,
        }));
    }
    let results = json!({
        "jobs_per_cell": o.jobs,
        "warmup_jobs_per_cell": WARMUP,
        "window_s": window_s,
        "deb": deb.display().to_string(),
        "builds": builds.iter().map(|b| (b.key.to_string(), json!({
            "label": b.label, "bin_dir": b.dir.display().to_string(), "commit": b.commit,
        }))).collect::<serde_json::Map<_, _>>(),
        "method": "one sandbox per launcher x build, all booted at once; the .deb installed, the build's rsql-agent, rsql-wrapper and rsql-job-owner bound over the packaged ones; jobs one at a time, the cells taking turns (order swapping every turn); dispatch = date +%s%N before `rsql-wrapper submit` -> the job's start stamp; completion to callback = the job's end stamp -> SendTaskSuccess acknowledged by the timing proxy; CPU = cgroup usage_usec deltas from the first to the last measured job (every cell's window includes the other cells' turns: see idle_ms_per_s) / jobs",
        "cells": json_cells,
    });
    print_table(&results);
    println!("{:6.1}s done", t0.elapsed().as_secs_f64());
    results
}

fn turn_order(n: usize, i: usize) -> Vec<usize> {
    if i.is_multiple_of(2) {
        (0..n).collect()
    } else {
        (0..n).rev().collect()
    }
}

/// A column of the table: its heading and how to read it from a cell.
type Column<'a> = (&'a str, &'a dyn Fn(&Value) -> Option<f64>);

fn print_table(r: &Value) {
    let cells = r["cells"].as_array().cloned().unwrap_or_default();
    let commit = |k: &str| match r["builds"][k]["commit"].as_str() {
        Some(c) if c.len() == 40 => c[..12].to_string(),
        Some(c) => c.to_string(),
        None => "?".to_string(),
    };
    println!(
        "\nLaunchers side by side: {} trivial jobs per cell, one at a time, the cells taking turns, on the installed package in a real systemd",
        r["jobs_per_cell"]
    );
    for (k, b) in r["builds"].as_object().into_iter().flatten() {
        println!(
            "  {k}: {} ({})",
            commit(k),
            b["bin_dir"].as_str().unwrap_or("")
        );
    }
    let columns: [Column<'_>; 9] = [
        ("dispatch p50", &|c: &Value| {
            c["dispatch_ms"]["p50"].as_f64()
        }),
        ("dispatch p95", &|c: &Value| {
            c["dispatch_ms"]["p95"].as_f64()
        }),
        ("callback p50", &|c: &Value| {
            c["completion_to_callback_ms"]["p50"].as_f64()
        }),
        ("callback p95", &|c: &Value| {
            c["completion_to_callback_ms"]["p95"].as_f64()
        }),
        ("agent+owner+job CPU", &|c: &Value| {
            c["cpu_ms_per_job"]["agent_owner_job"].as_f64()
        }),
        ("PID 1 CPU", &|c: &Value| {
            c["cpu_ms_per_job"]["pid1"].as_f64()
        }),
        ("journald CPU", &|c: &Value| {
            c["cpu_ms_per_job"]["journald"].as_f64()
        }),
        ("dbus CPU", &|c: &Value| {
            c["cpu_ms_per_job"]["dbus"].as_f64()
        }),
        ("sandbox CPU", &|c: &Value| {
            c["cpu_ms_per_job"]["sandbox"].as_f64()
        }),
    ];
    print!("{:8} {:14}", "launcher", "build");
    for (name, _) in &columns {
        print!(" {:>w$}", name, w = name.len().max(9));
    }
    println!("\n{:24}(all in ms; CPU per job)", "");
    let n = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.2}"));
    let mut launchers: Vec<String> = Vec::new();
    for c in &cells {
        let l = c["launcher"].as_str().unwrap_or("").to_string();
        if !launchers.contains(&l) {
            launchers.push(l);
        }
    }
    for l in &launchers {
        let of = |b: &str| {
            cells
                .iter()
                .find(|c| c["launcher"] == l.as_str() && c["build"] == b)
        };
        for b in ["previous", "new"] {
            let Some(c) = of(b) else { continue };
            let label = if b == "new" { "new" } else { "previous main" };
            print!("{l:8} {label:14}");
            for (name, get) in &columns {
                print!(" {:>w$}", n(get(c)), w = name.len().max(9));
            }
            println!();
        }
        if let (Some(p), Some(c)) = (of("previous"), of("new")) {
            print!("{l:8} {:14}", "new/previous");
            for (name, get) in &columns {
                let ratio = match (get(p), get(c)) {
                    (Some(a), Some(b)) if a > 0.0 => format!("{:.2}x", b / a),
                    _ => "n/a".into(),
                };
                print!(" {:>w$}", ratio, w = name.len().max(9));
            }
            println!();
        }
    }
    let ran: Vec<String> = cells
        .iter()
        .map(|c| {
            format!(
                "{}/{}: {}",
                c["launcher"].as_str().unwrap_or(""),
                c["build"].as_str().unwrap_or(""),
                if c["dbus_daemon_ran"] == true {
                    "yes"
                } else {
                    "no"
                }
            )
        })
        .collect();
    println!("dbus-daemon ran in the sandbox: {}", ran.join(", "));
    let idle: Vec<String> = cells
        .iter()
        .map(|c| {
            format!(
                "{}/{}: {}",
                c["launcher"].as_str().unwrap_or(""),
                c["build"].as_str().unwrap_or(""),
                n(c["idle_ms_per_s"].as_f64())
            )
        })
        .collect();
    println!(
        "idle CPU of each sandbox, ms per s (included in its CPU window of {:.0} s): {}",
        r["window_s"].as_f64().unwrap_or(0.0),
        idle.join(", ")
    );
}
