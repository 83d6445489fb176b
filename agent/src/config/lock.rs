//! `[lock]`: the per-job locks on the shared directory, and how long a finished job's record
//! is kept.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::agent::SYSTEM_STATE_DIR;
use super::{duration_or, KeyError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLock {
    dir: Option<PathBuf>,
    retention: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LockSettings {
    pub dir: PathBuf,
    pub retention: Duration,
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
    pub(super) fn from_raw(raw: RawLock, state_dir: &Path) -> Result<LockSettings, KeyError> {
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
