//! The agent's configuration: the TOML file, its defaults, and its validation.
//!
//! Owns: parsing `agent.toml` (unknown keys are errors that name the key), turning it into a
//! validated [`Config`] (durations parsed, paths checked, numbers sane), and the defaults
//! used when no file exists (a per-user directory, so a newcomer can run a workflow at once).
//!
//! Must not touch: AWS clients, the network, or any job. `check-config` runs exactly this
//! code and nothing else, so systemd's `ExecStartPre` can call it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::lock::OnInterrupted;
use crate::secrets::DatabaseSettings;

mod fleet;
pub use fleet::{FleetMode, FleetSettings};

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rsql-agent/agent.toml";

/// The longest `default_timeout` / job timeout we accept. Step Functions itself closes a task
/// after at most a year; a week of RSQL is already a runaway job.
pub const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

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
    agent: RawAgent,
    #[serde(default)]
    jobs: RawJobs,
    #[serde(default)]
    intake: RawIntake,
    #[serde(default)]
    lock: RawLock,
    #[serde(default)]
    logs: RawLogs,
    #[serde(default)]
    report: RawReport,
    database: Option<RawDatabase>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    fleet: fleet::RawFleet,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    namespace: Option<String>,
    fleet: Option<String>,
    interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<PathBuf>,
    max_concurrent_jobs: Option<i64>,
    instance_id: Option<String>,
    /// No longer used (SIGTERM hands running jobs to their owners, it does not wait for
    /// them); accepted with any value so that old configs keep working, and warned about.
    shutdown_grace: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobs {
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntake {
    sqs: Option<RawSqs>,
    socket: Option<RawSocket>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSqs {
    queue_url: String,
    wait_time: Option<String>,
    visibility_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSocket {
    path: Option<PathBuf>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
    #[serde(default)]
    allowed_groups: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLock {
    dir: Option<PathBuf>,
    retention: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogs {
    cloudwatch: Option<RawCloudWatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloudWatch {
    log_group: String,
    #[serde(default)]
    create_group: bool,
    flush_interval: Option<String>,
    final_flush_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReport {
    audit: Option<RawAudit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    job_table: Option<String>,
    workflow_table: Option<String>,
    format: Option<AuditFormat>,
}

/// `[report.audit] format`: which values the DynamoDB job audit item carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    /// `execution_status` `running|completed|failed|cancelled`, ISO 8601 UTC timestamps.
    #[default]
    Standard,
    /// The replaced framework's values, for dashboards written against its table:
    /// `triggered|successful|failed` and `%m-%d-%y-%H-%M-%S` (UTC) timestamps.
    Legacy,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    dbname: Option<String>,
    password: Option<String>,
    secret_id: Option<String>,
    secret_ttl: Option<String>,
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

/// `[metrics]`: CloudWatch embedded-metric records written to the job log group (so only
/// when `[logs.cloudwatch]` is set).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSettings {
    pub enabled: bool,
    /// The CloudWatch namespace.
    pub namespace: String,
    /// The `Fleet` dimension of every metric.
    pub fleet: String,
    /// How often `RunningJobs`, `FreeSlots` and `OutboxDepth` are written.
    pub interval: Duration,
}

impl Default for MetricsSettings {
    fn default() -> MetricsSettings {
        MetricsSettings {
            enabled: true,
            namespace: "RsqlAgent".into(),
            fleet: "rsql-agent".into(),
            interval: Duration::from_secs(60),
        }
    }
}

impl MetricsSettings {
    fn from_raw(raw: RawMetrics) -> Result<MetricsSettings, KeyError> {
        let defaults = MetricsSettings::default();
        let name = |key: &'static str, value: Option<String>, default: String, max: usize| {
            let value = value.unwrap_or(default);
            if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
                Err((
                    key,
                    format!("must be 1 to {max} printable characters (a CloudWatch limit), got {value:?}"),
                ))
            } else {
                Ok(value)
            }
        };
        let interval = match raw.interval {
            None => defaults.interval,
            Some(text) => parse_duration(&text).map_err(|r| ("metrics.interval", r))?,
        };
        if interval < Duration::from_secs(10) || interval > Duration::from_secs(3600) {
            return Err((
                "metrics.interval",
                "must be between 10s and 1h: CloudWatch keeps one-minute points, and an alarm on OutboxDepth needs a point at least every few minutes".into(),
            ));
        }
        Ok(MetricsSettings {
            enabled: raw.enabled.unwrap_or(defaults.enabled),
            namespace: name("metrics.namespace", raw.namespace, defaults.namespace, 255)?,
            fleet: name("metrics.fleet", raw.fleet, defaults.fleet, 1024)?,
            interval,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentSettings {
    pub state_dir: PathBuf,
    pub max_concurrent_jobs: usize,
    /// Overrides the instance id that would otherwise come from IMDS.
    pub instance_id: Option<String>,
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

#[derive(Debug, Clone, PartialEq)]
pub struct SqsSettings {
    pub queue_url: String,
    pub wait_time: Duration,
    pub visibility_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SocketSettings {
    pub path: PathBuf,
    pub allowed_uids: Vec<u32>,
    pub allowed_groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LockSettings {
    pub dir: PathBuf,
    pub retention: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CloudWatchSettings {
    pub log_group: String,
    pub create_group: bool,
    pub flush_interval: Duration,
    pub final_flush_timeout: Duration,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditSettings {
    pub job_table: Option<String>,
    pub workflow_table: Option<String>,
    pub format: AuditFormat,
}

const DEFAULT_SECRET_TTL: Duration = Duration::from_secs(300);

/// A config key and what is wrong with its value; [`Config`] adds the file.
type KeyError = (&'static str, String);

/// `value` read as a duration, or `default` when the key is absent.
fn duration_or(
    key: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, KeyError> {
    match value {
        None => Ok(default),
        Some(text) => parse_duration(&text).map_err(|reason| (key, reason)),
    }
}

/// `value` as a positive whole number, or `default` when the key is absent.
fn positive_or(key: &'static str, value: Option<i64>, default: u64) -> Result<u64, KeyError> {
    match value {
        None => Ok(default),
        Some(n) if n > 0 => Ok(n as u64),
        Some(n) => Err((key, format!("must be a positive whole number, got {n}"))),
    }
}

/// What `check-config` and the daemon say about `[agent] shutdown_grace`.
pub const SHUTDOWN_GRACE_UNUSED: &str = "agent.shutdown_grace is no longer used and is \
     ignored: on SIGTERM the agent hands its running jobs to their owner processes and stops \
     without waiting for them (they go on, and the next start adopts them); remove the \
     key";

/// The state directory of a system-wide agent.
const SYSTEM_STATE_DIR: &str = "/var/lib/rsql-agent";

impl Default for AgentSettings {
    /// A system-wide agent's settings.
    fn default() -> AgentSettings {
        AgentSettings {
            state_dir: PathBuf::from(SYSTEM_STATE_DIR),
            max_concurrent_jobs: 4,
            instance_id: None,
        }
    }
}

impl AgentSettings {
    fn from_raw(raw: RawAgent, per_user: bool) -> Result<AgentSettings, KeyError> {
        let defaults = AgentSettings::default();
        let state_dir = match raw.state_dir {
            Some(dir) => dir,
            None if per_user => per_user_state_dir(),
            None => defaults.state_dir,
        };
        Ok(AgentSettings {
            state_dir,
            max_concurrent_jobs: positive_or(
                "agent.max_concurrent_jobs",
                raw.max_concurrent_jobs,
                defaults.max_concurrent_jobs as u64,
            )? as usize,
            instance_id: raw.instance_id,
        })
    }
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

impl JobSettings {
    /// `script_dir` is the one named on the command line, used when the file names none.
    fn from_raw(
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
                Some(text) => {
                    Some(parse_size(&text).map_err(|reason| ("jobs.memory_max", reason))?)
                }
            },
            legacy: raw.legacy.map(|l| crate::legacy::LegacySettings {
                instance_code_dir: l
                    .instance_code_dir
                    .unwrap_or_else(|| PathBuf::from(crate::legacy::DROP_IN_DIR)),
                secret_id: l.secret_id,
                workflows: l.workflows,
            }),
        })
    }
}

impl Default for SqsSettings {
    /// Everything but the queue, which the file must name.
    fn default() -> SqsSettings {
        SqsSettings {
            queue_url: String::new(),
            wait_time: Duration::from_secs(20),
            visibility_timeout: Duration::from_secs(120),
        }
    }
}

impl SqsSettings {
    fn from_raw(raw: RawSqs) -> Result<SqsSettings, KeyError> {
        let defaults = SqsSettings::default();
        Ok(SqsSettings {
            queue_url: raw.queue_url,
            wait_time: duration_or("intake.sqs.wait_time", raw.wait_time, defaults.wait_time)?,
            visibility_timeout: duration_or(
                "intake.sqs.visibility_timeout",
                raw.visibility_timeout,
                defaults.visibility_timeout,
            )?,
        })
    }
}

impl Default for SocketSettings {
    fn default() -> SocketSettings {
        SocketSettings {
            path: PathBuf::from("/run/rsql-agent/agent.sock"),
            allowed_uids: Vec::new(),
            allowed_groups: Vec::new(),
        }
    }
}

impl SocketSettings {
    fn from_raw(raw: RawSocket) -> SocketSettings {
        SocketSettings {
            path: raw.path.unwrap_or_else(|| SocketSettings::default().path),
            allowed_uids: raw.allowed_uids,
            allowed_groups: raw.allowed_groups,
        }
    }
}

impl Default for LockSettings {
    /// A system-wide agent's settings; the lock directory follows `agent.state_dir`.
    fn default() -> LockSettings {
        LockSettings {
            dir: Path::new(SYSTEM_STATE_DIR).join("locks"),
            retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl LockSettings {
    fn from_raw(raw: RawLock, state_dir: &Path) -> Result<LockSettings, KeyError> {
        Ok(LockSettings {
            dir: raw.dir.unwrap_or_else(|| state_dir.join("locks")),
            retention: duration_or(
                "lock.retention",
                raw.retention,
                LockSettings::default().retention,
            )?,
        })
    }
}

impl Default for CloudWatchSettings {
    /// Everything but the log group, which the file must name.
    fn default() -> CloudWatchSettings {
        CloudWatchSettings {
            log_group: String::new(),
            create_group: false,
            flush_interval: Duration::from_secs(1),
            final_flush_timeout: Duration::from_secs(10),
        }
    }
}

impl CloudWatchSettings {
    fn from_raw(raw: RawCloudWatch) -> Result<CloudWatchSettings, KeyError> {
        let defaults = CloudWatchSettings::default();
        Ok(CloudWatchSettings {
            log_group: raw.log_group,
            create_group: raw.create_group,
            flush_interval: duration_or(
                "logs.cloudwatch.flush_interval",
                raw.flush_interval,
                defaults.flush_interval,
            )?,
            final_flush_timeout: duration_or(
                "logs.cloudwatch.final_flush_timeout",
                raw.final_flush_timeout,
                defaults.final_flush_timeout,
            )?,
        })
    }
}

impl AuditSettings {
    fn from_raw(raw: RawAudit) -> AuditSettings {
        AuditSettings {
            job_table: raw.job_table,
            workflow_table: raw.workflow_table,
            format: raw.format.unwrap_or_default(),
        }
    }
}

impl DatabaseSettings {
    /// Settings taken from the agent's own `RSQL_*`/`RSPASSWORD` environment; used when the
    /// config has no `[database]` table, so a workflow can run with no config file at all.
    fn from_process_env() -> DatabaseSettings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(password) = var("RSPASSWORD") {
            crate::secrets::remember(&password);
        }
        DatabaseSettings {
            host: var("RSQL_HOST"),
            port: var("RSQL_PORT").and_then(|p| p.parse().ok()),
            user: var("RSQL_USER"),
            dbname: var("RSQL_DB"),
            password: var("RSPASSWORD"),
            secret_id: None,
            secret_ttl: DEFAULT_SECRET_TTL,
        }
    }

    fn from_raw(raw: RawDatabase) -> Result<DatabaseSettings, KeyError> {
        Ok(DatabaseSettings {
            host: raw.host,
            port: raw.port,
            user: raw.user,
            dbname: raw.dbname,
            password: raw.password,
            secret_id: raw.secret_id,
            secret_ttl: duration_or("database.secret_ttl", raw.secret_ttl, DEFAULT_SECRET_TTL)?,
        })
    }
}

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
        let mut jobs = JobSettings::from_raw(raw.jobs, script_dir, &agent.state_dir, per_user)
            .map_err(invalid)?;
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

    /// Checks what the types cannot: the script directory exists and is safe, and the
    /// numbers are sane.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: self.source.clone().unwrap_or_default(),
            key,
            reason,
        };
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
        if self.agent.max_concurrent_jobs > 256 {
            return Err(invalid(
                "agent.max_concurrent_jobs",
                format!("{} is more than 256", self.agent.max_concurrent_jobs),
            ));
        }
        if self.jobs.default_timeout.is_zero() || self.jobs.default_timeout > MAX_JOB_TIMEOUT {
            return Err(invalid(
                "jobs.default_timeout",
                format!(
                    "must be between 1s and {}, got {}",
                    humantime::format_duration(MAX_JOB_TIMEOUT),
                    humantime::format_duration(self.jobs.default_timeout)
                ),
            ));
        }
        if let Some(sqs) = &self.sqs {
            if !(sqs.queue_url.starts_with("https://") || sqs.queue_url.starts_with("http://")) {
                return Err(invalid(
                    "intake.sqs.queue_url",
                    format!("{:?} is not a queue URL", sqs.queue_url),
                ));
            }
            if sqs.wait_time > Duration::from_secs(20) {
                return Err(invalid(
                    "intake.sqs.wait_time",
                    "SQS long polls for at most 20s".to_string(),
                ));
            }
            if sqs.visibility_timeout < Duration::from_secs(10)
                || sqs.visibility_timeout > Duration::from_secs(12 * 3600)
            {
                return Err(invalid(
                    "intake.sqs.visibility_timeout",
                    "must be between 10s and 12h".to_string(),
                ));
            }
        }
        if let Some(cw) = &self.cloudwatch {
            if cw.log_group.is_empty() || cw.log_group.len() > 512 {
                return Err(invalid(
                    "logs.cloudwatch.log_group",
                    "must be 1 to 512 characters".to_string(),
                ));
            }
            if cw.flush_interval.is_zero() {
                return Err(invalid(
                    "logs.cloudwatch.flush_interval",
                    "must be more than 0s".to_string(),
                ));
            }
        }
        if let Some(legacy) = &self.jobs.legacy {
            if !legacy.instance_code_dir.is_absolute() {
                return Err(invalid(
                    "jobs.legacy.instance_code_dir",
                    format!(
                        "{} must be an absolute path",
                        legacy.instance_code_dir.display()
                    ),
                ));
            }
            if let Some(list) = &legacy.workflows {
                if list.is_empty() || list.iter().any(|w| w.trim().is_empty()) {
                    return Err(invalid(
                        "jobs.legacy.workflows",
                        "must list workflow ids (leave it out for every workflow)".to_string(),
                    ));
                }
            }
        }
        if self.database.password.is_some() && self.database.secret_id.is_some() {
            return Err(invalid(
                "database.password",
                "give either password or secret_id, not both".to_string(),
            ));
        }
        Ok(())
    }

    /// Every path is absolute; the scripts, their directories and the interpreter can be
    /// changed by nobody but root and the agent's user; the log and state directories are on
    /// a writable, real filesystem.
    fn check_paths(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: self.source.clone().unwrap_or_default(),
            key,
            reason,
        };
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
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: self.source.clone().unwrap_or_default(),
            key,
            reason,
        };
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
    fn check_secret_file_mode(&self, path: &Path) -> Result<(), ConfigError> {
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

/// `dir`, or its nearest existing ancestor (the agent creates the rest), is on a writable,
/// real filesystem.
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

/// `$XDG_STATE_HOME/rsql-agent`, else `~/.local/state/rsql-agent`, else a temp dir.
fn per_user_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("rsql-agent");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/rsql-agent");
    }
    std::env::temp_dir().join("rsql-agent")
}

/// The smallest `memory_max` accepted: below this not even bash and rsql start.
pub const MIN_MEMORY_MAX: u64 = 16 * 1024 * 1024;

/// Parses a memory size as systemd writes one: bytes, or a whole number with `K`, `M`, `G`
/// or `T` (powers of 1024), at least [`MIN_MEMORY_MAX`].
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => trimmed.split_at(at),
        None => (trimmed, ""),
    };
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?} is not a size like \"512M\" or \"4G\"")),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{text:?} is not a size like \"512M\" or \"4G\""))?;
    if bytes < MIN_MEMORY_MAX {
        return Err(format!("{text:?} is less than 16M"));
    }
    Ok(bytes)
}

/// Parses human-readable durations such as `30s`, `6h` or `1h 30m`.
///
/// Durations are read as strings and parsed here rather than through `humantime-serde`: the
/// parsing is the same `humantime`, but here a bad value becomes [`ConfigError::Invalid`]
/// naming the key (`jobs.kill_grace: "5 parsecs" is not a duration like "30s" ...`), where a
/// serde error would only point at a line and column of the TOML.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like \"30s\" or \"6h\": {e}"))
}

#[cfg(test)]
mod tests {
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
