//! Figures 1-3 for one or more builds at once: the previous main's and the current tree's
//! agents run side by side, each with its own queue and timing proxy, against the same moto,
//! and take turns so that both see the same noise of the machine:
//! - figures 1 and 2 (one job at a time) alternate job by job, which build goes first
//!   swapping every job (previous, new, new, previous, previous, ...);
//! - figure 3 (N trivial jobs, up to 4 at a time) runs in rounds: each round gives each
//!   build N / rounds jobs, one build after the other, the order swapping every round.
//!   Only one build has jobs at any moment, so RUSAGE_CHILDREN (the owners the bench
//!   reaps) and the agent's own /proc counters over a round are that build's alone.
//!
//! The idle agent meanwhile long-polls its empty queue (moto wakes such a poll about once
//! a second), in both directions alike.

use super::*;

/// One build's agent with its own queue and timing proxy.
#[derive(Debug)]
pub(super) struct Contender {
    pub(super) build: Build,
    pub(super) queue: String,
    pub(super) proxy: TimingProxy,
    pub(super) agent: BenchAgent,
}

impl Contender {
    /// Starts `build`'s agent (log shipping on) and waits for its first poll, plus a second.
    pub(super) async fn start(world: &mut World, build: Build) -> Contender {
        let queue = world.new_queue().await;
        let proxy = TimingProxy::start(world.moto.addr());
        let mut agent = BenchAgent::start(world, &build, &queue, &proxy, true);
        let mut ready = false;
        for _ in 0..600 {
            if proxy.count_requests("ReceiveMessage") > 0 {
                ready = true;
                break;
            }
            agent.assert_running();
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            ready,
            "the {} agent never polled its queue:\n{}",
            build.label,
            agent.log()
        );
        std::thread::sleep(Duration::from_secs(1));
        Contender {
            build,
            queue,
            proxy,
            agent,
        }
    }
}

/// The order in which the contenders take turn `i`: forwards on even turns, backwards on
/// odd ones.
fn turn_order(n: usize, i: usize) -> Vec<usize> {
    if i.is_multiple_of(2) {
        (0..n).collect()
    } else {
        (0..n).rev().collect()
    }
}

/// Figures 1 and 2 of one build, in ms.
#[derive(Debug, Clone, Default)]
pub(super) struct Latency {
    pub(super) callback: Vec<f64>,
    pub(super) dispatch: Vec<f64>,
    pub(super) token_check: Vec<f64>,
}

/// Figures 1 and 2: `warmup` + `jobs` jobs per contender, one at a time, taking turns.
pub(super) async fn latency(
    world: &mut World,
    contenders: &[Contender],
    warmup: usize,
    jobs: usize,
) -> Vec<Latency> {
    let mut tokens = world
        .tokens((warmup + jobs) * contenders.len())
        .await
        .into_iter();
    let mut out = vec![Latency::default(); contenders.len()];
    for i in 0..warmup + jobs {
        for k in turn_order(contenders.len(), i) {
            let c = &contenders[k];
            let token = tokens.next().expect("a token per job");
            let marker = world.marker();
            let deletes = c.proxy.count_ok("DeleteMessage");
            let sent = world
                .send_job(
                    &c.queue,
                    &token,
                    "bench_job.sh",
                    &[marker.display().to_string()],
                )
                .await;
            let ack = c
                .proxy
                .wait_ack("SendTaskSuccess", &token, JOB_WAIT, || c.agent.log());
            c.proxy
                .wait_count("DeleteMessage", deletes + 1, JOB_WAIT, || c.agent.log());
            let stamps = Stamps::read(&marker);
            if i >= warmup {
                let l = &mut out[k];
                l.callback.push(ms_between(stamps.end, ack));
                l.dispatch.push(ms_between(sent, stamps.start));
                // The one SendTaskHeartbeat that checks the task is open before the start.
                if let Some(ms) = c.proxy.first_round_trip_ms("SendTaskHeartbeat", &token) {
                    l.token_check.push(ms);
                }
            }
        }
    }
    out
}

