//! `make bench-launchers`: what starting a job costs under each launcher, on the installed
//! package in a real systemd (the sandbox of `tests/src/sandbox.rs`), side by side in one
//! run on the same machine. Prints a table and writes `bench/launchers.json`.
//!
//! For each launcher, a fresh sandbox with the `.deb` that `make package` built, the agent
//! started by systemd, and N trivial jobs (`noop.sh`: it stamps its start and exits 0), one
//! at a time, each with a real task token from the emulator on the host's loopback:
//! - `systemd`: the packaged setup: the owner is an `rsql-job-owner@.service` unit that
//!   systemd starts from `rsql-job-owner.socket`, and the job runs as `rsql-job`;
//! - `direct`: `[jobs] launcher = "direct"`: the agent double-forks the owner, which stays
//!   in the agent's unit, and the job runs as the agent's user.
//!
//! Figures:
//! - dispatch: `date +%s%N` in the sandbox just before `rsql-wrapper submit` execs → the
//!   job's first instruction (`$EPOCHREALTIME`, printed and read back from the job log), p50
//!   and p95;
//! - CPU per job: the `usage_usec` of `rsql-agent.service` plus `rsql-jobs.slice` (the agent,
//!   the owners and the jobs; with `direct` everything is in the agent's unit), plus PID 1's
//!   utime+stime (systemd's work for each unit start), from the first to the last of the N
//!   jobs, divided by N. The trivial job itself (one bash) is in both.

use std::time::Duration;

use aws_sdk_sfn::types::ExecutionStatus;
use rsql_agent_tests::moto;
use rsql_agent_tests::sandbox::{package, show, Sandbox};
use rsql_agent_tests::world::{StateMachine, World};

/// Prints its start; the stamp is read back from the job log, which both launchers write
/// (under `direct` the job shares the agent unit's read-only file system).
const NOOP: &str = "#!/bin/bash\necho \"start $EPOCHREALTIME\"\n";

struct Figures {
    launcher: &'static str,
    jobs: usize,
    dispatch_p50_ms: f64,
    dispatch_p95_ms: f64,
    cpu_ms_per_job: f64,
    pid1_cpu_ms_per_job: f64,
}

