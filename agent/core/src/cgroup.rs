//! Every job in its own cgroup (v2), where the host delegates a subtree to the agent.
//!
//! A process group and a marker variable find most of a job's descendants, but not one that
//! calls `setsid` and clears its environment. A cgroup finds every one: a process cannot
//! leave it without the rights of the subtree's owner. Per job:
//!
//! ```text
//! <job cgroup>/      the job unit's own cgroup under systemd (Delegate=yes),
//!                    or <[jobs] cgroup_parent>/<job id> elsewhere
//!   supervisor/      the job's owner process, which moves itself here first: a cgroup that
//!                    hands controllers to its children may hold no process itself
//!   payload/         the job and all it starts; memory.max, memory.oom.group = 1
//! ```
//!
//! The owner enables every controller the subtree offers, and the job's first process
//! writes itself into `payload` before it execs, so no instruction of the job runs
//! elsewhere. The job has ended when `payload` is empty (`cgroup.events` `populated 0`);
//! `cgroup.kill` ends all of it at once; `cpu.stat`, `memory.peak` and `memory.events` say
//! what it used and whether the OOM killer took part of it (see [`files`]).
//!
//! Owns: finding the v2 hierarchy and what it offers ([`Capability`]), creating, entering and
//! removing a job's cgroup ([`JobCgroup`]), and the payload's files ([`Payload`]).
//! Must not touch: signals to processes other than through `cgroup.kill` (and the pid by
//! pid fallback of kernels without it), or what an ending means (`outcome`).

pub mod files;
mod payload;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use files::Usage;
pub use payload::{kill_leftovers, Payload};

/// The owner's leaf in the job's cgroup.
pub const SUPERVISOR_LEAF: &str = "supervisor";
/// The job's leaf.
pub const PAYLOAD_LEAF: &str = "payload";

/// Job cgroups under a configured parent that are empty and older than this are left over
/// from owners that died or could not move out; the next owner removes them. A younger one
/// may be a sibling owner's that is being set up.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// The extended attribute an owner sets on a job cgroup it makes under a configured parent:
/// the job id, which is also the cgroup's name. Clean-up removes only a cgroup that carries
/// it with its own name, so a cgroup someone else made there is never touched.
pub const MARK_XATTR: &str = "user.rsql-agent.job";

/// `[jobs] cgroup`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupChoice {
    /// A cgroup per job wherever one is available: the job unit's under systemd, else under
    /// `[jobs] cgroup_parent` when it is set.
    #[default]
    Auto,
    /// Never: the process group and marker sweep only.
    Off,
}

/// Where a job's cgroup is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Placement {
    /// The owner's own cgroup, delegated to it: a systemd job unit with `Delegate=yes`.
    Unit,
    /// A new cgroup `<parent>/<job id>` under a delegated directory.
    Under { parent: PathBuf },
}

/// What the owner is asked to set up for one job (part of `job.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupPlan {
    pub placement: Placement,
    /// `memory.max` for the payload, in bytes; needs the memory controller.
    #[serde(default)]
    pub memory_max: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path} is not in a cgroup v2 hierarchy")]
    NotV2 { path: PathBuf },
    #[error(
        "this process has no cgroup v2 (no `0::` line in /proc/self/cgroup, or no cgroup2 mount)"
    )]
    NoOwnCgroup,
    #[error("{path} is the root of the cgroup hierarchy, which is never delegated")]
    Root { path: PathBuf },
    #[error("{path} is not a cgroup of this job: {why}; nothing is killed through it")]
    NotJobs { path: PathBuf, why: String },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How much of cgroup v2 jobs get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// No cgroup: the process group and marker sweep, and CPU from the owner's reaped
    /// children.
    None,
    /// Every descendant is found and killed, and `cpu_ms` measured; no memory figures,
    /// limit or OOM detection.
    V2WithoutMemory,
    /// All of it.
    Full,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::None => "no cgroup",
            Level::V2WithoutMemory => "cgroup v2 without the memory controller",
            Level::Full => "full cgroup v2",
        })
    }
}

/// What jobs will get, as found at start (and by `check-config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    None {
        /// Why, in words for the operator.
        reason: String,
    },
    V2 {
        /// Where job cgroups go, in words.
        place: String,
        /// The controllers a job's cgroup can enable.
        controllers: Vec<String>,
    },
}

impl Capability {
    pub fn level(&self) -> Level {
        match self {
            Capability::None { .. } => Level::None,
            Capability::V2 { controllers, .. } if controllers.iter().any(|c| c == "memory") => {
                Level::Full
            }
            Capability::V2 { .. } => Level::V2WithoutMemory,
        }
    }

