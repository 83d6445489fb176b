//! What a job attempt amounted to, in the words of the contract (docs/contract.md): the error
//! names, the success output and the failure cause sent to Step Functions.
//!
//! Owns: classifying a supervisor [`Ending`] plus the SQL error found in the job log into an
//! [`Outcome`], and fitting outputs and causes inside the Step Functions size limits by
//! truncating, never by failing.
//!
//! Must not touch: processes, files or AWS. This is pure data, shared by every reporter.

use serde::{Deserialize, Serialize};

use crate::cgroup::Usage;
use crate::joblog::SqlError;
use crate::stop::StopReason;
use crate::supervisor::Ending;

/// `SendTaskFailure.error` is at most this many characters.
pub const MAX_ERROR_CHARS: usize = 256;
/// `SendTaskFailure.cause` is at most this many characters.
pub const MAX_CAUSE_CHARS: usize = 32_768;
/// `SendTaskSuccess.output` is at most this many bytes.
pub const MAX_OUTPUT_BYTES: usize = 262_144;

/// The error names of the contract (docs/contract.md, "The error names"). Workflows `Retry` and `Catch` on these strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorName {
    #[serde(rename = "Rsql.ScriptFailed")]
    ScriptFailed,
    #[serde(rename = "Rsql.ConnectionFailed")]
    ConnectionFailed,
    #[serde(rename = "Rsql.Timeout")]
    Timeout,
    #[serde(rename = "Rsql.Killed")]
    Killed,
    #[serde(rename = "Rsql.Interrupted")]
    Interrupted,
    #[serde(rename = "Rsql.InvalidJob")]
    InvalidJob,
}

impl ErrorName {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorName::ScriptFailed => "Rsql.ScriptFailed",
            ErrorName::ConnectionFailed => "Rsql.ConnectionFailed",
            ErrorName::Timeout => "Rsql.Timeout",
            ErrorName::Killed => "Rsql.Killed",
            ErrorName::Interrupted => "Rsql.Interrupted",
            ErrorName::InvalidJob => "Rsql.InvalidJob",
        }
    }
}

impl std::fmt::Display for ErrorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a job's log can be found; shared by the output and the cause.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLocation {
    pub log_group: Option<String>,
    pub log_stream: Option<String>,
    /// The local file, always present on the instance that ran the job.
    pub log_file: Option<String>,
}

/// `SendTaskSuccess` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuccessOutput {
    pub job_name: String,
    pub workflow_execution_id: String,
    pub status: String,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub instance_id: String,
    pub log_group: Option<String>,
    pub log_stream: Option<String>,
    pub log_file: Option<String>,
    /// CPU time of the whole job, every process it started included, in ms; absent when it
    /// was not measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
    /// Peak memory of the whole job, in MiB; only where the job's cgroup has the memory
    /// controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rss_mb: Option<u32>,
    /// `Some(false)` when the job's log could not be fully written (a full disk); absent
    /// when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_complete: Option<bool>,
}

/// `SendTaskFailure` cause, serialized as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCause {
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub sql_state: Option<String>,
    pub message: String,
    pub stderr_tail: String,
    pub log_group: Option<String>,
    pub log_stream: Option<String>,
    pub log_file: Option<String>,
    /// Why, where the error name alone does not say: `"oom"` for an `Rsql.Killed` job the
    /// OOM killer ended. (A boxed `str` and a `u32` below keep an `Outcome` small enough to
    /// travel by value in the daemon's enums.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Box<str>>,
    /// As in [`SuccessOutput::cpu_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
    /// As in [`SuccessOutput::max_rss_mb`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rss_mb: Option<u32>,
    /// As in [`SuccessOutput::log_complete`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_complete: Option<bool>,
}

/// [`FailureCause::reason`] of a job the OOM killer ended.
pub const REASON_OOM: &str = "oom";

/// A failure as reported to Step Functions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub error: ErrorName,
    pub cause: FailureCause,
}

