//! The one stop vocabulary, from a signal to a job's process group: a [`StopReason`] (why,
//! and so what is reported) and a [`StopLevel`] (how hard). Every layer speaks it: the
//! signal handler's meaning, the daemon's wish for its jobs, the owner protocol's `stop`
//! request (where [`StopReason`] is the one serialized form) and the supervisor, which stops
//! a job through the counted [`StopSender`] / [`StopReceiver`] pair.
//!
//! ```text
//!  SIGTERM, heartbeat "task closed", a Spot deadline
//!        │ (reason, level)
//!        ▼
//!  StopSender::stop ─▶ StopRequests { count, first reason } ─▶ supervisor: level() =
//!                                                               Graceful: SIGTERM, kill_grace, SIGKILL
//!                                                               Kill:     SIGKILL now
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Why a job is stopped on request; decides what is reported.
///
/// Serialized as `"cancelled"` / `"interrupted"`: the form of the owner protocol's
/// `{"op":"stop","reason":…}`, which owners of older and newer agents share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The task was closed upstream (a heartbeat found it closed, or an operator cancelled
    /// it): reported as cancelled, with no callback.
    Cancelled,
    /// A stop that is not the job's fault (the agent or its host is going away, a Spot
    /// deadline): reported `Rsql.Interrupted`, which workflows retry.
    Interrupted,
}

/// How hard a job is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StopLevel {
    /// SIGTERM to the job's process group, `kill_grace`, then SIGKILL.
    Graceful,
    /// SIGKILL now.
    Kill,
}

/// The requests to stop one job so far, counted: the first asks [`StopLevel::Graceful`],
/// any later one [`StopLevel::Kill`]. Counting rather than sending values means two
/// requests in quick succession are never merged into one by the channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopRequests {
    pub count: u32,
    /// The first reason given, which is the one reported.
    pub reason: Option<StopReason>,
}

impl StopRequests {
    /// The level asked for, if any stop was.
    pub fn level(&self) -> Option<StopLevel> {
        match self.count {
            0 => None,
            1 => Some(StopLevel::Graceful),
            _ => Some(StopLevel::Kill),
        }
    }

    /// The reason to report: the first one given.
    pub fn reason(&self) -> StopReason {
        self.reason.unwrap_or(StopReason::Interrupted)
    }
}

/// Asks a running job to stop. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StopSender {
    tx: Arc<watch::Sender<StopRequests>>,
}

/// Where a job's supervision learns of stop requests.
pub type StopReceiver = watch::Receiver<StopRequests>;

impl StopSender {
    /// One more request: the first stops the job gracefully, any later one kills it. The
    /// first reason given is the one reported. Does nothing once the job has ended.
    pub fn stop(&self, reason: StopReason) {
        self.tx.send_modify(|r| {
            r.count = r.count.saturating_add(1);
            r.reason.get_or_insert(reason);
        });
    }

    /// Asks for `level` at once: one request for [`StopLevel::Graceful`], as many as it
    /// takes for [`StopLevel::Kill`]. Asking less than was already asked changes nothing.
    pub fn stop_at(&self, reason: StopReason, level: StopLevel) {
        let wanted = match level {
            StopLevel::Graceful => 1,
            StopLevel::Kill => 2,
        };
        self.tx.send_if_modified(|r| {
            r.reason.get_or_insert(reason);
            if r.count >= wanted {
                return false;
            }
            r.count = wanted;
            true
        });
    }
}

/// A stop channel for one job.
pub fn channel() -> (StopSender, StopReceiver) {
    let (tx, rx) = watch::channel(StopRequests::default());
    (StopSender { tx: Arc::new(tx) }, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_is_graceful_and_any_later_one_kills() {
        let (tx, rx) = channel();
        assert_eq!(rx.borrow().level(), None);
        tx.stop(StopReason::Cancelled);
        assert_eq!(rx.borrow().level(), Some(StopLevel::Graceful));
        tx.clone().stop(StopReason::Interrupted);
        assert_eq!(rx.borrow().level(), Some(StopLevel::Kill));
        assert_eq!(
            rx.borrow().reason(),
            StopReason::Cancelled,
            "the first reason is reported"
        );
    }

    #[test]
    fn a_kill_asked_at_once_is_never_lowered() {
        let (tx, rx) = channel();
        tx.stop_at(StopReason::Interrupted, StopLevel::Kill);
        assert_eq!(rx.borrow().level(), Some(StopLevel::Kill));
        tx.stop_at(StopReason::Cancelled, StopLevel::Graceful);
        assert_eq!(rx.borrow().level(), Some(StopLevel::Kill));
        assert_eq!(rx.borrow().reason(), StopReason::Interrupted);
    }

    #[test]
    fn the_reason_has_the_owner_protocols_form() {
        assert_eq!(
            serde_json::to_string(&StopReason::Cancelled).unwrap(),
            r#""cancelled""#
        );
        assert_eq!(
            serde_json::from_str::<StopReason>(r#""interrupted""#).unwrap(),
            StopReason::Interrupted
        );
    }
}