    /// One line for the log and `check-config`.
    pub fn describe(&self) -> String {
        match self {
            Capability::None { reason } => format!(
                "{}: {reason}; a job's processes are found by process group and marker \
                 variable only (one that leaves the group and clears its environment can \
                 outlive the job), and cpu_ms counts only the processes its owner reaped",
                Level::None
            ),
            Capability::V2 { place, controllers } => {
                let offered = if controllers.is_empty() {
                    "none".to_string()
                } else {
                    controllers.join(" ")
                };
                let missing = match self.level() {
                    Level::Full => String::new(),
                    _ => "; no max_rss_mb, memory_max or OOM detection".to_string(),
                };
                format!("{}: {place}; controllers: {offered}{missing}", self.level())
            }
        }
    }
}

/// Finds what a job placed by `placement` would get, without creating anything.
pub fn detect(placement: &Placement) -> Capability {
    match placement {
        Placement::Under { parent } => {
            if !is_cgroup2(parent) {
                return Capability::None {
                    reason: format!("{} is not a cgroup v2 directory", parent.display()),
                };
            }
            if nix::unistd::access(parent, nix::unistd::AccessFlags::W_OK).is_err() {
                return Capability::None {
                    reason: format!(
                        "{} is not writable by this user (delegate it: chown the directory \
                         and its cgroup.procs, cgroup.subtree_control and cgroup.threads)",
                        parent.display()
                    ),
                };
            }
            Capability::V2 {
                place: format!("a cgroup per job under {}", parent.display()),
                controllers: words(parent.join("cgroup.subtree_control")),
            }
        }
        Placement::Unit => match mount_point() {
            None => Capability::None {
                reason: "no cgroup2 file system is mounted".to_string(),
            },
            Some(mount) => Capability::V2 {
                place: format!(
                    "each job's systemd unit (Delegate=yes) under {}",
                    mount.display()
                ),
                controllers: words(mount.join("cgroup.controllers")),
            },
        },
    }
}

