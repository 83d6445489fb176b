//! The agent's configuration: the TOML file, its defaults, and its validation.
//!
//! Owns: parsing `agent.toml` (unknown keys are errors that name the key), turning it into a
//! validated [`Config`] (durations parsed, paths checked, numbers sane), and the defaults
//! used when no file exists (a per-user directory, so a newcomer can run a workflow at once).
//!
//! Must not touch: AWS clients, the network, or any job. `check-config` runs exactly this
//! code and nothing else, so systemd's `ExecStartPre` can call it.
//!
//! One file per table, each holding the table as written (`Raw*`, with
//! `deny_unknown_fields`), its validated settings, their defaults and the checks of its
//! values: `agent`, `jobs` (with `[jobs.legacy]`), `intake`, `lock`, `logs`, `report`,
//! `database`, `metrics` and `fleet`. `duration` reads durations, sizes and counts the same
//! way for every table; `validate` checks paths, filesystems and duration bounds. This file
//! is the root: [`Config`], [`ConfigError`], loading and parsing, and the `[jobs]` types
//! ([`JobSettings`], [`LauncherChoice`]) that the job owner's launcher shares.
//!
//! Why a `Raw*` mirror rather than deserializing straight into the settings (with
//! `humantime-serde` for the durations): a value that does not parse must fail with
//! [`ConfigError::Invalid`] naming the dotted key and the file and saying why
//! (`jobs.kill_grace: "5 parsecs" is not a duration like "30s" ...`), where a serde error only
//! gives a line and a column of the TOML. And many defaults are not constants: `log_dir` and
//! `lock.dir` follow `agent.state_dir`, a config-less run uses per-user directories, and
//! `[jobs.legacy] secret_id` falls back to `[database]`'s; those need the whole file read
//! first. The mirror would stay with or without `humantime-serde`, which would only move the
//! duration parsing into serde and make its errors worse.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::lock::OnInterrupted;
use crate::secrets::DatabaseSettings;

mod agent;
mod database;
mod duration;
mod fleet;
mod intake;
mod jobs;
mod lock;
mod logs;
mod metrics;
mod report;
mod validate;

pub use agent::{AgentSettings, SHUTDOWN_GRACE_UNUSED};
pub use duration::{parse_duration, parse_size, MIN_MEMORY_MAX};
pub use fleet::{FleetMode, FleetSettings};
pub use intake::{SocketSettings, SqsSettings};
pub use lock::LockSettings;
pub use logs::CloudWatchSettings;
pub use metrics::MetricsSettings;
pub use report::{AuditFormat, AuditSettings};

use duration::{duration_or, positive_or};

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rsql-agent/agent.toml";

pub use crate::job::MAX_JOB_TIMEOUT;

/// Why a config could not be loaded or validated. Every variant names the file and, where
/// there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `detail` is the parser's message and position, never the text of a line that sets a
    /// secret key (the TOML error would otherwise quote the password).
    #[error("config file {path} is not valid: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("config file {path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// The file as written, before validation. Field names are the configuration contract
/// (docs/configuration.md); never rename them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: agent::RawAgent,
    #[serde(default)]
    jobs: jobs::RawJobs,
    #[serde(default)]
    intake: intake::RawIntake,
    #[serde(default)]
    lock: lock::RawLock,
    #[serde(default)]
    logs: logs::RawLogs,
    #[serde(default)]
    report: report::RawReport,
    database: Option<database::RawDatabase>,
    #[serde(default)]
    metrics: metrics::RawMetrics,
    #[serde(default)]
    fleet: fleet::RawFleet,
}

/// A validated configuration. Everything here has been checked; code that holds a `Config`
/// never re-validates.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, or `None` for the built-in defaults.
    pub source: Option<PathBuf>,
    pub agent: AgentSettings,
    pub jobs: JobSettings,
    pub sqs: Option<SqsSettings>,
    pub socket: Option<SocketSettings>,
    pub lock: LockSettings,
    pub cloudwatch: Option<CloudWatchSettings>,
    pub audit: AuditSettings,
    pub database: DatabaseSettings,
    pub metrics: MetricsSettings,
    pub fleet: FleetSettings,
    /// Keys the file sets that are no longer used, each with why: `check-config` prints
    /// them and the daemon logs them; they never fail the config.
    pub warnings: Vec<String>,
}

