//! Finding, killing and reaping a job's processes through /proc once its leader is gone.
//!
//! A job's processes are found two ways: by process group (everything that stayed in the
//! leader's group) and by the `RSQL_AGENT_JOB_ID=<job id>` entry every job inherits in its
//! environment (descendants that left the group with `setsid` or `setpgid`). A descendant
//! that both left the group and cleared its environment cannot be found this way; that is
//! what a job's cgroup is for, and where the job has one ([`sweep_cgroup`]) its members
//! are the job's processes and /proc is not searched.
//!
//! Reaping: the agent is a child subreaper, so orphaned descendants become its children and
//! their zombies are its to collect. It must never call `waitpid(-1)`, which would steal
//! exit statuses tokio is waiting for. It reaps only pids it knows belong to a job, that are
//! zombies whose parent is this process, and that are not live leaders tokio still owns.
//! Pids are remembered with their start time, so a reused pid is never mistaken for one.
//! A job descendant that left the group and exited on its own between two censuses stays a
//! zombie until the agent exits; that is the known gap of not having a cgroup.

use std::collections::HashMap;
use std::fs;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::spawner;
use crate::cgroup::{Payload, Usage};

/// How many times the marker scan repeats while it keeps finding new processes (a process
/// can fork between being found and being killed).
const MAX_SWEEP_ROUNDS: usize = 5;

/// The fields of /proc/<pid>/stat the supervisor needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcStat {
    pub(super) state: u8,
    pub(super) ppid: i32,
    pub(super) pgrp: i32,
    pub(super) session: i32,
    /// Clock ticks after boot; with the pid it identifies a process for its whole life.
    pub(super) start_time: u64,
}

pub(super) fn read_stat(pid: i32) -> Option<ProcStat> {
    let raw = fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&raw)
}

/// Parses `pid (comm) S ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
/// stime cutime cstime priority nice threads itrealvalue starttime ...`. `comm` may contain
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(raw: &[u8]) -> Option<ProcStat> {
    let close = raw.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(raw.get(close + 2..)?).ok()?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    Some(ProcStat {
        state: *fields.first()?.as_bytes().first()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn all_pids() -> Vec<i32> {
    match fs::read_dir("/proc") {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list /proc; escaped job processes cannot be found");
            Vec::new()
        }
    }
}

/// Whether the process's environment holds exactly `marker` (`NAME=value`) as one entry.
/// Processes of other users, and zombies, have no readable environment and never match.
fn has_marker(pid: i32, marker: &[u8]) -> bool {
    match fs::read(format!("/proc/{pid}/environ")) {
        Ok(environ) => environ.split(|&b| b == 0).any(|entry| entry == marker),
        Err(_) => false,
    }
}

/// Live processes (not zombies) carrying the job's marker, other than this one.
pub(super) fn census(marker: &[u8]) -> HashMap<i32, u64> {
    let me = std::process::id() as i32;
    let mut found = HashMap::new();
    for pid in all_pids() {
        if pid == me {
            continue;
        }
        let Some(stat) = read_stat(pid) else {
            continue;
        };
        if stat.state != b'Z' && has_marker(pid, marker) {
            found.insert(pid, stat.start_time);
        }
    }
    found
}

/// `<pid>:<start time>` of this process: what jobs carry in [`super::SUPERVISOR_ENV`] so a
/// later agent can tell whether the agent that started them is still alive.
pub(super) fn supervisor_identity() -> &'static str {
    static IDENTITY: OnceLock<String> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        let me = std::process::id() as i32;
        let start = read_stat(me).map(|s| s.start_time).unwrap_or(0);
        format!("{me}:{start}")
    })
}

