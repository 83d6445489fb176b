//! `[jobs]` and `[jobs.legacy]`: how each job runs: its scripts, its log, its limits, its
//! owner process and its user.
//!
//! [`JobSettings`] and [`LauncherChoice`] themselves are defined in the config root, where
//! the job owner's launcher reads them; this file reads and checks the keys. `from_raw` is a
//! function rather than a method so that it does not care where the type is defined.

use serde::Deserialize;
use std::path::{Path, PathBuf};

use super::{
    duration_or, parse_size, positive_or, JobSettings, KeyError, LauncherChoice, MAX_JOB_TIMEOUT,
};
use crate::legacy::LegacySettings;
use crate::lock::OnInterrupted;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJobs {
    script_dir: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    default_timeout: Option<String>,
    kill_grace: Option<String>,
    interpreter: Option<PathBuf>,
    heartbeat_interval: Option<String>,
    on_interrupted: Option<OnInterrupted>,
    log_retention: Option<String>,
    log_max_total_mb: Option<i64>,
    pipe_drain: Option<String>,
    launcher: Option<LauncherChoice>,
    user: Option<String>,
    cgroup: Option<crate::cgroup::CgroupChoice>,
    cgroup_parent: Option<PathBuf>,
    memory_max: Option<String>,
    legacy: Option<RawLegacy>,
}

/// `[jobs.legacy]`: see [`crate::legacy`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLegacy {
    instance_code_dir: Option<PathBuf>,
    secret_id: Option<String>,
    workflows: Option<Vec<String>>,
}

/// `[jobs]` as validated; `script_dir` is the one named on the command line, used when the
/// file names none.
pub(super) fn from_raw(
    raw: RawJobs,
    script_dir: Option<&Path>,
    state_dir: &Path,
    per_user: bool,
) -> Result<JobSettings, KeyError> {
    let defaults = JobSettings::default();
    let script_dir = match (raw.script_dir, script_dir) {
        (Some(dir), _) => dir,
        (None, Some(dir)) => dir.to_path_buf(),
        (None, None) => defaults.script_dir,
    };
    let log_dir = match raw.log_dir {
        Some(dir) => dir,
        None if per_user => state_dir.join("jobs"),
        None => defaults.log_dir,
    };
    const MIB: u64 = 1024 * 1024;
    Ok(JobSettings {
        script_dir,
        log_dir,
        default_timeout: duration_or(
            "jobs.default_timeout",
            raw.default_timeout,
            defaults.default_timeout,
        )?,
        kill_grace: duration_or("jobs.kill_grace", raw.kill_grace, defaults.kill_grace)?,
        interpreter: raw.interpreter.unwrap_or(defaults.interpreter),
        heartbeat_interval: duration_or(
            "jobs.heartbeat_interval",
            raw.heartbeat_interval,
            defaults.heartbeat_interval,
        )?,
        on_interrupted: raw.on_interrupted.unwrap_or(defaults.on_interrupted),
        log_retention: duration_or(
            "jobs.log_retention",
            raw.log_retention,
            defaults.log_retention,
        )?,
        log_max_total_bytes: positive_or(
            "jobs.log_max_total_mb",
            raw.log_max_total_mb,
            defaults.log_max_total_bytes / MIB,
        )? * MIB,
        pipe_drain: duration_or("jobs.pipe_drain", raw.pipe_drain, defaults.pipe_drain)?,
        launcher: raw.launcher.unwrap_or(defaults.launcher),
        user: match raw.user {
            Some(name) if name.trim().is_empty() => {
                return Err(("jobs.user", "must name a user".to_string()))
            }
            other => other,
        },
        cgroup: raw.cgroup.unwrap_or(defaults.cgroup),
        cgroup_parent: raw.cgroup_parent,
        memory_max: match raw.memory_max {
            None => None,
            Some(text) => Some(parse_size(&text).map_err(|reason| ("jobs.memory_max", reason))?),
        },
        legacy: raw.legacy.map(|l| LegacySettings {
            instance_code_dir: l
                .instance_code_dir
                .unwrap_or_else(|| PathBuf::from(crate::legacy::DROP_IN_DIR)),
            secret_id: l.secret_id,
            workflows: l.workflows,
        }),
    })
}

/// `jobs.default_timeout` is between a second and [`MAX_JOB_TIMEOUT`].
pub(super) fn check_timeout(jobs: &JobSettings) -> Result<(), KeyError> {
    if jobs.default_timeout.is_zero() || jobs.default_timeout > MAX_JOB_TIMEOUT {
        return Err((
            "jobs.default_timeout",
            format!(
                "must be between 1s and {}, got {}",
                humantime::format_duration(MAX_JOB_TIMEOUT),
                humantime::format_duration(jobs.default_timeout)
            ),
        ));
    }
    Ok(())
}

/// `[jobs.legacy]` names an absolute directory, and workflow ids when it names any.
pub(super) fn check_legacy(legacy: &LegacySettings) -> Result<(), KeyError> {
    if !legacy.instance_code_dir.is_absolute() {
        return Err((
            "jobs.legacy.instance_code_dir",
            format!(
                "{} must be an absolute path",
                legacy.instance_code_dir.display()
            ),
        ));
    }
    if let Some(list) = &legacy.workflows {
        if list.is_empty() || list.iter().any(|w| w.trim().is_empty()) {
            return Err((
                "jobs.legacy.workflows",
                "must list workflow ids (leave it out for every workflow)".to_string(),
            ));
        }
    }
    Ok(())
}