fn words(path: PathBuf) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Where the cgroup2 file system is mounted (`/sys/fs/cgroup` on a pure v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn mount_point() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        // `id parent major:minor root mount-point options [optional...] - type source ...`
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(mount)))
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape_mount(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(byte) => out.push(byte as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// This process's cgroup in the v2 hierarchy (the `0::` line of `/proc/self/cgroup`).
pub fn own_cgroup() -> Option<PathBuf> {
    let mount = mount_point()?;
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(path.trim().trim_start_matches('/')))
}

/// A job's cgroup, set up and entered by its owner; see the module doc.
#[derive(Debug)]
pub struct JobCgroup {
    dir: PathBuf,
    placement: Placement,
    /// The owner's cgroup before it moved in, to go back to at the end so that the job's
    /// cgroup can be removed (only under a configured parent; systemd removes a unit's).
    home: Option<PathBuf>,
    payload: Payload,
    controllers: Vec<String>,
}

impl JobCgroup {
    /// Creates the job's cgroup as `plan` says, moves this process into its supervisor
    /// leaf, enables the controllers on offer and makes the payload leaf with its limits.
    pub fn set_up(plan: &CgroupPlan, job_id: &str) -> Result<JobCgroup, CgroupError> {
        let (dir, home) = match &plan.placement {
            Placement::Unit => {
                let own = own_cgroup().ok_or(CgroupError::NoOwnCgroup)?;
                if mount_point().is_some_and(|m| m == own) {
                    return Err(CgroupError::Root { path: own });
                }
                (own, None)
            }
            Placement::Under { parent } => {
                if !is_cgroup2(parent) {
                    return Err(CgroupError::NotV2 {
                        path: parent.clone(),
                    });
                }
                remove_stale(parent, STALE_AFTER);
                let dir = parent.join(job_id);
                make_dir(&dir)?;
                if let Err(e) = mark(&dir, job_id) {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot mark the job cgroup as the agent's; a leftover of it will not be removed");
                }
                (dir, own_cgroup())
            }
        };
        let supervisor = dir.join(SUPERVISOR_LEAF);
        make_dir(&supervisor)?;
        write(&supervisor.join("cgroup.procs"), "0")?;
        let entered = enter_payload(&dir, plan.memory_max);
        if entered.is_err() {
            // Not half in a job cgroup that nobody will remove: back where it came from.
            if let Some(home) = &home {
                let _ = write(&home.join("cgroup.procs"), "0");
            }
        }
        let (payload, controllers) = entered?;
        Ok(JobCgroup {
            dir,
            placement: plan.placement.clone(),
            home,
            payload,
            controllers,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// The controllers enabled for the job.
    pub fn controllers(&self) -> &[String] {
        &self.controllers
    }

    /// Removes what can be removed once the job is over: the payload leaf, and under a
    /// configured parent (after moving this process back where it came from) the rest.
    /// Best effort: a leftover is empty, and the next owner removes it.
    pub fn finish(self) {
        let _ = std::fs::remove_dir(self.payload.path());
        if let (Placement::Under { .. }, Some(home)) = (&self.placement, &self.home) {
            if write(&home.join("cgroup.procs"), "0").is_ok() {
                let _ = std::fs::remove_dir(self.dir.join(SUPERVISOR_LEAF));
                let _ = std::fs::remove_dir(&self.dir);
            }
        }
    }
}

/// With the owner out of `dir` itself: enables the controllers on offer and makes the
/// payload leaf with its limits.
fn enter_payload(
    dir: &Path,
    memory_max: Option<u64>,
) -> Result<(Payload, Vec<String>), CgroupError> {
    let controllers = enable_controllers(dir);
    let payload_dir = dir.join(PAYLOAD_LEAF);
    make_dir(&payload_dir)?;
    let memory = controllers.iter().any(|c| c == "memory");
    if memory {
        if let Some(max) = memory_max {
            write(&payload_dir.join("memory.max"), &max.to_string())?;
        }
        // The OOM killer takes the whole job, not one process of it: a script that lost its
        // rsql would carry on and report a misleading failure of its own.
        if let Err(e) = write(&payload_dir.join("memory.oom.group"), "1") {
            tracing::warn!(error = %crate::error_chain(&e), "the OOM killer may take only part of the job");
        }
    }
    Ok((Payload::open(payload_dir, memory, memory_max)?, controllers))
}

/// Enables in `dir` every controller its parent hands down; returns those that took. One at
/// a time, so that one the kernel refuses (a threaded-only one, say) costs only itself.
fn enable_controllers(dir: &Path) -> Vec<String> {
    let control = dir.join("cgroup.subtree_control");
    words(dir.join("cgroup.controllers"))
        .into_iter()
        .filter(|name| match write(&control, &format!("+{name}")) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(controller = %name, error = %crate::error_chain(&e), "controller not enabled for the job");
                false
            }
        })
        .collect()
}

/// Whether `name` has the shape of a job id (`<lock key hash>-<attempt id>`, the daemon's
/// with a per-delivery nonce before the attempt id: lowercase hex around one dash; see
/// `attempt::job_id`).
fn is_job_id(name: &str) -> bool {
    let hex = |part: &str| {
        !part.is_empty() && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    name.split_once('-').is_some_and(|(a, b)| hex(a) && hex(b))
}

/// Sets [`MARK_XATTR`] on a job cgroup just made.
fn mark(dir: &Path, job_id: &str) -> nix::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| nix::Error::EINVAL)?;
    let name = std::ffi::CString::new(MARK_XATTR).map_err(|_| nix::Error::EINVAL)?;
    // SAFETY: both strings are NUL-terminated and outlive the call; the value is a valid
    // slice of its stated length.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            job_id.as_ptr().cast(),
            job_id.len(),
            0,
        )
    };
    nix::errno::Errno::result(rc).map(drop)
}

/// Whether `dir` carries [`MARK_XATTR`] with its own name: a cgroup an owner made for a job.
fn is_marked(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some(name) = dir.file_name() else {
        return false;
    };
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let Ok(attr) = std::ffi::CString::new(MARK_XATTR) else {
        return false;
    };
    let mut value = [0u8; 256];
    // SAFETY: both strings are NUL-terminated and outlive the call; the kernel writes at
    // most `value.len()` bytes into `value`.
    let len = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            attr.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    usize::try_from(len).is_ok_and(|len| &value[..len] == name.as_bytes())
}

/// Checks a job's payload cgroup as a record names it (`owner.json`, which whoever could
/// write the state directory could forge) before anything is killed through it: it must be
/// a cgroup v2 directory, the `payload` leaf of this job's cgroup, and that cgroup either
/// `<parent>/<job id>` under the configured parent or a job owner's systemd unit (named
/// `<unit_prefix>….service`, in `<slice>`). Returns the resolved path.
pub fn check_job_payload(
    payload: &Path,
    job_id: &str,
    parent: Option<&Path>,
    slice: &str,
    unit_prefix: &str,
) -> Result<PathBuf, CgroupError> {
    let refuse = |why: &str| CgroupError::NotJobs {
        path: payload.to_path_buf(),
        why: why.to_string(),
    };
    let real = payload
        .canonicalize()
        .map_err(|e| refuse(&format!("it cannot be resolved ({e})")))?;
    if !is_cgroup2(&real) {
        return Err(refuse("it is not a cgroup v2 directory"));
    }
    let job = real
        .parent()
        .filter(|_| real.file_name().is_some_and(|n| n == PAYLOAD_LEAF))
        .ok_or_else(|| refuse("it is not a job's payload leaf"))?;
    let under_parent = parent.and_then(|p| p.canonicalize().ok()).is_some_and(|p| {
        job.parent() == Some(p.as_path()) && job.file_name().is_some_and(|n| n == job_id)
    });
    // Owner units are `rsql-job-owner@<connection>.service`: systemd names the instance, so
    // the unit is known by its template's prefix, in the jobs' slice.
    let in_unit = job
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(unit_prefix) && n.ends_with(".service"))
        && job
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == slice);
    if under_parent || in_unit {
        Ok(real)
    } else {
        Err(refuse(
            "it is neither under [jobs] cgroup_parent with the job's id nor the job's own \
             systemd unit",
        ))
    }
}