/// Kills processes of jobs whose agent is gone. `PR_SET_PDEATHSIG` takes only a job's leader
/// with a dead agent; its other processes were re-parented to init and live on. Each carries
/// its agent's identity, so the next agent on the host finds and kills them. Jobs of agents
/// that are alive (a standalone wrapper run, say) are left alone. Returns how many were
/// killed.
///
/// Only processes of this process's own PID namespace count: the identity's pid means
/// nothing in another one, so a root agent on a host would otherwise take every job of an
/// agent in a container (or in a test's systemd sandbox) for an orphan and kill it.
pub(super) fn kill_orphaned_jobs() -> usize {
    let me = std::process::id() as i32;
    let prefix = format!("{}=", super::SUPERVISOR_ENV).into_bytes();
    let my_namespace = fs::read_link("/proc/self/ns/pid").ok();
    let mut killed = 0;
    for pid in all_pids() {
        if pid == me {
            continue;
        }
        if fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != my_namespace {
            continue;
        }
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(owner) = environ
            .split(|&b| b == 0)
            .find_map(|entry| entry.strip_prefix(prefix.as_slice()))
        else {
            continue;
        };
        let Some((owner_pid, owner_start)) = std::str::from_utf8(owner)
            .ok()
            .and_then(|o| o.split_once(':'))
            .and_then(|(p, s)| Some((p.parse::<i32>().ok()?, s.parse::<u64>().ok()?)))
        else {
            continue;
        };
        // A zombie owner is dead: its parent may not have reaped it yet.
        let owner_alive = read_stat(owner_pid)
            .is_some_and(|s| s.start_time == owner_start && s.state != b'Z' && s.state != b'X');
        if owner_alive {
            continue;
        }
        let Some(stat) = read_stat(pid) else {
            continue;
        };
        if stat.state == b'Z' {
            continue;
        }
        tracing::warn!(
            pid,
            owner_pid,
            "killing a process left by a job of an agent that is gone"
        );
        signal_quietly(kill(Pid::from_raw(pid), Signal::SIGKILL));
        if stat.pgrp == pid {
            signal_quietly(killpg(Pid::from_raw(pid), Signal::SIGKILL));
        }
        killed += 1;
    }
    killed
}

/// What a sweep did.
#[derive(Debug, Clone, Default)]
pub(super) struct Sweep {
    /// Processes outside the job's group (found by marker, or in its cgroup) that were
    /// killed.
    pub(super) strays_killed: usize,
    /// Job processes still not reaped when the sweep stopped waiting; left for later.
    pub(super) left_dying: usize,
    /// What the job used, read from its cgroup once empty; `None`s without one.
    pub(super) usage: Usage,
}

/// The live ones among `pids` (a cgroup's members), with their start times.
pub(super) fn census_pids(pids: Vec<i32>) -> HashMap<i32, u64> {
    let me = std::process::id() as i32;
    pids.into_iter()
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let stat = read_stat(pid)?;
            (stat.state != b'Z').then_some((pid, stat.start_time))
        })
        .collect()
}

/// Kills everything in the job's cgroup once its leader has exited, waits (at most
/// `empty_wait`) until the cgroup is empty, which is when the job has ended, reaps what
/// became ours, and reads what the job used. Members outside the leader's group are
/// counted as strays.
pub(super) fn sweep_cgroup(
    cgroup: &Payload,
    pgid: i32,
    mut known: HashMap<i32, u64>,
    reap_wait: Duration,
    empty_wait: Duration,
) -> Sweep {
    let mut report = Sweep::default();
    for (pid, start_time) in census_pids(cgroup.pids()) {
        known.insert(pid, start_time);
        if let Some(stat) = read_stat(pid).filter(|s| s.pgrp != pgid) {
            report.strays_killed += 1;
            tracing::warn!(
                pid,
                pgid = stat.pgrp,
                sid = stat.session,
                job_pgid = pgid,
                "killing a job process that escaped its process group (it is in the job's cgroup)"
            );
        }
    }
    if let Err(e) = cgroup.kill() {
        tracing::warn!(cgroup = %cgroup.path().display(), error = %e, "cannot kill the job's cgroup");
    }
    if !cgroup.wait_empty(empty_wait) {
        tracing::warn!(
            cgroup = %cgroup.path().display(),
            wait = ?empty_wait,
            "the job's cgroup still holds processes after cgroup.kill; reporting the job anyway"
        );
    }
    report.left_dying = reap(known, reap_wait);
    report.usage = cgroup.usage();
    report
}