/// `[jobs] launcher`: how job owner processes are started (`job_owner::launch`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherChoice {
    /// systemd when the agent runs as a systemd service and the owner socket is there,
    /// direct otherwise.
    #[default]
    Auto,
    Systemd,
    Direct,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobSettings {
    pub script_dir: PathBuf,
    pub log_dir: PathBuf,
    pub default_timeout: Duration,
    pub kill_grace: Duration,
    pub interpreter: PathBuf,
    pub heartbeat_interval: Duration,
    pub on_interrupted: OnInterrupted,
    pub log_retention: Duration,
    pub log_max_total_bytes: u64,
    pub pipe_drain: Duration,
    /// How job owner processes are started (`job_owner::launch`).
    pub launcher: LauncherChoice,
    /// The user jobs run as (`job_owner::launch::JobUser`); `None`: the launcher's default
    /// (`rsql-job` for owners started as systemd units, the agent's own user otherwise).
    pub user: Option<String>,
    /// Whether jobs get a cgroup of their own where one is available (`cgroup`).
    pub cgroup: crate::cgroup::CgroupChoice,
    /// The delegated cgroup v2 directory job cgroups are made in when owners are not
    /// systemd units; `None`: such jobs get no cgroup.
    pub cgroup_parent: Option<PathBuf>,
    /// `memory.max` of every job, in bytes (a message may ask for less, never more);
    /// needs the memory controller.
    pub memory_max: Option<u64>,
    /// `[jobs.legacy]`: the leading arguments of scripts written for the replaced framework.
    pub legacy: Option<crate::legacy::LegacySettings>,
}

impl Default for JobSettings {
    /// A system-wide agent's settings.
    fn default() -> JobSettings {
        JobSettings {
            script_dir: PathBuf::from("/opt/rsql/rsql_scripts"),
            log_dir: PathBuf::from("/var/log/rsql-agent/jobs"),
            default_timeout: Duration::from_secs(6 * 3600),
            kill_grace: Duration::from_secs(30),
            interpreter: PathBuf::from("/bin/bash"),
            heartbeat_interval: Duration::from_secs(20),
            on_interrupted: OnInterrupted::default(),
            log_retention: Duration::from_secs(14 * 24 * 3600),
            log_max_total_bytes: 10 * 1024 * 1024 * 1024,
            pipe_drain: Duration::from_secs(2),
            launcher: Default::default(),
            user: None,
            cgroup: Default::default(),
            cgroup_parent: None,
            memory_max: None,
            legacy: None,
        }
    }
}

