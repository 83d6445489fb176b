//! `[intake.sqs]` and `[intake.socket]`: where jobs come from.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration_or, KeyError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntake {
    pub(super) sqs: Option<RawSqs>,
    pub(super) socket: Option<RawSocket>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSqs {
    queue_url: String,
    wait_time: Option<String>,
    visibility_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSocket {
    path: Option<PathBuf>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
    #[serde(default)]
    allowed_groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SqsSettings {
    pub queue_url: String,
    pub wait_time: Duration,
    pub visibility_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SocketSettings {
    pub path: PathBuf,
    pub allowed_uids: Vec<u32>,
    pub allowed_groups: Vec<String>,
}

impl Default for SqsSettings {
    /// Everything but the queue, which the file must name.
    fn default() -> SqsSettings {
        SqsSettings {
            queue_url: String::new(),
            wait_time: Duration::from_secs(20),
            visibility_timeout: Duration::from_secs(120),
        }
    }
}

impl SqsSettings {
    pub(super) fn from_raw(raw: RawSqs) -> Result<SqsSettings, KeyError> {
        let defaults = SqsSettings::default();
        Ok(SqsSettings {
            queue_url: raw.queue_url,
            wait_time: duration_or("intake.sqs.wait_time", raw.wait_time, defaults.wait_time)?,
            visibility_timeout: duration_or(
                "intake.sqs.visibility_timeout",
                raw.visibility_timeout,
                defaults.visibility_timeout,
            )?,
        })
    }

    /// A queue URL, and the long poll and visibility timeout SQS accepts.
    pub(super) fn check(&self) -> Result<(), KeyError> {
        if !(self.queue_url.starts_with("https://") || self.queue_url.starts_with("http://")) {
            return Err((
                "intake.sqs.queue_url",
                format!("{:?} is not a queue URL", self.queue_url),
            ));
        }
        if self.wait_time > Duration::from_secs(20) {
            return Err((
                "intake.sqs.wait_time",
                "SQS long polls for at most 20s".to_string(),
            ));
        }
        if self.visibility_timeout < Duration::from_secs(10)
            || self.visibility_timeout > Duration::from_secs(12 * 3600)
        {
            return Err((
                "intake.sqs.visibility_timeout",
                "must be between 10s and 12h".to_string(),
            ));
        }
        Ok(())
    }
}

impl Default for SocketSettings {
    fn default() -> SocketSettings {
        SocketSettings {
            path: PathBuf::from("/run/rsql-agent/agent.sock"),
            allowed_uids: Vec::new(),
            allowed_groups: Vec::new(),
        }
    }
}

impl SocketSettings {
    pub(super) fn from_raw(raw: RawSocket) -> SocketSettings {
        SocketSettings {
            path: raw.path.unwrap_or_else(|| SocketSettings::default().path),
            allowed_uids: raw.allowed_uids,
            allowed_groups: raw.allowed_groups,
        }
    }
}
