//! The job message contract: parsing and validating one job, from any intake.
//!
//! Owns: the JSON job message format of docs/contract.md, "The job message" (with the legacy
//! aliases `token` and `script`), every rule that makes a message runnable (sizes, types,
//! script path confinement), and recovering the task token from a message that is otherwise
//! unusable, so that even a broken message gets its `Rsql.InvalidJob` callback.
//!
//! Must not touch: processes, locks, AWS. A [`JobSpec`] is plain data; the intakes decide
//! what to do with it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::legacy::LegacySettings;

/// The longest `default_timeout` / job timeout accepted. Step Functions itself closes a task
/// after at most a year; a week of RSQL is already a runaway job.
pub const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The smallest `memory_max` accepted (in the config or a job): below this not even bash
/// and rsql start.
pub const MIN_MEMORY_MAX: u64 = 16 * 1024 * 1024;

/// Largest message body accepted (the SQS maximum).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Step Functions task tokens are at most this long.
pub const MAX_TOKEN_LEN: usize = 2048;
/// Identifiers end up in file names, DynamoDB keys and log stream names.
pub const MAX_ID_LEN: usize = 256;
const MAX_ARGS: usize = 256;
const MAX_ARG_LEN: usize = 32 * 1024;

/// A job that passed validation, with its script resolved inside `script_dir`.
#[derive(Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// The Step Functions task token; `None` only for local workflow runs.
    pub task_token: Option<String>,
    pub workflow_id: String,
    pub workflow_execution_id: String,
    /// As given in the message, relative to `script_dir`.
    pub job_name: String,
    /// The canonical path of the script, known to lie inside `script_dir`.
    pub script: PathBuf,
    pub args: Vec<String>,
    pub timeout: Duration,
    pub heartbeat: Option<Duration>,
    /// The fleet-wide lock key: the message's `lock_key`, or `workflow_execution_id/job_name`.
    pub lock_key: String,
    /// Set when the job arrived through SSM Run Command.
    pub ssm_command_id: Option<String>,
    /// The message's `memory_max_mb`, in bytes: a lower memory limit than `[jobs]
    /// memory_max` for this job (a higher one is cut to the configured limit).
    pub memory_max: Option<u64>,
    /// The message's `legacy_args`: `[instance_code_dir, secret_id]`, the script's `$1` and
    /// `$2` before `args`, as the replaced framework's trigger gave them (see
    /// [`crate::legacy`]).
    pub legacy_args: Option<[String; 2]>,
}

// Hand-written: the full task token is a secret that must not reach a log.
impl std::fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSpec")
            .field(
                "task_token",
                &self.task_token.as_deref().map(crate::lock::token_hash),
            )
            .field("workflow_id", &self.workflow_id)
            .field("workflow_execution_id", &self.workflow_execution_id)
            .field("job_name", &self.job_name)
            .field("script", &self.script)
            .field("args", &self.args)
            .field("timeout", &self.timeout)
            .field("heartbeat", &self.heartbeat)
            .field("lock_key", &self.lock_key)
            .field("ssm_command_id", &self.ssm_command_id)
            .field("memory_max", &self.memory_max)
            .field("legacy_args", &self.legacy_args)
            .finish()
    }
}

/// What the validation needs to know about its surroundings.
#[derive(Debug, Clone)]
pub struct JobRules<'a> {
    pub script_dir: &'a Path,
    pub default_timeout: Duration,
    /// SQS and socket jobs must carry a token; local workflow jobs have none.
    pub require_token: bool,
}

