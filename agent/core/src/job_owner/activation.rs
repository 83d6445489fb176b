//! What a launcher and a socket-activated owner agree on: the names of the owner units and
//! the one JSON line each way on the owner socket (`rsql-job-owner.socket`). The agent's side
//! of it is `job_owner/launch` in the agent; the owner's is `job_owner/shim`.

use serde::{Deserialize, Serialize};

/// The systemd slice every job owner unit runs in.
pub const SLICE: &str = "rsql-jobs.slice";
/// Job owner units are instances of `rsql-job-owner@.service`.
pub const UNIT_PREFIX: &str = "rsql-job-owner@";

/// A request on the owner socket: the job whose directory the new owner takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationRequest {
    pub v: u32,
    pub job_id: String,
}

/// The owner's answer on the owner socket, once it listens on its own socket (or why not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationAnswer {
    pub ok: bool,
    /// The owner's systemd unit, for `systemctl status` and `journalctl -u`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether `job_id` can only name a directory directly under the owners' directory.
pub fn valid_job_id(job_id: &str) -> bool {
    !job_id.is_empty()
        && job_id.len() <= 200
        && !job_id.starts_with('.')
        && job_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_id_names_one_directory_under_the_owners_dir() {
        assert!(valid_job_id("blog_1-rsql_blog_script_1.sh-a1b2"));
        for bad in ["", "..", ".hidden", "a/b", "../etc", "a b", "a\nb"] {
            assert!(!valid_job_id(bad), "{bad:?}");
        }
    }
}