/// How a job attempt ended, as the reporters see it.
///
/// On disk (the lock state's `outcome`, which a redelivery replays) it is one flat object
/// tagged by `status`: the success output itself for `completed` (its own `status` field is
/// the tag), `{"status":"failed","error":..,"cause":{..}}`, or
/// `{"status":"cancelled","message":..}`. The impls are written by hand because serde's
/// derived internal tag would claim the success output's `status` field and fail to read
/// back every completed outcome it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed(SuccessOutput),
    Failed(Failure),
    /// The task was closed upstream (execution stopped or timed out); nothing is sent back.
    Cancelled {
        message: String,
    },
}

impl Outcome {
    /// The audit's `execution_status` for this outcome.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Completed(_) => "completed",
            Outcome::Failed(_) => "failed",
            Outcome::Cancelled { .. } => "cancelled",
        }
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Outcome::Completed(out) => Some(out.exit_code),
            Outcome::Failed(f) => f.cause.exit_code,
            Outcome::Cancelled { .. } => None,
        }
    }

    /// The job's CPU time in ms, where it was measured (for the audit).
    pub fn cpu_ms(&self) -> Option<u64> {
        match self {
            Outcome::Completed(out) => out.cpu_ms,
            Outcome::Failed(f) => f.cause.cpu_ms,
            Outcome::Cancelled { .. } => None,
        }
    }

    /// The job's peak memory in MiB, where it was measured (for the audit).
    /// `Some(false)` when the job's log is missing lines.
    pub fn log_complete(&self) -> Option<bool> {
        match self {
            Outcome::Completed(out) => out.log_complete,
            Outcome::Failed(f) => f.cause.log_complete,
            Outcome::Cancelled { .. } => None,
        }
    }

    pub fn max_rss_mb(&self) -> Option<u32> {
        match self {
            Outcome::Completed(out) => out.max_rss_mb,
            Outcome::Failed(f) => f.cause.max_rss_mb,
            Outcome::Cancelled { .. } => None,
        }
    }

    /// A one-line description for audit `error_message` and progress output.
    pub fn error_message(&self) -> Option<String> {
        let text = match self {
            Outcome::Completed(_) => None,
            Outcome::Failed(f) => Some(match &f.cause.sql_state {
                Some(state) => format!("{}: [{}] {}", f.error, state, f.cause.message),
                None => format!("{}: {}", f.error, f.cause.message),
            }),
            Outcome::Cancelled { message } => Some(message.clone()),
        };
        text.map(|t| crate::masking::mask(&t).into_owned())
    }
}

const COMPLETED: &str = "completed";
const FAILED: &str = "failed";
const CANCELLED: &str = "cancelled";

/// A tag beside the fields of what it tags.
#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    status: &'static str,
    #[serde(flatten)]
    inner: &'a T,
}

#[derive(Serialize, Deserialize)]
struct CancelledFields {
    message: String,
}

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Outcome::Completed(out) if out.status == COMPLETED => out.serialize(serializer),
            Outcome::Completed(out) => SuccessOutput {
                status: COMPLETED.to_string(),
                ..out.clone()
            }
            .serialize(serializer),
            Outcome::Failed(f) => Tagged {
                status: FAILED,
                inner: f,
            }
            .serialize(serializer),
            Outcome::Cancelled { message } => Tagged {
                status: CANCELLED,
                inner: &CancelledFields {
                    message: message.clone(),
                },
            }
            .serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let status = value
            .get("status")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| D::Error::missing_field("status"))?;
        match status {
            COMPLETED => SuccessOutput::deserialize(value).map(Outcome::Completed),
            FAILED => Failure::deserialize(value).map(Outcome::Failed),
            CANCELLED => CancelledFields::deserialize(value)
                .map(|c| Outcome::Cancelled { message: c.message }),
            other => {
                return Err(D::Error::unknown_variant(
                    other,
                    &[COMPLETED, FAILED, CANCELLED],
                ))
            }
        }
        .map_err(D::Error::custom)
    }
}