/// Whether `path` is the root of a cgroup v2 hierarchy (which has no `cgroup.type`), a
/// place shared with every service of the host.
pub fn is_root(path: &Path) -> bool {
    is_cgroup2(path) && !path.join("cgroup.type").exists()
}

/// Removes job cgroups under `parent` that are empty and older than `age`, deepest first.
/// `rmdir` refuses a cgroup that holds a process or a child, so a live job is never touched.
/// Only cgroups provably an owner's are touched: named like a job id and marked with
/// [`MARK_XATTR`] holding that name; anything else under the parent is someone else's.
fn remove_stale(parent: &Path, age: Duration) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > age);
        if !old || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        if !entry.file_name().to_str().is_some_and(is_job_id) || !is_marked(&dir) {
            continue;
        }
        let _ = std::fs::remove_dir(dir.join(PAYLOAD_LEAF));
        let _ = std::fs::remove_dir(dir.join(SUPERVISOR_LEAF));
        if std::fs::remove_dir(&dir).is_ok() {
            tracing::debug!(cgroup = %dir.display(), "removed a job cgroup left over by an earlier owner");
        }
    }
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Io {
            action: "create",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a cgroup interface file (which exists; never created, never truncated).
fn write(path: &Path, text: &str) -> Result<(), CgroupError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| CgroupError::Io {
            action: "write",
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_memory_controller() {
        let v2 = |controllers: &[&str]| Capability::V2 {
            place: "x".into(),
            controllers: controllers.iter().map(|c| c.to_string()).collect(),
        };
        assert_eq!(v2(&["cpu", "memory", "pids"]).level(), Level::Full);
        assert_eq!(v2(&["hugetlb"]).level(), Level::V2WithoutMemory);
        assert!(v2(&[]).describe().contains("no max_rss_mb"));
        let none = Capability::None {
            reason: "off".into(),
        };
        assert_eq!(none.level(), Level::None);
        assert!(none.describe().contains("process group and marker"));
    }

    #[test]
    fn a_plain_directory_is_no_cgroup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let found = detect(&Placement::Under {
            parent: dir.path().to_path_buf(),
        });
        assert_eq!(found.level(), Level::None, "{found:?}");
        assert!(found.describe().contains("not a cgroup v2 directory"));
    }

    #[test]
    fn job_ids_have_one_shape() {
        assert!(is_job_id("3f9a1c2e-3f9a1c2e1"));
        for other in [
            "system.slice",
            "3f9a1c2e",
            "-1",
            "a-b-c",
            "3F9A-1",
            "user-1000",
        ] {
            assert!(!is_job_id(other), "{other}");
        }
    }

    #[test]
    fn a_plain_directory_is_never_a_jobs_payload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let payload = dir.path().join("3f9a-1").join(PAYLOAD_LEAF);
        std::fs::create_dir_all(&payload).expect("mkdir");
        std::fs::write(payload.join("cgroup.procs"), "1\n").expect("write");
        let err = check_job_payload(&payload, "3f9a-1", Some(dir.path()), "s.slice", "u")
            .expect_err("a plain directory");
        assert!(
            err.to_string().contains("not a cgroup v2 directory"),
            "{err}"
        );
    }

    #[test]
    fn mount_points_with_escapes() {
        assert_eq!(unescape_mount("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
    }

    #[test]
    fn plans_read_back_and_old_ones_have_no_limit() {
        let plan = CgroupPlan {
            placement: Placement::Under {
                parent: "/sys/fs/cgroup/rsql-jobs".into(),
            },
            memory_max: Some(1 << 30),
        };
        let text = serde_json::to_string(&plan).expect("json");
        assert_eq!(
            serde_json::from_str::<CgroupPlan>(&text).expect("parse"),
            plan
        );
        let unit: CgroupPlan =
            serde_json::from_str(r#"{"placement":{"kind":"unit"}}"#).expect("parse");
        assert_eq!(unit.placement, Placement::Unit);
        assert_eq!(unit.memory_max, None);
    }
}
