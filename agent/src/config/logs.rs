//! `[logs.cloudwatch]`: shipping job logs to CloudWatch Logs.

use std::time::Duration;

use serde::Deserialize;

use super::{duration_or, KeyError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLogs {
    pub(super) cloudwatch: Option<RawCloudWatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCloudWatch {
    log_group: String,
    #[serde(default)]
    create_group: bool,
    flush_interval: Option<String>,
    final_flush_timeout: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CloudWatchSettings {
    pub log_group: String,
    pub create_group: bool,
    pub flush_interval: Duration,
    pub final_flush_timeout: Duration,
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
    pub(super) fn from_raw(raw: RawCloudWatch) -> Result<CloudWatchSettings, KeyError> {
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

impl CloudWatchSettings {
    /// A log group name CloudWatch accepts, and a flush that ever happens.
    pub(super) fn check(&self) -> Result<(), KeyError> {
        if self.log_group.is_empty() || self.log_group.len() > 512 {
            return Err((
                "logs.cloudwatch.log_group",
                "must be 1 to 512 characters".to_string(),
            ));
        }
        if self.flush_interval.is_zero() {
            return Err((
                "logs.cloudwatch.flush_interval",
                "must be more than 0s".to_string(),
            ));
        }
        Ok(())
    }
}