/// Everything known about a finished attempt that classification needs.
#[derive(Debug, Clone)]
pub struct Finished<'a> {
    pub job_name: &'a str,
    pub workflow_execution_id: &'a str,
    pub instance_id: &'a str,
    pub ending: &'a Ending,
    pub duration_ms: u64,
    pub timeout_secs: u64,
    pub sql_error: Option<SqlError>,
    pub stderr_tail: String,
    pub log: LogLocation,
    /// What the job used, and whether the OOM killer took part of it (its cgroup).
    pub usage: Usage,
    /// Whether every line of the job reached its log file.
    pub log_complete: bool,
}

/// SQLSTATE class 08 is "connection exception".
fn is_connection_state(state: &str) -> bool {
    state.starts_with("08")
}

/// Clients that fail before a server answers have no SQLSTATE; these phrases are what
/// libpq-style clients (psql, the rsql stand-in, ODBC drivers) print then.
fn is_connection_message(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    [
        "could not connect",
        "connection refused",
        "could not translate host name",
        "connection timed out",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
}

fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

/// The exit code a shell reports for a command that died of SIGKILL (128 + 9).
const SHELL_SAW_SIGKILL: i32 = 128 + libc::SIGKILL;

/// Classifies a finished attempt.
pub fn classify(done: Finished<'_>) -> Outcome {
    let (sql_state, sql_message) = match &done.sql_error {
        Some(e) => (e.sql_state.clone(), Some(e.message.clone())),
        None => (None, None),
    };
    let usage = done.usage;
    let cause = |exit_code: Option<i32>, signal: Option<i32>, message: String| FailureCause {
        exit_code,
        signal: signal.map(signal_name),
        sql_state: sql_state.clone(),
        message,
        stderr_tail: done.stderr_tail.clone(),
        log_group: done.log.log_group.clone(),
        log_stream: done.log.log_stream.clone(),
        log_file: done.log.log_file.clone(),
        reason: None,
        cpu_ms: usage.cpu_ms,
        max_rss_mb: mib(usage.max_rss_mb),
        log_complete: (!done.log_complete).then_some(false),
    };
    if let Some(message) = oom_message(done.ending, &usage) {
        return Outcome::Failed(Failure {
            error: ErrorName::Killed,
            cause: FailureCause {
                reason: Some(REASON_OOM.into()),
                ..cause(done.ending.exit_code(), done.ending.signal(), message)
            },
        });
    }
    match *done.ending {
        Ending::Exited { code: 0 } => Outcome::Completed(success_output(&done)),
        // The script itself exited, but with the code a shell gives when a command it ran
        // died of SIGKILL: rsql under a wrapper script, taken by the OOM killer. That is the
        // retryable Rsql.Killed, not a script failure.
        Ending::Exited {
            code: SHELL_SAW_SIGKILL,
        } => Outcome::Failed(Failure {
            error: ErrorName::Killed,
            cause: cause(
                Some(SHELL_SAW_SIGKILL),
                Some(libc::SIGKILL),
                shell_saw_sigkill_message(&usage),
            ),
        }),
        Ending::Exited { code } => Outcome::Failed(Failure {
            error: script_error(sql_state.as_deref(), sql_message.as_deref()),
            cause: cause(
                Some(code),
                None,
                sql_message
                    .clone()
                    .unwrap_or_else(|| format!("script exited with code {code}")),
            ),
        }),
        Ending::TimedOut { signal } => Outcome::Failed(Failure {
            error: ErrorName::Timeout,
            cause: cause(
                None,
                Some(signal),
                format!(
                    "killed after the {}s timeout (last signal {})",
                    done.timeout_secs,
                    signal_name(signal)
                ),
            ),
        }),
        Ending::Signaled { signal } => Outcome::Failed(Failure {
            error: ErrorName::Killed,
            cause: cause(
                None,
                Some(signal),
                format!(
                    "ended by {} which the agent did not send (OOM killer or an operator?)",
                    signal_name(signal)
                ),
            ),
        }),
        Ending::Stopped {
            reason: StopReason::Interrupted,
            signal,
        } => Outcome::Failed(Failure {
            error: ErrorName::Interrupted,
            cause: cause(
                None,
                signal,
                "the agent shut down while the job ran".to_string(),
            ),
        }),
        Ending::Stopped {
            reason: StopReason::Cancelled,
            ..
        } => Outcome::Cancelled {
            message: "the task was closed upstream; the job was stopped".to_string(),
        },
    }
}

/// The success output of a job that exited 0.
fn success_output(done: &Finished<'_>) -> SuccessOutput {
    SuccessOutput {
        job_name: done.job_name.to_string(),
        workflow_execution_id: done.workflow_execution_id.to_string(),
        status: COMPLETED.to_string(),
        exit_code: 0,
        duration_ms: done.duration_ms,
        instance_id: done.instance_id.to_string(),
        log_group: done.log.log_group.clone(),
        log_stream: done.log.log_stream.clone(),
        log_file: done.log.log_file.clone(),
        cpu_ms: done.usage.cpu_ms,
        max_rss_mb: mib(done.usage.max_rss_mb),
        log_complete: (!done.log_complete).then_some(false),
    }
}

/// The error of a script that exited non-zero: a failed connection (by its SQLSTATE or
/// message, retryable) or a failure of the script itself.
fn script_error(sql_state: Option<&str>, sql_message: Option<&str>) -> ErrorName {
    if sql_state.is_some_and(is_connection_state) || sql_message.is_some_and(is_connection_message)
    {
        ErrorName::ConnectionFailed
    } else {
        ErrorName::ScriptFailed
    }
}

/// Why a script exited with 137 although nobody the agent knows of sent SIGKILL.
fn shell_saw_sigkill_message(usage: &Usage) -> String {
    if usage.max_rss_mb.is_some() {
        // The memory controller watched the job and counted no OOM kill.
        format!("script exited with code {SHELL_SAW_SIGKILL}: a command it ran was killed by SIGKILL, which neither the agent nor the OOM killer sent")
    } else {
        format!("script exited with code {SHELL_SAW_SIGKILL}: a command it ran was killed by SIGKILL, which the agent did not send (the OOM killer? see journalctl -k)")
    }
}

/// The message of a job the OOM killer ended, or `None` when it did not. Its cgroup's
/// `memory.events` counted a kill and the job failed because of it: it died of a signal, or
/// exited non-zero (a shell whose command was killed). A job that completed anyway, or that
/// the agent itself was ending (timeout, stop), is what it is.
fn oom_message(ending: &Ending, usage: &Usage) -> Option<String> {
    let failed = matches!(ending, Ending::Signaled { .. })
        || matches!(ending, Ending::Exited { code } if *code != 0);
    if usage.oom_kills == 0 || !failed {
        return None;
    }
    let kills = usage.oom_kills;
    let peak = usage
        .max_rss_mb
        .map(|mb| format!(" (peak {mb} MiB)"))
        .unwrap_or_default();
    Some(match usage.memory_max {
        Some(max) => format!(
            "killed by the OOM killer: the job reached its memory limit of {} (memory.max, \
             from [jobs] memory_max or the message's memory_max_mb){peak}; {kills} process(es) \
             killed",
            format_bytes(max)
        ),
        None => format!(
            "killed by the OOM killer: the job has no memory limit of its own, so the host (or \
             an enclosing cgroup's limit) ran out of memory{peak}; {kills} process(es) killed"
        ),
    })
}

/// MiB as reported: 4 PiB would not fit, and no host has that.
fn mib(value: Option<u64>) -> Option<u32> {
    value.map(|mb| u32::try_from(mb).unwrap_or(u32::MAX))
}

/// Bytes for people: whole MiB or GiB where exact, else MiB with a fraction.
fn format_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;
    if bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes ({:.1} MiB)", bytes as f64 / MIB as f64)
    }
}