fn usage_usec(sandbox: &Sandbox, cgroup: &str) -> u64 {
    let out = sandbox.exec(&["cat", &format!("/sys/fs/cgroup/{cgroup}/cpu.stat")]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// PID 1's utime+stime, in ms (clock ticks of 10 ms on this kernel's USER_HZ of 100).
fn pid1_cpu_ms(sandbox: &Sandbox) -> f64 {
    let stat = sandbox.ok(&["cat", "/proc/1/stat"]);
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    ticks as f64 * 10.0
}

fn cpu_ms(sandbox: &Sandbox) -> f64 {
    (usage_usec(sandbox, "system.slice/rsql-agent.service")
        + usage_usec(sandbox, "rsql.slice/rsql-jobs.slice")) as f64
        / 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn measure(launcher: &'static str, jobs: usize) -> Figures {
    let world = World::builder(&format!("bench-{launcher}"))
        .socket_only()
        .state_machine(StateMachine::Capture)
        .build()
        .await;
    let sandbox = Sandbox::boot(&format!("bench-{launcher}"));
    sandbox.install(&package());
    let launcher_line = match launcher {
        "direct" => "launcher = \"direct\"\n",
        _ => "",
    };
    sandbox.configure_agent(
        &world.moto.endpoint(),
        &format!(
            "[agent]\nstate_dir = \"/var/lib/rsql-agent\"\ninstance_id = \"i-bench\"\n\
             [jobs]\nscript_dir = \"/opt/rsql/rsql_scripts\"\n{launcher_line}\
             [intake.socket]\npath = \"/run/rsql-agent/agent.sock\"\n"
        ),
    );
    sandbox.write("/opt/rsql/rsql_scripts/noop.sh", NOOP, 0o755);
    sandbox.ok(&["systemctl", "enable", "--now", "rsql-agent"]);
    sandbox.wait_active("rsql-agent", Duration::from_secs(60));

    let run = |id: String| {
        let world = &world;
        let sandbox = &sandbox;
        async move {
            let (exec, token) = world.execution(&id).await;
            let script = format!(
                "date +%s%N; exec rsql-wrapper submit --task-token '{token}' --workflow-id bench \
                 --workflow-execution-id {id} --job-name noop.sh --timeout-seconds 60 \
                 --socket /run/rsql-agent/agent.sock >/dev/null"
            );
            let out = sandbox.exec(&["sh", "-c", &script]);
            assert!(out.status.success(), "submit failed: {}", show(&out));
            let before_ns: u64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("date +%s%N");
            let done = world.wait_execution(&exec).await;
            assert_eq!(*done.status(), ExecutionStatus::Succeeded, "{id}");
            let output = moto::execution_output(&done);
            assert_eq!(output["status"], "completed", "{id}: {output}");
            let log = sandbox.sh(&format!("cat /var/log/rsql-agent/jobs/{id}/noop.sh.*.log"));
            let start_s: f64 = log
                .split_whitespace()
                .skip_while(|w| *w != "start")
                .nth(1)
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("no start stamp in the job log of {id}: {log}"));
            (start_s * 1000.0) - (before_ns as f64 / 1e6)
        }
    };
    for i in 0..3 {
        run(format!("warm_{launcher}_{i}")).await;
    }
    let (cpu_before, pid1_before) = (cpu_ms(&sandbox), pid1_cpu_ms(&sandbox));
    let mut dispatch = Vec::with_capacity(jobs);
    for i in 0..jobs {
        dispatch.push(run(format!("job_{launcher}_{i}")).await);
    }
    let (cpu_after, pid1_after) = (cpu_ms(&sandbox), pid1_cpu_ms(&sandbox));
    dispatch.sort_by(|a, b| a.total_cmp(b));
    Figures {
        launcher,
        jobs,
        dispatch_p50_ms: percentile(&dispatch, 50.0),
        dispatch_p95_ms: percentile(&dispatch, 95.0),
        cpu_ms_per_job: (cpu_after - cpu_before) / jobs as f64,
        pid1_cpu_ms_per_job: (pid1_after - pid1_before) / jobs as f64,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let jobs: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let mut all = Vec::new();
    for launcher in ["systemd", "direct"] {
        all.push(measure(launcher, jobs).await);
    }
    println!("\nLaunchers, {jobs} trivial jobs each, one at a time, on the installed package in a real systemd 252");
    println!(
        "{:<9} {:>16} {:>16} {:>28} {:>22}",
        "launcher",
        "dispatch p50 ms",
        "dispatch p95 ms",
        "agent+owner+job CPU ms/job",
        "of which PID 1 ms/job"
    );
    let mut json = Vec::new();
    for f in &all {
        let total = f.cpu_ms_per_job + f.pid1_cpu_ms_per_job;
        println!(
            "{:<9} {:>16.1} {:>16.1} {:>28.1} {:>22.1}",
            f.launcher, f.dispatch_p50_ms, f.dispatch_p95_ms, total, f.pid1_cpu_ms_per_job
        );
        json.push(serde_json::json!({
            "launcher": f.launcher, "jobs": f.jobs,
            "dispatch_p50_ms": f.dispatch_p50_ms, "dispatch_p95_ms": f.dispatch_p95_ms,
            "cpu_ms_per_job": total, "pid1_cpu_ms_per_job": f.pid1_cpu_ms_per_job,
        }));
    }
    let dir = rsql_agent_tests::bins::workspace_root().join("bench");
    std::fs::create_dir_all(&dir).expect("mkdir bench");
    let path = dir.join("launchers.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).expect("json")).expect("write");
    println!("written to {}", path.display());
}