/// Why a message cannot be run. Each maps to `Rsql.InvalidJob`.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("message is {size} bytes, more than the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("message is not valid JSON: {0}")]
    BadJson(#[source] serde_json::Error),
    #[error("message must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` must be {expected}, got {got}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        got: &'static str,
    },
    #[error("field `{field}`: {reason}")]
    BadValue { field: &'static str, reason: String },
    #[error("unknown field `{0}` (known fields: task_token, workflow_id, workflow_execution_id, job_name, args, timeout_seconds, heartbeat_seconds, lock_key, ssm_command_id, memory_max_mb, legacy_args)")]
    UnknownField(String),
    #[error("fields `{0}` and `{1}` are aliases; give only one")]
    Duplicate(&'static str, &'static str),
    #[error(
        "job_name {job_name:?} is an absolute path; give a path relative to the script directory"
    )]
    AbsolutePath { job_name: String },
    #[error(
        "job_name {job_name:?} resolves to {resolved}, outside the script directory {script_dir}"
    )]
    PathEscape {
        job_name: String,
        resolved: PathBuf,
        script_dir: PathBuf,
    },
    #[error("job_name {job_name:?}: no such script in {script_dir}")]
    UnknownScript {
        job_name: String,
        script_dir: PathBuf,
    },
    #[error("job_name {job_name:?} is not a regular file")]
    NotAFile { job_name: String },
    #[error(
        "job_name {job_name:?}: line {line} ends in CRLF: {}",
        crate::legacy::CRLF_HELP
    )]
    CrlfLineEndings { job_name: String, line: usize },
    #[error("job_name {job_name:?} is not safe to run: {problem}")]
    Untrusted {
        job_name: String,
        problem: crate::trust::Untrusted,
    },
    #[error("script directory {script_dir} cannot be resolved: {source}")]
    ScriptDir {
        script_dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A rejected message, with whatever token could be recovered from it so the caller can
/// still send `Rsql.InvalidJob` and no workflow waits forever.
#[derive(thiserror::Error)]
#[error("{error}")]
pub struct InvalidJob {
    pub task_token: Option<String>,
    #[source]
    pub error: JobError,
}

impl std::fmt::Debug for InvalidJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidJob")
            .field(
                "task_token",
                &self.task_token.as_deref().map(crate::lock::token_hash),
            )
            .field("error", &self.error)
            .finish()
    }
}

const KNOWN_FIELDS: &[&str] = &[
    "task_token",
    "token",
    "workflow_id",
    "workflow_execution_id",
    "job_name",
    "script",
    "args",
    "timeout_seconds",
    "heartbeat_seconds",
    "lock_key",
    "ssm_command_id",
    "memory_max_mb",
    "legacy_args",
];

