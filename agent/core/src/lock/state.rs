//! The record kept next to each lock: who ran the job, under which task token, how far it got
//! and what it produced. Owns the on-disk JSON shape and the facts about this host that go into
//! it; reading and writing the file belongs to the parent module.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where a job stands, as recorded in its state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// An owner took the lock and started the job. If the lock is free while the state still
    /// says `running`, that owner died.
    Running,
    /// The script exited 0.
    Completed,
    /// The job ended in any failure other than the ones below.
    Failed,
    /// The agent stopped or crashed while the job ran (`Rsql.Interrupted`).
    Interrupted,
    /// Step Functions closed the task while the job ran, and the agent killed the job.
    Cancelled,
}

impl RunState {
    /// Every state but `running` is final: the outcome is known and can be replayed.
    pub fn is_final(self) -> bool {
        !matches!(self, RunState::Running)
    }
}

/// The contents of `<hash>.state`.
///
/// Fields other than `lock_key`, `token_hash` and `state` default when absent, so files from
/// older agents still parse. Unknown fields are ignored rather than rejected: during a rolling
/// upgrade a newer agent on another instance may write fields this one does not know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockState {
    /// The unhashed lock key, so an operator can tell which job a file belongs to.
    pub lock_key: String,
    /// Hostname of the owner.
    #[serde(default)]
    pub host: String,
    /// EC2 instance id of the owner.
    #[serde(default)]
    pub instance_id: String,
    /// Process id of the owning agent.
    #[serde(default)]
    pub pid: u32,
    /// `/proc/sys/kernel/random/boot_id` of the owner: tells a pid reused after a reboot apart
    /// from the original owner.
    #[serde(default)]
    pub boot_id: String,
    /// [`token_hash`] of the task token that owns this attempt. Never the token itself.
    pub token_hash: String,
    /// Where the job stands.
    pub state: RunState,
    /// When the attempt started (RFC 3339, UTC, milliseconds).
    #[serde(default)]
    pub started_at: String,
    /// Last proof of life from the owner; see the lease section of the module doc.
    #[serde(default)]
    pub heartbeat_at: String,
    /// When the record was last written by `write_state` (touches leave it alone).
    #[serde(default)]
    pub updated_at: String,
    /// The script's exit code, once it has one.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// 1 for the first run under this lock key, one more for each later run.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// The outcome to replay to a redelivery, as the daemon recorded it, e.g.
    /// `{"status":"completed","output":{..}}` or `{"status":"failed","error":..,"cause":..}`.
    #[serde(default)]
    pub outcome: Option<serde_json::Value>,
}

fn first_attempt() -> u32 {
    1
}

impl LockState {
    /// A `running` record for the current process on this host.
    ///
    /// Host and boot id are best effort: a host that cannot report them still gets a valid
    /// record, with `unknown` in their place, because the lock itself does not depend on them.
    pub fn new_running(
        lock_key: &str,
        instance_id: &str,
        token_hash: &str,
        attempt: u32,
    ) -> LockState {
        let now = timestamp(SystemTime::now());
        LockState {
            lock_key: lock_key.to_owned(),
            host: hostname(),
            instance_id: instance_id.to_owned(),
            pid: std::process::id(),
            boot_id: boot_id(),
            token_hash: token_hash.to_owned(),
            state: RunState::Running,
            started_at: now.clone(),
            heartbeat_at: now.clone(),
            updated_at: now,
            exit_code: None,
            attempt,
            outcome: None,
        }
    }

    /// Whether the recorded outcome is known (any state but `running`).
    pub fn is_final(&self) -> bool {
        self.state.is_final()
    }

    /// How long ago the owner last showed a sign of life, or `None` if `heartbeat_at` does not
    /// parse. A `Busy` holder whose heartbeat is much older than the heartbeat interval is
    /// alive as far as the lock server knows but is not making progress (for example cut off
    /// from everything but EFS); that is worth an operator's attention.
    pub fn heartbeat_age(&self, now: SystemTime) -> Option<Duration> {
        age(&self.heartbeat_at, now)
    }

    /// How long ago the record was last written, or `None` if `updated_at` does not parse.
    pub(super) fn updated_age(&self, now: SystemTime) -> Option<Duration> {
        age(&self.updated_at, now)
    }
}

