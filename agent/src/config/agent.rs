//! `[agent]`: the process itself: where its state lives, how many jobs run at once, and who
//! it says it is.

use std::path::PathBuf;

use serde::Deserialize;

use super::{positive_or, KeyError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    state_dir: Option<PathBuf>,
    max_concurrent_jobs: Option<i64>,
    instance_id: Option<String>,
    /// No longer used (SIGTERM hands running jobs to their owners, it does not wait for
    /// them); accepted with any value so that old configs keep working, and warned about.
    pub(super) shutdown_grace: Option<toml::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentSettings {
    pub state_dir: PathBuf,
    pub max_concurrent_jobs: usize,
    /// Overrides the instance id that would otherwise come from IMDS.
    pub instance_id: Option<String>,
}

/// What `check-config` and the daemon say about `[agent] shutdown_grace`.
pub const SHUTDOWN_GRACE_UNUSED: &str = "agent.shutdown_grace is no longer used and is \
     ignored: on SIGTERM the agent hands its running jobs to their owner processes and stops \
     without waiting for them (they go on, and the next start adopts them); remove the \
     key";

/// The state directory of a system-wide agent.
pub(super) const SYSTEM_STATE_DIR: &str = "/var/lib/rsql-agent";

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
    pub(super) fn from_raw(raw: RawAgent, per_user: bool) -> Result<AgentSettings, KeyError> {
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

impl AgentSettings {
    /// At most 256 jobs at once.
    pub(super) fn check(&self) -> Result<(), KeyError> {
        if self.max_concurrent_jobs > 256 {
            return Err((
                "agent.max_concurrent_jobs",
                format!("{} is more than 256", self.max_concurrent_jobs),
            ));
        }
        Ok(())
    }
}