/// Kills everything left of a job whose leader has exited, then reaps what becomes ours.
///
/// `known` holds pids seen carrying the marker during the job (with start times). The group
/// has already been sent SIGKILL; it is signalled again here in case a member was mid-fork.
pub(super) fn sweep(
    marker: &[u8],
    pgid: i32,
    leader: i32,
    mut known: HashMap<i32, u64>,
    reap_wait: Duration,
) -> Sweep {
    let me = std::process::id() as i32;
    let mut report = Sweep::default();
    let mut strays: HashMap<i32, u64> = HashMap::new();
    for _ in 0..MAX_SWEEP_ROUNDS {
        let mut found_new = false;
        for pid in all_pids() {
            if pid == me || pid == leader {
                continue;
            }
            let Some(stat) = read_stat(pid) else {
                continue;
            };
            if stat.pgrp == pgid {
                // Zombies too: once their parent dies they are re-parented to us.
                known.insert(pid, stat.start_time);
                continue;
            }
            if stat.state == b'Z' || !has_marker(pid, marker) {
                continue;
            }
            known.insert(pid, stat.start_time);
            found_new |= kill_stray(pid, &stat, pgid, &mut strays);
            // A process that made itself a group leader (setsid, setpgid) took its own
            // children into that group; they may have cleared the marker, so take the group.
            if stat.pgrp == pid {
                signal_quietly(killpg(Pid::from_raw(pid), Signal::SIGKILL));
            }
        }
        if !found_new {
            break;
        }
        signal_quietly(killpg(Pid::from_raw(pgid), Signal::SIGKILL));
    }
    report.strays_killed = strays.len();

    // Group members of escaped group leaders are our orphans too; collect them so that they
    // are reaped below.
    if !strays.is_empty() {
        for pid in all_pids() {
            if let Some(stat) = read_stat(pid) {
                if strays.contains_key(&stat.pgrp) && pid != me {
                    known.insert(pid, stat.start_time);
                }
            }
        }
    }

    report.left_dying = reap(known, reap_wait);
    report
}

/// The live descendants of `root`, read from the `children` files of every thread
/// (`/proc/PID/task/TID/children`), depth first; `None` when this kernel has no such files
/// (built without `CONFIG_PROC_CHILDREN`). Far cheaper than a walk of all of /proc: it reads
/// only the job's own processes.
pub(super) fn descendants(root: i32) -> Option<Vec<i32>> {
    let children_of = |pid: i32| -> Option<Vec<i32>> {
        let mut found = Vec::new();
        let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        for task in tasks.flatten() {
            let path = task.path().join("children");
            match fs::read_to_string(&path) {
                Ok(text) => found.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && pid == root => return None,
                // A task that ended meanwhile.
                Err(_) => {}
            }
        }
        Some(found)
    };
    let mut all = Vec::new();
    let mut todo = children_of(root)?;
    while let Some(pid) = todo.pop() {
        if all.len() >= MAX_DESCENDANTS || all.contains(&pid) {
            continue;
        }
        all.push(pid);
        todo.extend(children_of(pid).unwrap_or_default());
    }
    Some(all)
}

/// A bound on the processes [`descendants`] collects (a fork bomb must not make the sweep
/// allocate without end; what it misses, the next round or the group kill takes).
const MAX_DESCENDANTS: usize = 65_536;