impl JobSpec {
    /// Parses and validates a message body.
    pub fn parse(body: &[u8], rules: &JobRules<'_>) -> Result<JobSpec, InvalidJob> {
        // The token is recovered first, from whatever is there, so that every later
        // rejection can still be reported to Step Functions.
        let scavenged = scavenge_token(body);
        let fail = |error: JobError, token: Option<String>| InvalidJob {
            task_token: token,
            error,
        };
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(fail(
                JobError::TooLarge {
                    size: body.len(),
                    limit: MAX_MESSAGE_BYTES,
                },
                scavenged,
            ));
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| fail(JobError::BadJson(e), scavenged.clone()))?;
        let Value::Object(map) = value else {
            return Err(fail(JobError::NotAnObject(kind(&value)), scavenged));
        };
        let token = match aliased_string(&map, "task_token", "token") {
            Ok(token) => token,
            Err(e) => return Err(fail(e, scavenged)),
        };
        Self::from_map(&map, token.clone(), rules).map_err(|error| fail(error, token))
    }

    /// Builds a spec for a job that did not come as a message (the local workflow runner).
    pub fn local(
        workflow_id: &str,
        workflow_execution_id: &str,
        job_name: &str,
        rules: &JobRules<'_>,
    ) -> Result<JobSpec, InvalidJob> {
        let mut map = Map::new();
        map.insert("workflow_id".into(), workflow_id.into());
        map.insert("workflow_execution_id".into(), workflow_execution_id.into());
        map.insert("job_name".into(), job_name.into());
        Self::from_map(&map, None, rules).map_err(|error| InvalidJob {
            task_token: None,
            error,
        })
    }

    fn from_map(
        map: &Map<String, Value>,
        task_token: Option<String>,
        rules: &JobRules<'_>,
    ) -> Result<JobSpec, JobError> {
        if let Some(unknown) = map.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
            return Err(JobError::UnknownField(unknown.clone()));
        }
        match &task_token {
            None if rules.require_token => return Err(JobError::Missing("task_token")),
            Some(token) => check_token(token)?,
            None => {}
        }
        let workflow_id = required_id(map, "workflow_id")?;
        let workflow_execution_id = required_id(map, "workflow_execution_id")?;
        let job_name =
            aliased_string(map, "job_name", "script")?.ok_or(JobError::Missing("job_name"))?;
        check_text("job_name", &job_name, MAX_ID_LEN)?;
        let script = resolve_script(rules.script_dir, &job_name)?;
        check_line_endings(&script, &job_name)?;

        let args = match map.get("args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                if items.len() > MAX_ARGS {
                    return Err(JobError::BadValue {
                        field: "args",
                        reason: format!("{} arguments, more than {MAX_ARGS}", items.len()),
                    });
                }
                let mut args = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let Value::String(arg) = item else {
                        return Err(JobError::BadValue {
                            field: "args",
                            reason: format!("element {i} must be a string, got {}", kind(item)),
                        });
                    };
                    check_text("args", arg, MAX_ARG_LEN)?;
                    args.push(arg.clone());
                }
                args
            }
            Some(other) => {
                return Err(JobError::WrongType {
                    field: "args",
                    expected: "an array of strings",
                    got: kind(other),
                })
            }
        };

        let timeout = seconds(map, "timeout_seconds")?.unwrap_or(rules.default_timeout);
        if timeout > MAX_JOB_TIMEOUT {
            return Err(JobError::BadValue {
                field: "timeout_seconds",
                reason: format!(
                    "{}s is more than the {}s maximum",
                    timeout.as_secs(),
                    MAX_JOB_TIMEOUT.as_secs()
                ),
            });
        }
        let heartbeat = seconds(map, "heartbeat_seconds")?;
        let lock_key = match optional_string(map, "lock_key")? {
            Some(key) => {
                check_text("lock_key", &key, 1024)?;
                key
            }
            None => format!("{workflow_execution_id}/{job_name}"),
        };
        let ssm_command_id = optional_string(map, "ssm_command_id")?;
        if let Some(id) = &ssm_command_id {
            check_text("ssm_command_id", id, MAX_ID_LEN)?;
        }
        let memory_max = memory_mb(map, "memory_max_mb")?;
        let legacy_args = legacy_args(map)?;
        Ok(JobSpec {
            task_token,
            workflow_id,
            workflow_execution_id,
            job_name,
            script,
            args,
            timeout,
            heartbeat,
            lock_key,
            ssm_command_id,
            memory_max,
            legacy_args,
        })
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), JobError> {
    if text.contains('\0') {
        return Err(JobError::BadValue {
            field,
            reason: "contains a NUL byte".to_string(),
        });
    }
    if text.len() > max {
        return Err(JobError::BadValue {
            field,
            reason: format!("{} bytes, more than {max}", text.len()),
        });
    }
    Ok(())
}

fn check_token(token: &str) -> Result<(), JobError> {
    if token.is_empty() {
        return Err(JobError::BadValue {
            field: "task_token",
            reason: "is empty".to_string(),
        });
    }
    check_text("task_token", token, MAX_TOKEN_LEN)
}

fn optional_string(
    map: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, JobError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(JobError::WrongType {
            field,
            expected: "a string",
            got: kind(other),
        }),
    }
}

fn aliased_string(
    map: &Map<String, Value>,
    name: &'static str,
    alias: &'static str,
) -> Result<Option<String>, JobError> {
    match (optional_string(map, name)?, optional_string(map, alias)?) {
        (Some(_), Some(_)) => Err(JobError::Duplicate(name, alias)),
        (a, b) => Ok(a.or(b)),
    }
}

fn required_id(map: &Map<String, Value>, field: &'static str) -> Result<String, JobError> {
    let value = optional_string(map, field)?.ok_or(JobError::Missing(field))?;
    if value.trim().is_empty() {
        return Err(JobError::BadValue {
            field,
            reason: "is empty".to_string(),
        });
    }
    check_text(field, &value, MAX_ID_LEN)?;
    Ok(value)
}

