//! The report: the method notes, the targets, the printed table and the smoke run's sanity
//! checks.

use super::*;

pub(super) fn method_notes() -> Value {
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
        "side_by_side": "with --baseline-bin-dir, figures 1-3 also for the previous main's build, both agents running at once against the same moto, each with its own queue and proxy, taking turns (see side_by_side.interleaving); the figures above are the new build's",
    })
}

/// The performance targets in docs/performance.md, judged against the numbers (full mode only).
pub(super) fn targets(r: &Value, smoke: bool) -> Value {
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

pub(super) fn print_table(r: &Value) {
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
pub(super) fn sanity(r: &Value) -> Vec<String> {
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
    for row in r["side_by_side"]["rows"].as_array().into_iter().flatten() {
        let name = row["figure"].as_str().unwrap_or_default();
        for build in ["previous", "new"] {
            check(
                &format!("side by side: {name}, {build}"),
                &row[build],
                name.contains("CPU"),
            );
        }
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
