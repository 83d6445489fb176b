//! `[fleet]`: what the agent does as one instance of an EC2 Auto Scaling group, or as a Spot
//! instance: drain on scale-in and on a Spot notice, keep its lifecycle action alive while
//! jobs finish, complete it after the last outcome, and protect itself from scale-in while
//! busy (the `fleet` module does it; this file only reads and checks the keys).

use std::time::Duration;

use serde::Deserialize;

use super::{duration_or, KeyError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    enabled: Option<RawEnabled>,
    auto_scaling_group: Option<String>,
    lifecycle_hook: Option<String>,
    poll_interval: Option<String>,
    lifecycle_heartbeat: Option<String>,
    spot_stop_margin: Option<String>,
    protect_when_busy: Option<bool>,
    unprotect_after_idle: Option<String>,
}

/// `enabled`: `"auto"`, `true` or `false`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawEnabled {
    Bool(bool),
    Word(String),
}

/// Whether fleet handling runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetMode {
    /// On where the instance metadata service says this instance is in an Auto Scaling
    /// group; off elsewhere (no instance metadata service, or not in a group).
    Auto,
    /// On wherever the instance metadata service answers: Spot notices are watched even
    /// outside a group.
    On,
    Off,
}

/// The validated `[fleet]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSettings {
    pub mode: FleetMode,
    /// The group; `None`: asked of Auto Scaling (`DescribeAutoScalingInstances`).
    pub auto_scaling_group: Option<String>,
    /// The `EC2_INSTANCE_TERMINATING` hook to heartbeat and complete; `None`: every such hook
    /// of the group (`DescribeLifecycleHooks`).
    pub lifecycle_hook: Option<String>,
    /// How often the instance metadata is read: the time from a scale-in or Spot notice to
    /// intake stopped is at most this plus one read.
    pub poll_interval: Duration,
    /// How often the lifecycle action is heartbeated while jobs finish. Must be well under
    /// the hook's heartbeat timeout.
    pub lifecycle_heartbeat: Duration,
    /// Jobs still running this long before a Spot interruption are stopped (and reported
    /// `Rsql.Interrupted`), leaving time for `jobs.kill_grace` and the report.
    pub spot_stop_margin: Duration,
    pub protect_when_busy: bool,
    /// Protection is cleared once no job has run for this long, so that an instance between
    /// two jobs of a stage keeps it and the calls stay few.
    pub unprotect_after_idle: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        FleetSettings {
            mode: FleetMode::Auto,
            auto_scaling_group: None,
            lifecycle_hook: None,
            poll_interval: Duration::from_millis(500),
            lifecycle_heartbeat: Duration::from_secs(60),
            spot_stop_margin: Duration::from_secs(45),
            protect_when_busy: true,
            unprotect_after_idle: Duration::from_secs(300),
        }
    }
}

/// The IMDS read interval's bounds: fast enough for "intake stops within a second", slow
/// enough to stay far below the service's per-instance request limit.
const POLL_MIN: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(5);

/// Auto Scaling's own bounds on a hook's heartbeat timeout are 30 s to 2 h; a heartbeat
/// outside these could not keep any hook alive, or would be pointless.
const HEARTBEAT_MIN: Duration = Duration::from_secs(1);
const HEARTBEAT_MAX: Duration = Duration::from_secs(3600);

/// A Spot interruption comes two minutes ahead.
const SPOT_NOTICE: Duration = Duration::from_secs(120);

