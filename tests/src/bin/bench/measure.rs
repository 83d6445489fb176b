//! Measurements: CPU and memory read from /proc and getrusage (the stamps and percentiles are
//! `rsql_agent_tests::timing`'s).

use super::*;

pub(super) fn median(samples: &[f64]) -> f64 {
    Pcts::of(samples).p50
}

pub(super) fn clk_tck() -> f64 {
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
pub(super) fn reap_owners() -> usize {
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
pub(super) fn children_cpu_ms() -> f64 {
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
pub(super) fn job_alone_cpu_ms(script: &Path, runs: usize) -> f64 {
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
pub(super) fn proc_cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let rest = stat.rsplit_once(')').map(|(_, r)| r).expect("stat format");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    (utime + stime) as f64 * 1000.0 / clk_tck()
}

/// A `kB` line of /proc/PID/status, e.g. VmRSS or VmHWM.
pub(super) fn proc_status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::to_string))
        })
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}