/// A short, stable identifier of a task token, for logs and state files: the first 16 hex
/// characters of its SHA-256. A task token is a credential for the task, so it is never
/// written anywhere in full.
pub fn token_hash(token: &str) -> String {
    let mut hex = hex::encode(Sha256::digest(token.as_bytes()));
    hex.truncate(16);
    hex
}

/// The file name stem for a lock key: the full hex SHA-256, so any key (slashes, spaces,
/// unicode, any length) maps to a fixed-length, file-system-safe name.
pub(super) fn key_stem(lock_key: &str) -> String {
    hex::encode(Sha256::digest(lock_key.as_bytes()))
}

/// RFC 3339 in UTC with milliseconds, the format of every time in the state file.
pub(super) fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn age(stamp: &str, now: SystemTime) -> Option<Duration> {
    let at = humantime::parse_rfc3339(stamp).ok()?;
    // A stamp from a host whose clock runs ahead is "now", not an error.
    Some(now.duration_since(at).unwrap_or(Duration::ZERO))
}

fn hostname() -> String {
    match nix::unistd::gethostname() {
        Ok(name) => name.to_string_lossy().into_owned(),
        Err(_) => "unknown".to_owned(),
    }
}

fn boot_id() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(id) => id.trim().to_owned(),
        Err(_) => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LockState {
        let mut s = LockState::new_running("exec-1/job.sh", "i-0123", &token_hash("tok"), 2);
        s.state = RunState::Failed;
        s.exit_code = Some(3);
        s.outcome = Some(serde_json::json!({
            "status": "failed", "error": "Rsql.ScriptFailed", "cause": "{\"exit_code\":3}"
        }));
        s
    }

    #[test]
    fn state_round_trips_through_json() {
        let s = sample();
        let text = serde_json::to_string(&s).expect("serialize");
        let back: LockState = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, s);
    }

    #[test]
    fn run_state_is_lowercase_on_disk() {
        for (state, name) in [
            (RunState::Running, "running"),
            (RunState::Completed, "completed"),
            (RunState::Failed, "failed"),
            (RunState::Interrupted, "interrupted"),
            (RunState::Cancelled, "cancelled"),
        ] {
            assert_eq!(
                serde_json::to_value(state).expect("serialize"),
                serde_json::json!(name)
            );
            assert_eq!(state.is_final(), state != RunState::Running);
        }
    }

    #[test]
    fn older_minimal_file_parses_with_defaults() {
        let text = r#"{"lock_key":"e/j","token_hash":"abcd","state":"completed"}"#;
        let s: LockState = serde_json::from_str(text).expect("parse");
        assert_eq!(s.attempt, 1);
        assert_eq!(s.exit_code, None);
        assert_eq!(s.outcome, None);
        assert!(s.is_final());
    }

    #[test]
    fn unknown_fields_from_newer_agents_are_ignored() {
        let text = r#"{"lock_key":"e/j","token_hash":"abcd","state":"running","lease_owner":"x"}"#;
        let s: LockState = serde_json::from_str(text).expect("parse");
        assert_eq!(s.state, RunState::Running);
    }

    #[test]
    fn new_running_describes_this_process() {
        let s = LockState::new_running("k", "i-1", "h", 1);
        assert_eq!(s.pid, std::process::id());
        assert_eq!(s.state, RunState::Running);
        assert!(!s.host.is_empty());
        assert!(!s.boot_id.is_empty());
        assert!(humantime::parse_rfc3339(&s.started_at).is_ok());
        assert!(s.started_at.ends_with('Z'));
        let age = s
            .heartbeat_age(SystemTime::now() + Duration::from_secs(5))
            .expect("heartbeat parses");
        assert!(age >= Duration::from_secs(4) && age < Duration::from_secs(60));
    }

    #[test]
    fn token_hash_is_short_stable_and_distinct() {
        let a = token_hash("AAAAKgAAAAIAAAAAAAAAAQ");
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, token_hash("AAAAKgAAAAIAAAAAAAAAAQ"));
        assert_ne!(a, token_hash("AAAAKgAAAAIAAAAAAAAAAg"));
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(token_hash("abc"), "ba7816bf8f01cfea");
    }

    #[test]
    fn future_stamps_have_zero_age() {
        let mut s = sample();
        s.updated_at = timestamp(SystemTime::now() + Duration::from_secs(3600));
        assert_eq!(s.updated_age(SystemTime::now()), Some(Duration::ZERO));
        s.updated_at = "yesterday".to_owned();
        assert_eq!(s.updated_age(SystemTime::now()), None);
    }
}