/// Figure 3 of one build, summed over its rounds.
#[derive(Debug, Clone, Default)]
pub(super) struct CpuTally {
    pub(super) jobs: usize,
    pub(super) rounds: usize,
    /// The agent's utime+stime over its rounds.
    pub(super) agent_ms: f64,
    /// RUSAGE_CHILDREN of the owners reaped over its rounds (their jobs included).
    pub(super) owners_and_jobs_ms: f64,
    /// Wall time from the first SendMessageBatch to the last DeleteMessage, per round.
    pub(super) wall_s: f64,
}

impl CpuTally {
    pub(super) fn agent_per_job(&self) -> f64 {
        self.agent_ms / self.jobs as f64
    }

    /// The figure as `bench/results.json` has it; `job_alone` is the trivial script's own
    /// CPU, run directly, which the owners' share includes.
    pub(super) fn json(&self, job_alone: f64) -> Value {
        let per_job = self.agent_per_job();
        let owners_and_jobs = self.owners_and_jobs_ms / self.jobs as f64;
        let owner_per_job = (owners_and_jobs - job_alone).max(0.0);
        json!({
            "jobs": self.jobs,
            "rounds": self.rounds,
            "agent_ms": per_job,
            "agent_total_ms": self.agent_ms,
            "owner_ms": owner_per_job,
            "agent_plus_owner_ms": per_job + owner_per_job,
            "owner_and_job_ms": owners_and_jobs,
            "job_alone_ms": job_alone,
            "wall_s": self.wall_s,
            "jobs_per_s": self.jobs as f64 / self.wall_s,
            "clock_tick_ms": 1000.0 / clk_tck(),
        })
    }
}