/// `legacy_args`: exactly two strings, `[instance_code_dir, secret_id]`.
fn legacy_args(map: &Map<String, Value>) -> Result<Option<[String; 2]>, JobError> {
    const FIELD: &str = "legacy_args";
    let items = match map.get(FIELD) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(JobError::WrongType {
                field: FIELD,
                expected: "an array of two strings [instance_code_dir, secret_id]",
                got: kind(other),
            })
        }
    };
    match items.as_slice() {
        [Value::String(code_dir), Value::String(secret)] => {
            check_text(FIELD, code_dir, MAX_ARG_LEN)?;
            check_text(FIELD, secret, MAX_ARG_LEN)?;
            check_code_dir(code_dir)?;
            Ok(Some([code_dir.clone(), secret.clone()]))
        }
        _ => Err(JobError::BadValue {
            field: FIELD,
            reason: format!(
                "must be two strings [instance_code_dir, secret_id], got {} element(s)",
                items.len()
            ),
        }),
    }
}

/// A script with CRLF line endings fails under any shell in ways nobody can read; refuse it
/// up front with the reason. Only the first MiB is read: a script is text, and a longer one
/// with CRLF in its head is found all the same.
fn check_line_endings(script: &Path, job_name: &str) -> Result<(), JobError> {
    use std::io::Read;
    let mut head = Vec::new();
    // An unreadable script is left to the run itself to report, with the real error.
    if let Ok(file) = std::fs::File::open(script) {
        let _ = file.take(1 << 20).read_to_end(&mut head);
    }
    match crate::legacy::first_crlf_line(&head) {
        Some(line) => Err(JobError::CrlfLineEndings {
            job_name: job_name.to_string(),
            line,
        }),
        None => Ok(()),
    }
}

/// A whole number of MiB, at least [`MIN_MEMORY_MAX`], as bytes.
fn memory_mb(map: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, JobError> {
    const MIB: u64 = 1024 * 1024;
    let min_mb = MIN_MEMORY_MAX / MIB;
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(mb) if mb >= min_mb => mb.checked_mul(MIB).map(Some).ok_or(JobError::BadValue {
                field,
                reason: format!("{mb} MiB is more than any host has"),
            }),
            _ => Err(JobError::BadValue {
                field,
                reason: format!("must be a whole number of MiB, at least {min_mb}, got {n}"),
            }),
        },
        Some(other) => Err(JobError::WrongType {
            field,
            expected: "a whole number of MiB",
            got: kind(other),
        }),
    }
}

/// A whole number of seconds, strictly positive.
fn seconds(map: &Map<String, Value>, field: &'static str) -> Result<Option<Duration>, JobError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(s) if s > 0 => Ok(Some(Duration::from_secs(s as u64))),
            Some(s) => Err(JobError::BadValue {
                field,
                reason: format!("must be a positive number of seconds, got {s}"),
            }),
            None => Err(JobError::BadValue {
                field,
                reason: format!("must be a whole number of seconds, got {n}"),
            }),
        },
        Some(other) => Err(JobError::WrongType {
            field,
            expected: "a whole number of seconds",
            got: kind(other),
        }),
    }
}

/// The arguments `spec`'s script gets: the job's own `legacy_args`, else the configured
/// `[jobs.legacy]` pair when it applies, then the job's `args`.
pub fn script_args(spec: &JobSpec, legacy: Option<&LegacySettings>) -> Vec<String> {
    let mut args = Vec::with_capacity(spec.args.len() + 2);
    if let Some([code_dir, secret]) = &spec.legacy_args {
        args.push(code_dir.clone());
        args.push(secret.clone());
    } else if let Some(legacy) = legacy.filter(|l| l.applies_to(&spec.workflow_id)) {
        args.push(legacy.instance_code_dir.display().to_string());
        args.push(legacy.secret_id.clone().unwrap_or_default());
    }
    args.extend(spec.args.iter().cloned());
    args
}