impl FleetSettings {
    pub(super) fn from_raw(raw: RawFleet) -> Result<Self, KeyError> {
        let d = FleetSettings::default();
        let mode = match raw.enabled {
            None => d.mode,
            Some(RawEnabled::Bool(true)) => FleetMode::On,
            Some(RawEnabled::Bool(false)) => FleetMode::Off,
            Some(RawEnabled::Word(w)) if w == "auto" => FleetMode::Auto,
            Some(RawEnabled::Word(w)) => {
                return Err((
                    "fleet.enabled",
                    format!("must be \"auto\", true or false, got {w:?}"),
                ))
            }
        };
        let name = |key: &'static str, v: Option<String>| -> Result<Option<String>, KeyError> {
            match v {
                Some(s) if s.is_empty() => Ok(None),
                Some(s) if s.len() > 255 || s.chars().any(char::is_control) => Err((
                    key,
                    "must be at most 255 printable characters (an Auto Scaling name)".into(),
                )),
                other => Ok(other),
            }
        };
        let settings = FleetSettings {
            mode,
            auto_scaling_group: name("fleet.auto_scaling_group", raw.auto_scaling_group)?,
            lifecycle_hook: name("fleet.lifecycle_hook", raw.lifecycle_hook)?,
            poll_interval: duration_or("fleet.poll_interval", raw.poll_interval, d.poll_interval)?,
            lifecycle_heartbeat: duration_or(
                "fleet.lifecycle_heartbeat",
                raw.lifecycle_heartbeat,
                d.lifecycle_heartbeat,
            )?,
            spot_stop_margin: duration_or(
                "fleet.spot_stop_margin",
                raw.spot_stop_margin,
                d.spot_stop_margin,
            )?,
            protect_when_busy: raw.protect_when_busy.unwrap_or(d.protect_when_busy),
            unprotect_after_idle: duration_or(
                "fleet.unprotect_after_idle",
                raw.unprotect_after_idle,
                d.unprotect_after_idle,
            )?,
        };
        settings.check()?;
        Ok(settings)
    }

    /// What `check-config` and the daemon say when a job stopped ahead of a Spot interruption
    /// would not have the time its `kill_grace` and its report need.
    pub fn warning(&self, kill_grace: Duration) -> Option<String> {
        let needed = kill_grace + Duration::from_secs(5);
        (self.mode != FleetMode::Off && self.spot_stop_margin <= needed).then(|| {
            format!(
                "fleet.spot_stop_margin ({}) is not more than jobs.kill_grace ({}) plus 5s: a job \
                 stopped ahead of a Spot interruption may be killed with its host before it ends \
                 or is reported; raise the margin (below 2m) or lower kill_grace",
                humantime::format_duration(self.spot_stop_margin),
                humantime::format_duration(kill_grace)
            )
        })
    }

    fn check(&self) -> Result<(), KeyError> {
        let human = |d: Duration| humantime::format_duration(d).to_string();
        if !(POLL_MIN..=POLL_MAX).contains(&self.poll_interval) {
            return Err((
                "fleet.poll_interval",
                format!(
                    "must be between {} and {}",
                    human(POLL_MIN),
                    human(POLL_MAX)
                ),
            ));
        }
        if !(HEARTBEAT_MIN..=HEARTBEAT_MAX).contains(&self.lifecycle_heartbeat) {
            return Err((
                "fleet.lifecycle_heartbeat",
                format!(
                    "must be between {} and {}, and under the hook's heartbeat timeout",
                    human(HEARTBEAT_MIN),
                    human(HEARTBEAT_MAX)
                ),
            ));
        }
        if self.spot_stop_margin.is_zero() || self.spot_stop_margin >= SPOT_NOTICE {
            return Err((
                "fleet.spot_stop_margin",
                format!(
                    "must be more than 0s and less than the 2-minute Spot notice; got {}",
                    human(self.spot_stop_margin)
                ),
            ));
        }
        if self.unprotect_after_idle.is_zero() {
            return Err((
                "fleet.unprotect_after_idle",
                "must be more than 0s: protection would flap between jobs".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FleetSettings, KeyError> {
        let raw: RawFleet = toml::from_str(text).map_err(|e| ("toml", e.to_string()))?;
        FleetSettings::from_raw(raw)
    }

    #[test]
    fn defaults_are_auto_and_valid() {
        let s = parse("").unwrap();
        assert_eq!(s, FleetSettings::default());
        assert_eq!(s.mode, FleetMode::Auto);
    }

    #[test]
    fn enabled_takes_auto_or_a_bool() {
        assert_eq!(parse("enabled = true").unwrap().mode, FleetMode::On);
        assert_eq!(parse("enabled = false").unwrap().mode, FleetMode::Off);
        assert_eq!(parse("enabled = \"auto\"").unwrap().mode, FleetMode::Auto);
        let (key, reason) = parse("enabled = \"yes\"").unwrap_err();
        assert_eq!(key, "fleet.enabled");
        assert!(reason.contains("\"yes\""), "{reason}");
    }

    #[test]
    fn a_spot_margin_that_leaves_no_time_for_the_kill_grace_is_a_warning_not_an_error() {
        let s = parse("spot_stop_margin = \"30s\"").unwrap();
        let warning = s.warning(Duration::from_secs(30)).expect("a warning");
        assert!(warning.contains("kill_grace (30s)"), "{warning}");
        assert_eq!(s.warning(Duration::from_secs(20)), None);
        // Off: nothing to warn about.
        let off = parse("enabled = false\nspot_stop_margin = \"30s\"").unwrap();
        assert_eq!(off.warning(Duration::from_secs(60)), None);
        assert_eq!(
            parse("spot_stop_margin = \"2m\"").unwrap_err().0,
            "fleet.spot_stop_margin"
        );
        assert!(parse("spot_stop_margin = \"0s\"").is_err());
    }

    #[test]
    fn empty_names_mean_look_them_up() {
        let s = parse("auto_scaling_group = \"\"\nlifecycle_hook = \"h\"").unwrap();
        assert_eq!(s.auto_scaling_group, None);
        assert_eq!(s.lifecycle_hook.as_deref(), Some("h"));
    }

    #[test]
    fn poll_interval_is_bounded() {
        assert_eq!(
            parse("poll_interval = \"10ms\"").unwrap_err().0,
            "fleet.poll_interval"
        );
        assert_eq!(
            parse("poll_interval = \"1m\"").unwrap_err().0,
            "fleet.poll_interval"
        );
    }
}