/// Figure 3: `jobs` trivial jobs per contender, in `rounds` rounds (see the module doc).
pub(super) async fn cpu_rounds(
    world: &mut World,
    contenders: &[Contender],
    jobs: usize,
    rounds: usize,
) -> Vec<CpuTally> {
    let mut out = vec![CpuTally::default(); contenders.len()];
    for r in 0..rounds {
        let n = jobs / rounds + usize::from(r < jobs % rounds);
        if n == 0 {
            continue;
        }
        for k in turn_order(contenders.len(), r) {
            let c = &contenders[k];
            let tokens = world.tokens(n).await;
            let deletes = c.proxy.count_ok("DeleteMessage");
            // Each job's owner process is double-forked away from the agent and re-parented
            // to this process (a child subreaper): reaping it adds its CPU, and its job's, to
            // our RUSAGE_CHILDREN. Owners of earlier jobs are reaped first.
            reap_owners();
            let owners0 = children_cpu_ms();
            let cpu0 = proc_cpu_ms(c.agent.pid());
            let t0 = Instant::now();
            world.send_jobs(&c.queue, &tokens, "bench_trivial.sh").await;
            c.proxy
                .wait_count("DeleteMessage", deletes + n, JOB_WAIT * 4, || c.agent.log());
            let wall = t0.elapsed().as_secs_f64();
            let cpu1 = proc_cpu_ms(c.agent.pid());
            for token in &tokens {
                c.proxy
                    .wait_ack("SendTaskSuccess", token, JOB_WAIT, || c.agent.log());
            }
            // An owner exits before its job is reported, so every one has exited by now.
            let mut reaped = 0;
            let reap_deadline = Instant::now() + JOB_WAIT;
            while reaped < n && Instant::now() < reap_deadline {
                reaped += reap_owners();
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(
                reaped, n,
                "not every job owner of the {} build exited",
                c.build.label
            );
            let t = &mut out[k];
            t.jobs += n;
            t.rounds += 1;
            t.agent_ms += cpu1 - cpu0;
            t.owners_and_jobs_ms += children_cpu_ms() - owners0;
            t.wall_s += wall;
        }
    }
    out
}

/// `bench/results.json`'s `side_by_side`: figures 1-3 of each build, and the table's rows.
pub(super) fn side_by_side(
    contenders: &[Contender],
    latencies: &[Latency],
    cpu: &[CpuTally],
    job_alone: f64,
    rounds: usize,
) -> Value {
    let mut builds = serde_json::Map::new();
    let mut per = Vec::new();
    for ((c, l), t) in contenders.iter().zip(latencies).zip(cpu) {
        let cb = Pcts::of(&l.callback);
        let d = Pcts::of(&l.dispatch);
        let cpu = t.json(job_alone);
        let token_check = if l.token_check.is_empty() {
            Value::Null
        } else {
            Pcts::of(&l.token_check).json()
        };
        builds.insert(
            c.build.key.into(),
            json!({
                "build": c.build.json(),
                "completion_to_callback_ms": cb.json(),
                "dispatch_ms": d.json(),
                "token_check_ms": token_check,
                "agent_cpu_per_job_ms": cpu,
                "samples_completion_to_callback_ms": l.callback,
                "samples_dispatch_ms": l.dispatch,
            }),
        );
        per.push((cb, d, cpu));
    }
    let (Some((cb0, d0, cpu0)), Some((cb1, d1, cpu1))) = (per.first(), per.last()) else {
        unreachable!("two builds")
    };
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let rows: Vec<(String, f64, f64)> = vec![
        ("completion to callback p50 (ms)".into(), cb0.p50, cb1.p50),
        ("completion to callback p95 (ms)".into(), cb0.p95, cb1.p95),
        (
            "dispatch SendMessage -> start p50 (ms)".into(),
            d0.p50,
            d1.p50,
        ),
        (
            "dispatch SendMessage -> start p95 (ms)".into(),
            d0.p95,
            d1.p95,
        ),
        (
            "agent CPU per job (ms)".into(),
            f(cpu0, "agent_ms"),
            f(cpu1, "agent_ms"),
        ),
        (
            "job owner CPU per job (ms)".into(),
            f(cpu0, "owner_ms"),
            f(cpu1, "owner_ms"),
        ),
        (
            "agent + owner CPU per job (ms)".into(),
            f(cpu0, "agent_plus_owner_ms"),
            f(cpu1, "agent_plus_owner_ms"),
        ),
        (
            "trivial jobs per second (4 at a time)".into(),
            f(cpu0, "jobs_per_s"),
            f(cpu1, "jobs_per_s"),
        ),
    ];
    json!({
        "ratio": "new / previous main (below 1: the new build is faster or cheaper, above 1 for jobs per second)",
        "interleaving": format!(
            "figures 1-2: one job at a time, the builds alternating job by job (which goes first swaps every job); figure 3: {} jobs per build in {rounds} round(s), one build at a time, the order swapping every round",
            cpu.last().map_or(0, |t| t.jobs)
        ),
        "jobs_per_build": {"callback_and_dispatch": latencies.last().map_or(0, |l| l.callback.len()), "cpu": cpu.last().map_or(0, |t| t.jobs)},
        "builds": Value::Object(builds),
        "rows": rows.iter().map(|(name, prev, new)| json!({
            "figure": name, "previous": prev, "new": new, "ratio": new / prev,
        })).collect::<Vec<_>>(),
    })
}

/// The side-by-side table: previous main | new | new / previous.
pub(super) fn print_side_by_side(side: &Value) {
    let builds = &side["builds"];
    let commit = |k: &str| short_commit(builds[k]["build"]["commit"].as_str());
    println!(
        "\nside by side, same machine, same sitting ({}):",
        side["interleaving"].as_str().unwrap_or("")
    );
    let rows = side["rows"].as_array().cloned().unwrap_or_default();
    let w0 = rows
        .iter()
        .filter_map(|r| r["figure"].as_str().map(str::len))
        .max()
        .unwrap_or(0);
    let head_prev = format!("previous main {}", commit("previous"));
    let head_new = format!("new {}", commit("new"));
    let w = head_prev.len().max(head_new.len()).max(12);
    println!(
        "{:w0$}  {:>w$}  {:>w$}  {:>9}",
        "figure", head_prev, head_new, "new/prev"
    );
    println!("{}", "-".repeat(w0 + 2 * w + 15));
    let n = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.2}"));
    for r in &rows {
        println!(
            "{:w0$}  {:>w$}  {:>w$}  {:>9}",
            r["figure"].as_str().unwrap_or(""),
            n(&r["previous"]),
            n(&r["new"]),
            format!("{}x", n(&r["ratio"])),
        );
    }
}

/// A commit as the tables show it: a full hash cut to 12 digits, `git describe` as it is.
pub(super) fn short_commit(commit: Option<&str>) -> String {
    match commit {
        Some(c) if c.len() == 40 && c.chars().all(|ch| ch.is_ascii_hexdigit()) => c[..12].into(),
        Some(c) => c.into(),
        None => "?".into(),
    }
}