/// A config key and what is wrong with its value; [`Config`] adds the file.
type KeyError = (&'static str, String);

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text, path)?;
        config.check_secret_file_mode(path)?;
        Ok(config)
    }

    /// Parses and validates config text; `path` is only used in messages and for relative
    /// paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            detail: parse_detail(text, &source),
        })?;
        if let Some(password) = raw.database.as_ref().and_then(|d| d.password.as_deref()) {
            crate::secrets::remember(password);
        }
        let config = Config::from_raw(raw, Some(path), None)?;
        config.validate()?;
        Ok(config)
    }

    /// Built-in defaults for running with no config file: state under a per-user directory
    /// and scripts from `script_dir`.
    pub fn defaults_for_user(script_dir: &Path) -> Result<Config, ConfigError> {
        // A directory named on the command line is relative to where the command runs.
        let script_dir = std::path::absolute(script_dir).unwrap_or_else(|_| script_dir.into());
        let config = Config::from_raw(RawConfig::default(), None, Some(&script_dir))?;
        config.validate()?;
        Ok(config)
    }

    fn from_raw(
        raw: RawConfig,
        path: Option<&Path>,
        script_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let invalid = |(key, reason): (&'static str, String)| ConfigError::Invalid {
            path: path.map(Path::to_path_buf).unwrap_or_default(),
            key,
            reason,
        };
        // With no file, state lives in a per-user directory so a newcomer can run at once.
        let per_user = path.is_none();
        let mut warnings = Vec::new();
        if raw.agent.shutdown_grace.is_some() {
            warnings.push(SHUTDOWN_GRACE_UNUSED.to_string());
        }
        let agent = AgentSettings::from_raw(raw.agent, per_user).map_err(invalid)?;
        let mut jobs =
            jobs::from_raw(raw.jobs, script_dir, &agent.state_dir, per_user).map_err(invalid)?;
        let database = match raw.database {
            None => DatabaseSettings::from_process_env(),
            Some(db) => DatabaseSettings::from_raw(db).map_err(invalid)?,
        };
        if let Some(legacy) = jobs.legacy.as_mut() {
            if legacy.secret_id.is_none() {
                legacy.secret_id = database.secret_id.clone();
            }
        }
        Ok(Config {
            source: path.map(Path::to_path_buf),
            sqs: raw
                .intake
                .sqs
                .map(SqsSettings::from_raw)
                .transpose()
                .map_err(invalid)?,
            socket: raw.intake.socket.map(SocketSettings::from_raw),
            lock: LockSettings::from_raw(raw.lock, &agent.state_dir).map_err(invalid)?,
            cloudwatch: (raw.logs.cloudwatch.map(CloudWatchSettings::from_raw))
                .transpose()
                .map_err(invalid)?,
            audit: raw
                .report
                .audit
                .map(AuditSettings::from_raw)
                .unwrap_or_default(),
            metrics: MetricsSettings::from_raw(raw.metrics).map_err(invalid)?,
            fleet: {
                let fleet = FleetSettings::from_raw(raw.fleet).map_err(invalid)?;
                warnings.extend(fleet.warning(jobs.kill_grace));
                fleet
            },
            agent,
            jobs,
            database,
            warnings,
        })
    }

    /// `key` of this config's file is invalid, and why.
    fn invalid(&self, (key, reason): KeyError) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone().unwrap_or_default(),
            key,
            reason,
        }
    }
}

