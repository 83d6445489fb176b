//! `[metrics]`: the CloudWatch embedded-metric records the agent writes.

use std::time::Duration;

use serde::Deserialize;

use super::{parse_duration, KeyError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    enabled: Option<bool>,
    namespace: Option<String>,
    fleet: Option<String>,
    interval: Option<String>,
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
    pub(super) fn from_raw(raw: RawMetrics) -> Result<MetricsSettings, KeyError> {
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
