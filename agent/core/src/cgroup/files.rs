//! Reading the interface files of a job's cgroup: pure parsing of their text, so that every
//! rule is tested on recorded contents (the memory files exist only where the memory
//! controller is enabled, which not every test host offers).
//!
//! Formats (kernel `Documentation/admin-guide/cgroup-v2.rst`): `cpu.stat`,
//! `memory.events` and `cgroup.events` are "flat keyed" (`key value` per line);
//! `memory.peak` is a single number of bytes; `memory.max` is a number or `max`.

/// What a job used, read from its cgroup once it was empty, and what the memory limit did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time of every process the job ever had (`cpu.stat` `usage_usec`), in ms.
    pub cpu_ms: Option<u64>,
    /// The job's peak memory (`memory.peak`), in MiB rounded up; only with the memory
    /// controller.
    pub max_rss_mb: Option<u64>,
    /// Processes of the job the OOM killer took (`memory.events` `oom_kill`).
    pub oom_kills: u64,
    /// The `memory.max` that was in force, in bytes; `None` when there was no limit.
    pub memory_max: Option<u64>,
}

const MIB: u64 = 1024 * 1024;

/// The value of `key` in a flat-keyed file; `None` when the key is missing or not a number.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.trim().split_once(char::is_whitespace)?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

/// `cgroup.events` `populated`: whether any process is in the cgroup or below it.
pub fn populated(events: &str) -> Option<bool> {
    keyed(events, "populated").map(|n| n != 0)
}

/// A single-number file (`memory.peak`, `memory.current`), or `max` for no limit
/// (`Some(None)`).
pub fn single(text: &str) -> Option<Option<u64>> {
    match text.trim() {
        "max" => Some(None),
        number => number.parse().ok().map(Some),
    }
}

/// Bytes as whole MiB, rounded up: 1 byte over 512 MiB is 513, so a peak never reads lower
/// than it was.
pub fn bytes_to_mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// Builds the [`Usage`] from the files' texts (`None`: the file is absent or unreadable).
pub fn usage_from(
    cpu_stat: Option<&str>,
    memory_peak: Option<&str>,
    memory_events: Option<&str>,
    memory_max: Option<u64>,
) -> Usage {
    Usage {
        cpu_ms: cpu_stat
            .and_then(|t| keyed(t, "usage_usec"))
            .map(|us| us / 1000),
        max_rss_mb: memory_peak.and_then(single).flatten().map(bytes_to_mib),
        oom_kills: memory_events
            .and_then(|t| keyed(t, "oom_kill"))
            .unwrap_or(0),
        memory_max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape a 6.x kernel (Amazon Linux 2023 runs 6.1) writes after a job grew past its
    /// `memory.max` with `memory.oom.group = 1`: two processes killed as one group.
    const OOM_EVENTS: &str = "low 0\nhigh 0\nmax 1893\noom 2\noom_kill 2\noom_group_kill 1\n";
    const QUIET_EVENTS: &str = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n";
    /// Recorded after a one-second busy loop (`perl`, spinning on `times`) in a cgroup
    /// without the cpu controller: only the four core lines.
    const CPU_STAT: &str = "usage_usec 999939\nuser_usec 249987\nsystem_usec 749952\nnice_usec 0\n";

    #[test]
    fn memory_events_count_oom_kills_and_nothing_else() {
        assert_eq!(keyed(OOM_EVENTS, "oom_kill"), Some(2));
        // `oom` counts reaching the limit without a kill being needed; `oom_kill` is what
        // ended processes, and `max` only counts reclaim at the limit.
        assert_eq!(usage_from(None, None, Some(OOM_EVENTS), None).oom_kills, 2);
        assert_eq!(
            usage_from(None, None, Some(QUIET_EVENTS), None).oom_kills,
            0
        );
        // A kernel older than 4.13 has no oom_kill line: no kill seen, not a failure.
        assert_eq!(
            usage_from(None, None, Some("low 0\nhigh 0\nmax 0\noom 0\n"), None).oom_kills,
            0
        );
        // `oom_kill` must not be confused with `oom_group_kill`, nor `oom` with either.
        assert_eq!(keyed("oom_group_kill 7\noom 3\n", "oom_kill"), None);
    }

    #[test]
    fn memory_peak_becomes_whole_mib_rounded_up() {
        let usage = usage_from(None, Some("536870913\n"), None, Some(512 * MIB));
        assert_eq!(usage.max_rss_mb, Some(513));
        assert_eq!(usage.memory_max, Some(512 * MIB));
        assert_eq!(
            usage_from(None, Some("4096\n"), None, None).max_rss_mb,
            Some(1)
        );
        assert_eq!(
            usage_from(None, Some("0\n"), None, None).max_rss_mb,
            Some(0)
        );
        // No memory controller: no file, no figure (never a made-up zero).
        assert_eq!(usage_from(None, None, None, None).max_rss_mb, None);
        assert_eq!(
            usage_from(None, Some("garbage"), None, None).max_rss_mb,
            None
        );
    }

    #[test]
    fn cpu_stat_usage_becomes_milliseconds() {
        let usage = usage_from(Some(CPU_STAT), None, None, None);
        assert_eq!(usage.cpu_ms, Some(999));
        assert_eq!(usage_from(None, None, None, None).cpu_ms, None);
    }

    #[test]
    fn cgroup_events_say_whether_anything_is_left() {
        assert_eq!(populated("populated 1\nfrozen 0\n"), Some(true));
        assert_eq!(populated("populated 0\nfrozen 0\n"), Some(false));
        assert_eq!(populated(""), None);
    }

    #[test]
    fn single_values_and_max() {
        assert_eq!(single("max\n"), Some(None));
        assert_eq!(single("67108864\n"), Some(Some(64 * MIB)));
        assert_eq!(single("lots"), None);
    }
}