/// The message of a TOML error and where it is, quoting the line only when it does not set a
/// secret key (`password`, or any key with `secret`/`token` in its name).
fn parse_detail(text: &str, error: &toml::de::Error) -> String {
    let Some(span) = error.span() else {
        return error.message().to_string();
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let column = before[line_start..].chars().count() + 1;
    let key = line
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let secret = ["password", "secret", "token"]
        .iter()
        .any(|k| key.contains(k) && !key.ends_with("secret_id") && !key.ends_with("secret_ttl"));
    if secret {
        return format!(
            "line {line_no}, column {column}: the value of `{key}` is not valid (not shown: it is secret; \
             a password is a quoted string)"
        );
    }
    format!(
        "line {line_no}, column {column}: {}\n  | {line}",
        error.message()
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scripts() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("agent.toml"))
    }

    #[test]
    fn full_contract_keys_parse() {
        let dir = scripts();
        let text = format!(
            r#"
[agent]
state_dir = "/var/lib/rsql-agent"
max_concurrent_jobs = 4
[jobs]
script_dir = "{}"
log_dir = "/var/log/rsql-agent/jobs"
default_timeout = "6h"
kill_grace = "30s"
[intake.sqs]
queue_url = "https://sqs.us-east-1.amazonaws.com/123456789012/rsql-jobs"
[lock]
dir = "/mnt/efs/rsql-agent/locks"
[logs.cloudwatch]
log_group = "/ops/rsql-logs/"
[report.audit]
job_table = "rsql-job-audit"
workflow_table = "rsql-workflow-audit"
[database]
host = "cluster.example"
secret_id = "redshift/etl"
"#,
            dir.path().display()
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.jobs.default_timeout, Duration::from_secs(6 * 3600));
        assert_eq!(config.jobs.kill_grace, Duration::from_secs(30));
        assert_eq!(config.agent.max_concurrent_jobs, 4);
        assert_eq!(config.lock.dir, PathBuf::from("/mnt/efs/rsql-agent/locks"));
        assert_eq!(config.audit.job_table.as_deref(), Some("rsql-job-audit"));
        assert_eq!(config.cloudwatch.unwrap().log_group, "/ops/rsql-logs/");
    }

    #[test]
    fn a_file_naming_only_the_required_keys_gets_the_documented_defaults() {
        let dir = scripts();
        let text = format!(
            "[jobs]\nscript_dir = \"{}\"\n\
             [intake.sqs]\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/1/q\"\n\
             [logs.cloudwatch]\nlog_group = \"/ops/rsql-logs/\"\n",
            dir.path().display()
        );
        let config = parse(&text).unwrap();
        let hours = |h: u64| Duration::from_secs(h * 3600);
        assert_eq!(config.agent.state_dir, PathBuf::from("/var/lib/rsql-agent"));
        assert_eq!(config.agent.max_concurrent_jobs, 4);
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        assert_eq!(
            config.jobs.log_dir,
            PathBuf::from("/var/log/rsql-agent/jobs")
        );
        assert_eq!(config.jobs.default_timeout, hours(6));
        assert_eq!(config.jobs.kill_grace, Duration::from_secs(30));
        assert_eq!(config.jobs.interpreter, PathBuf::from("/bin/bash"));
        assert_eq!(config.jobs.heartbeat_interval, Duration::from_secs(20));
        assert_eq!(config.jobs.log_retention, hours(14 * 24));
        assert_eq!(config.jobs.log_max_total_bytes, 10 << 30);
        assert_eq!(config.jobs.pipe_drain, Duration::from_secs(2));
        assert_eq!(config.lock.dir, PathBuf::from("/var/lib/rsql-agent/locks"));
        assert_eq!(config.lock.retention, hours(30 * 24));
        let sqs = config.sqs.unwrap();
        assert_eq!(sqs.wait_time, Duration::from_secs(20));
        assert_eq!(sqs.visibility_timeout, Duration::from_secs(120));
        let cw = config.cloudwatch.unwrap();
        assert!(!cw.create_group);
        assert_eq!(cw.flush_interval, Duration::from_secs(1));
        assert_eq!(cw.final_flush_timeout, Duration::from_secs(10));
        assert!(config.socket.is_none());
    }

    /// `[agent] shutdown_grace` was parsed, bounded and documented, and nothing read it.
    /// An old config keeps working, with any value, and is told the key is unused.
    #[test]
    fn shutdown_grace_is_accepted_with_a_warning_and_no_longer_bounded() {
        let dir = scripts();
        for value in ["\"5m\"", "\"2h\"", "300"] {
            let text = format!(
                "[agent]\nshutdown_grace = {value}\n[jobs]\nscript_dir = \"{}\"\n",
                dir.path().display()
            );
            let config = parse(&text).unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(config.warnings, [SHUTDOWN_GRACE_UNUSED], "{value}");
        }
        assert!(SHUTDOWN_GRACE_UNUSED.contains("no longer used"));
    }

    #[test]
    fn cgroup_keys_parse_and_sizes_are_checked() {
        let dir = scripts();
        let text = format!(
            "[jobs]\nscript_dir = \"{}\"\ncgroup = \"off\"\n\
             cgroup_parent = \"/sys/fs/cgroup/rsql-jobs\"\nmemory_max = \"2G\"\n",
            dir.path().display()
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.jobs.cgroup, crate::cgroup::CgroupChoice::Off);
        assert_eq!(
            config.jobs.cgroup_parent.as_deref(),
            Some(Path::new("/sys/fs/cgroup/rsql-jobs"))
        );
        assert_eq!(config.jobs.memory_max, Some(2 << 30));
        let defaults = parse(&format!(
            "[jobs]\nscript_dir = \"{}\"\n",
            dir.path().display()
        ))
        .unwrap();
        assert_eq!(defaults.jobs.cgroup, crate::cgroup::CgroupChoice::Auto);
        assert_eq!(defaults.jobs.memory_max, None);

        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size(" 4 g "), Ok(4 << 30));
        for bad in ["lots", "1.5G", "-1G", "4GB", "1K", ""] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        let err = parse(&format!(
            "[jobs]\nscript_dir = \"{}\"\nmemory_max = \"a lot\"\n",
            dir.path().display()
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("jobs.memory_max"), "{err}");
        let err = parse(&format!(
            "[jobs]\nscript_dir = \"{}\"\ncgroup_parent = \"rsql-jobs\"\n",
            dir.path().display()
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("jobs.cgroup_parent"), "{err}");
    }

    #[test]
    fn legacy_section_and_audit_format_parse_and_unknown_keys_are_named() {
        let dir = scripts();
        let base = format!("[jobs]\nscript_dir = \"{}\"\n", dir.path().display());
        let plain = parse(&base).unwrap();
        assert_eq!(plain.jobs.legacy, None);
        assert_eq!(plain.audit.format, AuditFormat::Standard);

        let config = parse(&format!(
            "{base}[jobs.legacy]\nsecret_id = \"rsql/blog\"\nworkflows = [\"blog_test_workflow\"]\n\
             [report.audit]\njob_table = \"t\"\nformat = \"legacy\"\n"
        ))
        .unwrap();
        let legacy = config.jobs.legacy.unwrap();
        assert_eq!(
            legacy.instance_code_dir,
            PathBuf::from(crate::legacy::DROP_IN_DIR)
        );
        assert_eq!(legacy.secret_id.as_deref(), Some("rsql/blog"));
        assert!(legacy.applies_to("blog_test_workflow"));
        assert_eq!(config.audit.format, AuditFormat::Legacy);

        for (extra, key) in [
            (
                "[jobs.legacy]\ninstance_code_dirs = \"/x\"\n",
                "instance_code_dirs",
            ),
            (
                "[jobs.legacy]\ninstance_code_dir = \"rel\"\n",
                "jobs.legacy.instance_code_dir",
            ),
            ("[jobs.legacy]\nworkflows = []\n", "jobs.legacy.workflows"),
            ("[report.audit]\nformat = \"old\"\n", "format"),
        ] {
            let err = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = scripts();
        let text = format!(
            "[jobs]\nscript_dir = \"{}\"\nkill_grase = \"3s\"\n",
            dir.path().display()
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("kill_grase"), "{err}");
        assert!(err.contains("agent.toml"), "{err}");
    }

    #[test]
    fn bad_duration_names_key() {
        let dir = scripts();
        let text = format!(
            "[jobs]\nscript_dir = \"{}\"\ndefault_timeout = \"forever\"\n",
            dir.path().display()
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("jobs.default_timeout"), "{err}");
        assert!(err.contains("forever"), "{err}");
    }

    #[test]
    fn world_writable_script_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let text = format!("[jobs]\nscript_dir = \"{}\"\n", dir.path().display());
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("writable by every user"), "{err}");
        assert!(err.contains("chmod o-w"), "{err}");
    }

    #[test]
    fn missing_script_dir_is_refused() {
        let err = parse("[jobs]\nscript_dir = \"/nonexistent/rsql\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("jobs.script_dir"), "{err}");
    }

    #[test]
    fn zero_concurrency_is_refused() {
        let dir = scripts();
        let text = format!(
            "[agent]\nmax_concurrent_jobs = 0\n[jobs]\nscript_dir = \"{}\"\n",
            dir.path().display()
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("agent.max_concurrent_jobs"), "{err}");
    }

    #[test]
    fn password_in_world_readable_file_is_refused() {
        let dir = scripts();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            format!(
                "[jobs]\nscript_dir = \"{}\"\n[database]\nhost = \"h\"\npassword = \"hunter2\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        assert!(err.contains("world-readable"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = Config::load(&file).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
