//! One stage of a legacy workflow config (`workflow_stages[]`): what the runner runs, and
//! what the local audit keeps of a run so that `workflow report` can group its jobs.
//!
//! Must not touch: running anything. The audit stores these, so they sit below the runner.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub execution_flag: String,
    pub execution_type: ExecutionType,
    #[serde(default)]
    pub stage_description: String,
    pub scripts: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionType {
    Sequential,
    Parallel,
}

impl Stage {
    /// The legacy flag is `y` to run; anything else (`n`) skips the stage.
    pub fn enabled(&self) -> bool {
        self.execution_flag.trim().eq_ignore_ascii_case("y")
    }
}