/// Truncates `text` to at most `max` characters, on a character boundary, marking the cut.
pub fn truncate_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    const MARK: &str = "…[truncated]";
    let keep = max.saturating_sub(MARK.chars().count());
    let mut out: String = text.chars().take(keep).collect();
    out.push_str(MARK);
    out
}

/// Keeps the end of `text` (the most recent output), at most `max` characters.
fn keep_tail(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_string();
    }
    const MARK: &str = "[truncated]…";
    let keep = max.saturating_sub(MARK.chars().count());
    let mut out = MARK.to_string();
    out.extend(text.chars().skip(count - keep));
    out
}

impl Failure {
    /// The `error` field, within the limit.
    pub fn error_field(&self) -> String {
        truncate_chars(self.error.as_str(), MAX_ERROR_CHARS)
    }

    /// The `cause` JSON, always valid JSON and within [`MAX_CAUSE_CHARS`]: the stderr tail
    /// shrinks first, then the message.
    pub fn cause_json(&self) -> String {
        let masked = mask_cause(&self.cause);
        let this = Failure {
            error: self.error,
            cause: masked,
        };
        this.cause_json_unmasked()
    }

    fn cause_json_unmasked(&self) -> String {
        let mut cause = self.cause.clone();
        let fits = |c: &FailureCause| {
            let json = serde_json::to_string(c).unwrap_or_default();
            (json.chars().count() <= MAX_CAUSE_CHARS).then_some(json)
        };
        if let Some(json) = fits(&cause) {
            return json;
        }
        let mut budget = cause.stderr_tail.chars().count();
        while budget > 0 {
            budget /= 2;
            cause.stderr_tail = keep_tail(&self.cause.stderr_tail, budget);
            if let Some(json) = fits(&cause) {
                return json;
            }
        }
        cause.stderr_tail.clear();
        let mut budget = cause.message.chars().count();
        loop {
            budget /= 2;
            cause.message = truncate_chars(&self.cause.message, budget);
            if let Some(json) = fits(&cause) {
                return json;
            }
            if budget == 0 {
                // Only the small fixed fields are left; they always fit.
                return serde_json::to_string(&cause).unwrap_or_else(|_| "{}".to_string());
            }
        }
    }
}

