//! What the types cannot check: the paths (absolute, trusted, on a real writable
//! filesystem), the duration bounds that keep the agent working, and the mode of a file that
//! holds a password. Each table's own value checks are in its file; [`Config::validate`]
//! runs them all, in a fixed order, and stops at the first.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{database, jobs, Config, ConfigError};

impl Config {
    /// Checks what the types cannot: the script directory exists and is safe, and the
    /// numbers are sane.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| self.invalid((key, reason));
        let script_dir = &self.jobs.script_dir;
        let meta = std::fs::metadata(script_dir).map_err(|e| {
            invalid(
                "jobs.script_dir",
                format!("{} cannot be used: {e}", script_dir.display()),
            )
        })?;
        if !meta.is_dir() {
            return Err(invalid(
                "jobs.script_dir",
                format!("{} is not a directory", script_dir.display()),
            ));
        }
        self.check_paths()?;
        self.check_durations()?;
        let invalid = |error| self.invalid(error);
        self.agent.check().map_err(invalid)?;
        jobs::check_timeout(&self.jobs).map_err(invalid)?;
        if let Some(sqs) = &self.sqs {
            sqs.check().map_err(invalid)?;
        }
        if let Some(cw) = &self.cloudwatch {
            cw.check().map_err(invalid)?;
        }
        if let Some(legacy) = &self.jobs.legacy {
            jobs::check_legacy(legacy).map_err(invalid)?;
        }
        database::check(&self.database).map_err(invalid)
    }

    /// Every path is absolute; the scripts, their directories and the interpreter can be
    /// changed by nobody but root and the agent's user; the log and state directories are on
    /// a writable, real filesystem.
    fn check_paths(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| self.invalid((key, reason));
        let mut paths: Vec<(&'static str, &Path)> = vec![
            ("agent.state_dir", &self.agent.state_dir),
            ("jobs.script_dir", &self.jobs.script_dir),
            ("jobs.log_dir", &self.jobs.log_dir),
            ("jobs.interpreter", &self.jobs.interpreter),
            ("lock.dir", &self.lock.dir),
        ];
        if let Some(parent) = &self.jobs.cgroup_parent {
            paths.push(("jobs.cgroup_parent", parent));
        }
        if let Some(socket) = &self.socket {
            paths.push(("intake.socket.path", &socket.path));
        }
        for (key, path) in paths {
            if !path.is_absolute() {
                return Err(invalid(
                    key,
                    format!(
                        "{} must be absolute (a relative path would be resolved from the \
                         agent's working directory, not from the config file)",
                        path.display()
                    ),
                ));
            }
        }
        let trusted = crate::trust::trusted_uids();
        // Anyone who can change a script, a directory above it or the interpreter can run
        // code as the agent's user (root, often).
        crate::trust::check_tree(&self.jobs.script_dir, &trusted).map_err(|e| {
            invalid(
                "jobs.script_dir",
                format!("{e} (anyone who can change it could plant code the agent runs)"),
            )
        })?;
        let interpreter = &self.jobs.interpreter;
        match std::fs::metadata(interpreter) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {}
            Ok(_) => {
                return Err(invalid(
                    "jobs.interpreter",
                    format!("{} is not an executable file", interpreter.display()),
                ))
            }
            Err(e) => {
                return Err(invalid(
                    "jobs.interpreter",
                    format!("{} cannot be used: {e}", interpreter.display()),
                ))
            }
        }
        crate::trust::check(interpreter, &trusted).map_err(|e| {
            invalid(
                "jobs.interpreter",
                format!("{e} (anyone who can change it could run code as the agent)"),
            )
        })?;
        if let Some(legacy) = &self.jobs.legacy {
            // Legacy scripts source code from here (`source $1/get_redshift_creds.sh`). A
            // directory that does not exist yet fails the jobs, not the start.
            if legacy.instance_code_dir.exists() {
                crate::legacy::check_code_dir(&legacy.instance_code_dir).map_err(|e| {
                    invalid(
                        "jobs.legacy.instance_code_dir",
                        format!("{e} (legacy scripts source code from it)"),
                    )
                })?;
            }
        }
        for (key, dir) in [
            ("agent.state_dir", &self.agent.state_dir),
            ("jobs.log_dir", &self.jobs.log_dir),
        ] {
            real_writable_fs(dir).map_err(|reason| invalid(key, reason))?;
        }
        self.check_state_dirs()?;
        self.check_cgroup_parent()
    }

    /// `[jobs] cgroup_parent` is a directory delegated to the jobs, never the root of the
    /// hierarchy: every service of the host lives there, and job cgroups would be mixed in
    /// with theirs.
    fn check_cgroup_parent(&self) -> Result<(), ConfigError> {
        match &self.jobs.cgroup_parent {
            Some(parent) if crate::cgroup::is_root(parent) => Err(ConfigError::Invalid {
                path: self.source.clone().unwrap_or_default(),
                key: "jobs.cgroup_parent",
                reason: format!(
                    "{} is the root of the cgroup v2 hierarchy, shared with every service on \
                     the host; make a directory for the jobs under it (`mkdir {}`) and \
                     delegate that",
                    parent.display(),
                    parent.join("rsql-jobs").display()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The state directory holds the control socket, the owners' records and the outbox:
    /// whoever can change it can plant a symlink, a record or a listener. It (or, before its
    /// first start, the directory it will be made in) passes the trust rule for the agent's
    /// uids. The lock directory may be on EFS, whose owners are the access point's, so only
    /// its mode is checked: nobody but its owner and root's group may write to it.
    fn check_state_dirs(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| self.invalid((key, reason));
        use std::os::unix::fs::MetadataExt;
        let mut state_dir = nearest_existing(&self.agent.state_dir);
        // Not made yet, in a sticky root-owned directory like /tmp: the agent makes it its
        // own, and nobody else can then rename or replace it; the rule applies above.
        let sticky_root = |dir: &Path| {
            std::fs::metadata(dir).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o1000 != 0)
        };
        if state_dir != self.agent.state_dir && sticky_root(&state_dir) {
            state_dir = state_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        }
        crate::trust::check(&state_dir, &crate::trust::agent_uids()).map_err(|e| {
            invalid(
                "agent.state_dir",
                format!(
                    "{e} (anyone who can change it could plant records, symlinks or a \
                     listener the agent and its tools trust)"
                ),
            )
        })?;
        let lock_dir = nearest_existing(&self.lock.dir);
        if lock_dir != self.lock.dir && sticky_root(&lock_dir) {
            return Ok(());
        }
        if let Ok(meta) = std::fs::metadata(&lock_dir) {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o002 != 0 || (mode & 0o020 != 0 && meta.gid() != 0) {
                return Err(invalid(
                    "lock.dir",
                    format!(
                        "{} is writable by other users (mode {mode:o}), who could take or \
                         plant job locks; run `chmod go-w {}`",
                        lock_dir.display(),
                        lock_dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Each duration within bounds that keep the agent working; the error says why.
    fn check_durations(&self) -> Result<(), ConfigError> {
        const SECOND: Duration = Duration::from_secs(1);
        const MINUTE: Duration = Duration::from_secs(60);
        const HOUR: Duration = Duration::from_secs(3600);
        const DAY: Duration = Duration::from_secs(24 * 3600);
        let mut checks: Vec<(&'static str, Duration, Duration, Duration, &'static str)> = vec![
            (
                "jobs.kill_grace",
                self.jobs.kill_grace,
                Duration::ZERO,
                HOUR,
                "a job that ignores SIGTERM longer than that is hung, and holds its slot",
            ),
            (
                "jobs.heartbeat_interval",
                self.jobs.heartbeat_interval,
                SECOND,
                10 * MINUTE,
                "heartbeats keep the task, the SQS message and the lock lease alive; a slower \
                 one lets them expire under a running job",
            ),
            (
                "jobs.log_retention",
                self.jobs.log_retention,
                HOUR,
                3650 * DAY,
                "a shorter retention deletes logs the shipper may still be sending",
            ),
            (
                "jobs.pipe_drain",
                self.jobs.pipe_drain,
                Duration::ZERO,
                10 * MINUTE,
                "a job's end waits that long for a grandchild that holds its output open",
            ),
            (
                "lock.retention",
                self.lock.retention,
                14 * DAY,
                3650 * DAY,
                "a finished job's state must outlive every redelivery of its message (SQS keeps \
                 a message up to 14 days), or a redelivery runs the job a second time",
            ),
            (
                "database.secret_ttl",
                self.database.secret_ttl,
                SECOND,
                DAY,
                "a rotated password must reach the jobs within a day",
            ),
        ];
        if let Some(cw) = &self.cloudwatch {
            checks.push((
                "logs.cloudwatch.flush_interval",
                cw.flush_interval,
                Duration::from_millis(1),
                MINUTE,
                "lines must reach CloudWatch while the job runs",
            ));
            checks.push((
                "logs.cloudwatch.final_flush_timeout",
                cw.final_flush_timeout,
                Duration::ZERO,
                10 * MINUTE,
                "a job's report waits that long for its last lines",
            ));
        }
        for (key, value, min, max, why) in checks {
            if value < min || value > max {
                return Err(ConfigError::Invalid {
                    path: self.source.clone().unwrap_or_default(),
                    key,
                    reason: format!(
                        "must be between {} and {}, got {}: {why}",
                        humantime::format_duration(min),
                        humantime::format_duration(max),
                        humantime::format_duration(value)
                    ),
                });
            }
        }
        Ok(())
    }

    /// A file that holds a password must not be readable by other users.
    pub(super) fn check_secret_file_mode(&self, path: &Path) -> Result<(), ConfigError> {
        if self.database.password.is_none() {
            return Ok(());
        }
        let mode = std::fs::metadata(path)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o004 != 0 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "database.password",
                reason: format!(
                    "the file holds a password but is world-readable (mode {:o}); chmod o-r it",
                    mode & 0o777
                ),
            });
        }
        Ok(())
    }
}

/// Pseudo filesystems a log or state directory must never be on (statfs `f_type`): proc,
/// sysfs, cgroup v1/v2, debugfs, tracefs, securityfs, pstore, configfs, bpf.
const PSEUDO_FS: [i64; 10] = [
    0x9fa0,
    0x6265_6572,
    0x0027_e0eb,
    0x6367_7270,
    0x6462_6720,
    0x7472_6163,
    0x7363_6673,
    0x6165_676c,
    0x6265_6570,
    0xcafe_4a11,
];

/// `path`, or the nearest directory above it that exists (where it will be made).
fn nearest_existing(path: &Path) -> PathBuf {
    let mut probe = path;
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent,
            None => break,
        }
    }
    probe.to_path_buf()
}

/// `dir`, or its nearest existing ancestor (the agent creates the rest), is on a writable,
/// real filesystem.
fn real_writable_fs(dir: &Path) -> Result<(), String> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent,
            None => break,
        }
    }
    let fs = nix::sys::statfs::statfs(probe)
        .map_err(|e| format!("{} cannot be examined: {e}", probe.display()))?;
    let kind = fs.filesystem_type().0 as i64;
    if PSEUDO_FS.contains(&kind) {
        return Err(format!(
            "{} is on a kernel pseudo filesystem (type {kind:#x}), not a real one; use a \
             directory under /var",
            dir.display()
        ));
    }
    let vfs = nix::sys::statvfs::statvfs(probe)
        .map_err(|e| format!("{} cannot be examined: {e}", probe.display()))?;
    if vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Err(format!(
            "{} is on a read-only filesystem ({} is mounted read-only)",
            dir.display(),
            probe.display()
        ));
    }
    Ok(())
}