/// Kills everything left of a job whose leader has exited, for a process that is the job's
/// child subreaper and runs nothing else (the job's owner): every descendant of `root` is
/// the job's, marker or not, because an orphan comes to the nearest subreaper. Those outside
/// the leader's group are counted as strays. `None` when the kernel cannot list children;
/// the caller then sweeps by marker ([`sweep`]).
pub(super) fn sweep_descendants(
    root: i32,
    pgid: i32,
    leader: i32,
    reap_wait: Duration,
) -> Option<Sweep> {
    let mut report = Sweep::default();
    let mut known: HashMap<i32, u64> = HashMap::new();
    let mut strays: HashMap<i32, u64> = HashMap::new();
    for _ in 0..MAX_SWEEP_ROUNDS {
        let mut found_new = false;
        for pid in descendants(root)? {
            if pid == leader {
                continue;
            }
            let Some(stat) = read_stat(pid) else {
                continue;
            };
            known.insert(pid, stat.start_time);
            if stat.pgrp == pgid || stat.state == b'Z' {
                continue;
            }
            found_new |= kill_stray(pid, &stat, pgid, &mut strays);
        }
        if !found_new {
            break;
        }
        signal_quietly(killpg(Pid::from_raw(pgid), Signal::SIGKILL));
    }
    report.strays_killed = strays.len();
    report.left_dying = reap(known, reap_wait);
    Some(report)
}

/// SIGKILLs `pid`, a job process outside the job's group `pgid`, and remembers it in
/// `strays`; `true` (and one warning) the first time it is seen.
fn kill_stray(pid: i32, stat: &ProcStat, pgid: i32, strays: &mut HashMap<i32, u64>) -> bool {
    let new = strays.insert(pid, stat.start_time).is_none();
    if new {
        tracing::warn!(
            pid,
            pgid = stat.pgrp,
            sid = stat.session,
            job_pgid = pgid,
            "killing a job process that escaped its process group"
        );
    }
    signal_quietly(kill(Pid::from_raw(pid), Signal::SIGKILL));
    new
}

/// Reaps the job processes in `known` as they die, for at most `wait`; remembers the rest
/// for a later attempt and returns how many that is.
fn reap(mut known: HashMap<i32, u64>, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    loop {
        reap_known(&mut known);
        if known.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = known.len();
    if !known.is_empty() {
        let mut registry = spawner::children();
        for (pid, start_time) in known {
            registry.add_pending(pid, start_time);
        }
    }
    reap_pending();
    left
}

/// Reaps the pids in `known` that are now zombies of this process, and forgets the ones that
/// are gone (reaped by their own parent) or whose pid now names another process.
fn reap_known(known: &mut HashMap<i32, u64>) {
    let me = std::process::id() as i32;
    let registry = spawner::children();
    known.retain(|&pid, &mut start_time| match read_stat(pid) {
        None => false,
        Some(stat) if stat.start_time != start_time => false,
        Some(stat) if stat.state == b'Z' && stat.ppid == me && !registry.live.contains(&pid) => {
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => true,
                Ok(_) | Err(Errno::ECHILD) => false,
                Err(e) => {
                    tracing::debug!(pid, error = %e, "waitpid on an orphan failed");
                    true
                }
            }
        }
        // Still dying, or a zombie its own (dying) parent has not collected yet.
        Some(_) => true,
    });
}

/// Retries the orphans earlier sweeps left behind. Returns how many are still pending.
pub(super) fn reap_pending() -> usize {
    let mut pending = std::mem::take(&mut spawner::children().pending_reap);
    if pending.is_empty() {
        return 0;
    }
    reap_known(&mut pending);
    let left = pending.len();
    let mut registry = spawner::children();
    for (pid, start_time) in pending {
        registry.add_pending(pid, start_time);
    }
    left
}

/// ESRCH (already gone) is the normal case when signalling a dying job.
fn signal_quietly(result: nix::Result<()>) {
    match result {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::debug!(error = %e, "signalling a job process failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let raw = b"4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100\n";
        let stat = parse_stat(raw).expect("stat");
        assert_eq!(
            stat,
            ProcStat {
                state: b'S',
                ppid: 1,
                pgrp: 4242,
                session: 4242,
                start_time: 987654,
            }
        );
        assert!(parse_stat(b"garbage").is_none());
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id() as i32;
        let stat = read_stat(me).expect("own stat");
        assert_eq!(stat.ppid, nix::unistd::getppid().as_raw());
        assert_eq!(stat.pgrp, nix::unistd::getpgrp().as_raw());
        assert_ne!(stat.state, b'Z');
    }
}
