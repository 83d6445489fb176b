//! The `payload` leaf of a job's cgroup: the job and everything it starts.
//!
//! The supervisor puts the job's first process here before it execs (a write of `0` to
//! `cgroup.procs` in the forked child, through a descriptor opened beforehand), kills the
//! whole leaf with `cgroup.kill`, waits for `cgroup.events` to say `populated 0`, and then
//! reads what the job used.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::files::{self, Usage};
use super::CgroupError;

/// The longest single wait on `cgroup.events`: the kernel wakes `poll` when `populated`
/// changes, this only bounds a missed wake-up.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// Rounds of killing pid by pid on a kernel without `cgroup.kill` (before 5.14): a process
/// can fork between being listed and being killed.
const KILL_ROUNDS: usize = 20;

/// A job's payload cgroup. Cheap to clone: the open `cgroup.procs` is shared.
#[derive(Debug, Clone)]
pub struct Payload {
    dir: PathBuf,
    procs: Arc<OwnedFd>,
    /// The `memory.max` written, when the memory controller is enabled here.
    memory_max: Option<u64>,
    memory: bool,
}

impl Payload {
    /// Opens the payload at `dir` (which exists): its `cgroup.procs` stays open for the
    /// job's child to write itself into.
    pub(super) fn open(
        dir: PathBuf,
        memory: bool,
        memory_max: Option<u64>,
    ) -> Result<Payload, CgroupError> {
        let procs_path = dir.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&procs_path)
            .map_err(|source| CgroupError::Io {
                action: "open",
                path: procs_path,
                source,
            })?;
        Ok(Payload {
            dir,
            procs: Arc::new(OwnedFd::from(procs)),
            memory_max: if memory { memory_max } else { None },
            memory,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether the memory controller is enabled for the job (limits, peak, OOM kills).
    pub fn has_memory(&self) -> bool {
        self.memory
    }

    /// The payload's `cgroup.procs`, open for writing and close-on-exec: a forked child
    /// writes `0` to it before exec to move itself in (async-signal-safe: one `write`).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// The processes in the job's cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        read_pids(&self.dir)
    }

    /// Kills every process of the job at once: `cgroup.kill` (which also catches a process
    /// forking at that moment), or, on a kernel without it, SIGKILL pid by pid until none
    /// is left.
    pub fn kill(&self) -> io::Result<()> {
        kill_dir(&self.dir)
    }

    /// Whether any process is left. A cgroup that is gone, or whose events cannot be read,
    /// holds nothing this process could still wait for.
    pub fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .ok()
            .and_then(|text| files::populated(&text))
            .unwrap_or(false)
    }

    /// Blocks until the cgroup is empty (`populated 0`), at most `timeout`; whether it is.
    pub fn wait_empty(&self, timeout: Duration) -> bool {
        wait_empty(&self.dir, timeout)
    }

    /// What the job used (read once it is empty, so every process's share is in).
    pub fn usage(&self) -> Usage {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).ok();
        let (peak, events) = if self.memory {
            (read("memory.peak"), read("memory.events"))
        } else {
            (None, None)
        };
        files::usage_from(
            read("cpu.stat").as_deref(),
            peak.as_deref(),
            events.as_deref(),
            self.memory_max,
        )
    }
}

/// See [`Payload::wait_empty`].
fn wait_empty(dir: &Path, timeout: Duration) -> bool {
    let Ok(events) = File::open(dir.join("cgroup.events")) else {
        return true;
    };
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let populated = events
            .read_at(&mut buf, 0)
            .ok()
            .and_then(|n| std::str::from_utf8(&buf[..n]).ok())
            .and_then(files::populated)
            .unwrap_or(false);
        if !populated {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        wait_for_change(&events, left.min(POLL_SLICE));
    }
}

/// `poll` wakes a reader of `cgroup.events` with POLLPRI when its contents change.
fn wait_for_change(events: &File, timeout: Duration) {
    let mut fds = [nix::poll::PollFd::new(
        events.as_fd(),
        nix::poll::PollFlags::POLLPRI,
    )];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    // An error (EINTR) or a timeout just means: read again.
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
}

fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| {
            text.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills everything in the cgroup at `dir`; see [`Payload::kill`].
pub(super) fn kill_dir(dir: &Path) -> io::Result<()> {
    match OpenOptions::new().write(true).open(dir.join("cgroup.kill")) {
        Ok(mut file) => file.write_all(b"1"),
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir.is_dir() => {
            for _ in 0..KILL_ROUNDS {
                let pids = read_pids(dir);
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    // ESRCH: it died on its own in the meantime.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Kills whatever is in the cgroup at `dir` (a job whose owner died) and waits, at most
/// `wait`, until it is empty; returns how many processes it held. A cgroup that is gone
/// held none.
pub fn kill_leftovers(dir: &Path, wait: Duration) -> usize {
    let pids = read_pids(dir);
    if pids.is_empty() {
        return 0;
    }
    if let Err(e) = kill_dir(dir) {
        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot kill the job's cgroup");
    }
    if !wait_empty(dir, wait) {
        tracing::warn!(cgroup = %dir.display(), "the job's cgroup still holds processes after cgroup.kill");
    }
    pids.len()
}
