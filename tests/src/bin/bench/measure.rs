//! Measurements: the scripts' own stamps, percentiles, and CPU and memory read from /proc.

use super::*;

/// A script's own start and end stamps.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamps {
    pub(super) start: SystemTime,
    pub(super) end: SystemTime,
}

impl Stamps {
    pub(super) fn read(marker: &Path) -> Stamps {
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
pub(super) fn parse_epoch(s: &str) -> SystemTime {
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
pub(super) fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Pcts {
    pub(super) n: usize,
    pub(super) p50: f64,
    pub(super) p95: f64,
    pub(super) min: f64,
    pub(super) max: f64,
}

impl Pcts {
    /// Nearest-rank percentiles of real samples.
    pub(super) fn of(samples: &[f64]) -> Pcts {
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

    pub(super) fn json(&self) -> Value {
        json!({"n": self.n, "p50": self.p50, "p95": self.p95, "min": self.min, "max": self.max})
    }
}

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