/// Resolves `job_name` inside `script_dir`, following symlinks, and refuses anything that
/// ends up outside it.
pub fn resolve_script(script_dir: &Path, job_name: &str) -> Result<PathBuf, JobError> {
    if job_name.is_empty() {
        return Err(JobError::BadValue {
            field: "job_name",
            reason: "is empty".to_string(),
        });
    }
    if Path::new(job_name).is_absolute() {
        return Err(JobError::AbsolutePath {
            job_name: job_name.to_string(),
        });
    }
    let root = script_dir
        .canonicalize()
        .map_err(|source| JobError::ScriptDir {
            script_dir: script_dir.to_path_buf(),
            source,
        })?;
    let resolved = match root.join(job_name).canonicalize() {
        Ok(path) => path,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A `../` that points nowhere is still an escape attempt: say so rather than
            // "unknown script", because that is what the operator needs to fix.
            if Path::new(job_name)
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(JobError::PathEscape {
                    job_name: job_name.to_string(),
                    resolved: root.join(job_name),
                    script_dir: root,
                });
            }
            return Err(JobError::UnknownScript {
                job_name: job_name.to_string(),
                script_dir: root,
            });
        }
        Err(_) => {
            return Err(JobError::UnknownScript {
                job_name: job_name.to_string(),
                script_dir: root,
            })
        }
    };
    if !resolved.starts_with(&root) {
        return Err(JobError::PathEscape {
            job_name: job_name.to_string(),
            resolved,
            script_dir: root,
        });
    }
    if !resolved.is_file() {
        return Err(JobError::NotAFile {
            job_name: job_name.to_string(),
        });
    }
    // Checked again for every job, not only at start: a script or directory someone made
    // writable since then could hold planted code.
    // As named (symlinks on the way, by their owners) and as resolved, up to `/`.
    if let Err(problem) = crate::trust::check(&root.join(job_name), &crate::trust::trusted_uids()) {
        return Err(JobError::Untrusted {
            job_name: job_name.to_string(),
            problem,
        });
    }
    Ok(resolved)
}

/// A message's legacy `instance_code_dir` is where a legacy script sources code from
/// (`source $1/get_redshift_creds.sh $2`), so it gets the same trust as the scripts: an
/// absolute path that only root or the agent's user can change, down to that file. Without
/// this, whoever may submit a job could name a directory of their own and have their code
/// run as the agent.
fn check_code_dir(code_dir: &str) -> Result<(), JobError> {
    let dir = Path::new(code_dir);
    let refuse = |reason: String| JobError::BadValue {
        field: "legacy_args",
        reason,
    };
    if !dir.is_absolute() {
        return Err(refuse(format!(
            "instance_code_dir {code_dir:?} must be an absolute path"
        )));
    }
    crate::legacy::check_code_dir(dir).map_err(|problem| {
        refuse(format!(
            "instance_code_dir {code_dir:?} is not safe to source code from: {problem}"
        ))
    })
}

/// Finds a `"task_token"` (or `"token"`) string in a body that may not even be valid JSON.
///
/// A message that fails to parse must still be failed back to Step Functions when it names
/// its token; otherwise its workflow waits until the task's own timeout.
pub fn scavenge_token(body: &[u8]) -> Option<String> {
    // Only the first MAX_MESSAGE_BYTES are searched; a token sits near the start anyway.
    let body = &body[..body.len().min(MAX_MESSAGE_BYTES + 4096)];
    let text = String::from_utf8_lossy(body);
    for key in ["\"task_token\"", "\"token\""] {
        let mut from = 0;
        while let Some(pos) = text[from..].find(key) {
            let after = from + pos + key.len();
            from = after;
            let rest = text[after..].trim_start();
            let Some(rest) = rest.strip_prefix(':') else {
                continue;
            };
            let rest = rest.trim_start();
            if !rest.starts_with('"') {
                continue;
            }
            // Find the closing quote of the JSON string, honouring escapes.
            let bytes = rest.as_bytes();
            let mut i = 1;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => i += 2,
                    b'"' => break,
                    _ => i += 1,
                }
            }
            if i >= bytes.len() {
                continue;
            }
            if let Ok(token) = serde_json::from_str::<String>(&rest[..=i]) {
                if check_token(&token).is_ok() {
                    return Some(token);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