impl SuccessOutput {
    /// The output JSON, within [`MAX_OUTPUT_BYTES`]. The contract fields are short, so this
    /// only bites on absurd ids; it never fails.
    pub fn output_json(&self) -> String {
        // Masked value by value, never as serialized text: a secret with a quote or a
        // backslash in it must not cut across JSON's escaping.
        let masked = |out: &SuccessOutput| {
            let mut value = serde_json::to_value(out).unwrap_or_default();
            crate::masking::mask_json(&mut value);
            serde_json::to_string(&value).unwrap_or_else(|_| "{}".to_string())
        };
        let json = masked(self);
        if json.len() <= MAX_OUTPUT_BYTES {
            return json;
        }
        let mut out = self.clone();
        out.job_name = truncate_chars(&out.job_name, 1024);
        out.workflow_execution_id = truncate_chars(&out.workflow_execution_id, 1024);
        out.log_stream = out.log_stream.map(|s| truncate_chars(&s, 1024));
        out.log_file = out.log_file.map(|s| truncate_chars(&s, 1024));
        masked(&out)
    }
}

/// `cause` with every secret the process knows written as `***` (see `secrets::mask`).
fn mask_cause(cause: &FailureCause) -> FailureCause {
    let mut value = serde_json::to_value(cause).unwrap_or_default();
    crate::masking::mask_json(&mut value);
    serde_json::from_value(value).unwrap_or_else(|_| cause.clone())
}

impl Outcome {
    /// This outcome with every secret the process knows written as `***`: the one form that
    /// leaves the process (callbacks, audit, lock state).
    pub fn masked(&self) -> Outcome {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        crate::masking::mask_json(&mut value);
        serde_json::from_value(value).unwrap_or_else(|_| self.clone())
    }
}

#[cfg(test)]
mod tests;
