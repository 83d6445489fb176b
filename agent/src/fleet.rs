//! The agent as one instance of an EC2 Auto Scaling group, or as a Spot instance: scale-in
//! and Spot reclaims never cost a running job.
//!
//! Owns, in two tasks so that a slow Auto Scaling call never delays reading a notice:
//! - the metadata watcher: finding out, in the background and without delaying start,
//!   whether this instance is in a group (`autoscaling/target-lifecycle-state` answers; a
//!   failed read is retried, and an instance outside a group is asked again every minute),
//!   then reading the instance metadata every `poll_interval` for a scale-in (`Terminated`),
//!   a Spot interruption notice and a rebalance recommendation, each sent once as a
//!   [`Notice`] to the daemon, which drains (and, for Spot, stops what cannot finish);
//! - the lifecycle task (see `lifecycle`): this instance's group and terminating hooks,
//!   heartbeats while the group waits on it, `CompleteLifecycleAction` once the daemon is
//!   drained, no job runs and the outbox is empty, and scale-in protection.
//!
//! Must not touch: jobs, their stops or their reports (the daemon owns those); this module
//! only learns the daemon's [`Load`] and tells it [`Notice`]s.

mod lifecycle;
mod notice;
pub mod protection;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{FleetMode, FleetSettings};
use crate::imds::{Imds, ReadError};
pub use notice::Notice;

/// What the daemon is doing, as the fleet needs to know it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Jobs the daemon watches (running, or ending and storing their outcome), and messages
    /// being handed back to the queue.
    pub running: usize,
    /// Intake is stopped.
    pub draining: bool,
}

/// How many outcomes are still to be delivered (the outbox's depth).
pub type Pending = Arc<dyn Fn() -> usize + Send + Sync>;

/// What the fleet tasks need from the daemon at start.
#[derive(Debug, Clone)]
pub struct FleetParts {
    pub settings: FleetSettings,
    /// The agent's instance id; the metadata's own is preferred once it answers.
    pub instance_id: String,
    pub autoscaling: aws_sdk_autoscaling::Client,
}

/// What the metadata watcher has learnt, for the lifecycle task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Seen {
    /// In an Auto Scaling group (the lifecycle state answers).
    in_group: bool,
    /// The metadata's instance id.
    instance_id: Option<String>,
    /// The group is terminating this instance.
    terminating: bool,
    /// A Spot interruption is coming: protection no longer matters.
    interrupted: bool,
}

/// The running fleet tasks and the daemon's ends of their channels.
#[derive(Debug)]
pub struct Fleet {
    notices: mpsc::Receiver<Notice>,
    load: watch::Sender<Load>,
    tasks: [JoinHandle<()>; 2],
}

/// How often an instance outside any group asks again whether it joined one.
const NOT_IN_GROUP_RECHECK: Duration = Duration::from_secs(60);
/// A failed metadata read at detection is tried again after this, doubling up to a minute.
const DETECT_RETRY: Duration = Duration::from_secs(1);
const DETECT_RETRY_MAX: Duration = Duration::from_secs(60);

impl Fleet {
    /// Starts the fleet tasks, or returns `None` where fleet handling is off (`enabled =
    /// false`, or the metadata service is disabled). Detection runs inside the tasks: start is
    /// never delayed.
    pub fn start(parts: FleetParts, pending: Pending) -> Option<Fleet> {
        if parts.settings.mode == FleetMode::Off {
            tracing::info!("fleet handling is off ([fleet] enabled = false)");
            return None;
        }
        let Some(imds) = Imds::from_env() else {
            tracing::info!("fleet handling is off: AWS_EC2_METADATA_DISABLED is set");
            return None;
        };
        let (notice_tx, notices) = mpsc::channel(4);
        let (load, load_rx) = watch::channel(Load::default());
        let (seen_tx, seen_rx) = watch::channel(Seen::default());
        let watcher = tokio::spawn(watch_metadata(
            parts.settings.clone(),
            imds,
            notice_tx,
            seen_tx,
        ));
        let lifecycle = tokio::spawn(lifecycle::run(parts, pending, load_rx, seen_rx));
        Some(Fleet {
            notices,
            load,
            tasks: [watcher, lifecycle],
        })
    }

    /// The next notice; pending forever once the watcher has ended.
    pub async fn notice(&mut self) -> Notice {
        match self.notices.recv().await {
            Some(n) => n,
            None => std::future::pending().await,
        }
    }

    /// Tells the lifecycle task what the daemon is doing now (cheap when nothing changed).
    pub fn publish(&self, load: Load) {
        self.load
            .send_if_modified(|l| std::mem::replace(l, load) != load);
    }

    /// Ends the tasks (the agent is stopping).
    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Whether fleet handling runs here, and why: what `check-config` shows and the daemon logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    Off(String),
    /// On; `lifecycle_state` is `None` outside a group (`enabled = true`: Spot notices only).
    On {
        lifecycle_state: Option<String>,
    },
}

impl std::fmt::Display for Detected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Detected::Off(why) => write!(f, "off: {why}"),
            Detected::On {
                lifecycle_state: Some(state),
            } => write!(
                f,
                "on: in an Auto Scaling group (target lifecycle state {state}); scale-in, Spot and rebalance notices are watched"
            ),
            Detected::On {
                lifecycle_state: None,
            } => write!(
                f,
                "on: not in an Auto Scaling group; Spot and rebalance notices are watched"
            ),
        }
    }
}

/// What one look at the metadata says.
#[derive(Debug)]
enum Probe {
    On(Option<String>),
    /// No metadata service: not on EC2 (on premises, a laptop, CI). Final.
    NotEc2,
    /// On EC2, in no group, and `enabled = "auto"`: asked again later.
    NotInGroup,
    /// The read failed: tried again.
    Failed(String),
}

async fn probe(settings: &FleetSettings, imds: &Imds) -> Probe {
    match imds.get(notice::LIFECYCLE_STATE).await {
        Ok(None) if settings.mode == FleetMode::Auto => Probe::NotInGroup,
        Ok(state) => Probe::On(state),
        Err(ReadError::Unreachable(_)) => Probe::NotEc2,
        Err(e) => Probe::Failed(e.to_string()),
    }
}

/// Asks the instance metadata service whether this instance is in an Auto Scaling group.
/// Quick where there is none (see `imds`).
pub async fn detect(settings: &FleetSettings) -> Detected {
    if settings.mode == FleetMode::Off {
        return Detected::Off("[fleet] enabled = false".into());
    }
    let Some(imds) = Imds::from_env() else {
        return Detected::Off("AWS_EC2_METADATA_DISABLED is set".into());
    };
    match probe(settings, &imds).await {
        Probe::On(lifecycle_state) => Detected::On { lifecycle_state },
        Probe::NotEc2 => Detected::Off("no instance metadata service here (not on EC2)".into()),
        Probe::NotInGroup => Detected::Off("this instance is not in an Auto Scaling group".into()),
        Probe::Failed(e) => Detected::Off(format!("cannot read the instance metadata: {e}")),
    }
}

/// Detection until it says on (or that this is not EC2), then the notices.
async fn watch_metadata(
    settings: FleetSettings,
    imds: Imds,
    notices: mpsc::Sender<Notice>,
    seen: watch::Sender<Seen>,
) {
    let mut retry = DETECT_RETRY;
    let mut said_off = false;
    let state = loop {
        match probe(&settings, &imds).await {
            Probe::On(state) => break state,
            Probe::NotEc2 => {
                // Quiet by design: most hosts without fleet handling are simply not on EC2.
                tracing::info!("fleet handling is off: no instance metadata service here");
                return;
            }
            Probe::NotInGroup => {
                if !said_off {
                    tracing::info!("fleet handling is off: this instance is not in an Auto Scaling group (asked again every minute)");
                    said_off = true;
                }
                tokio::time::sleep(NOT_IN_GROUP_RECHECK).await;
            }
            Probe::Failed(e) => {
                if retry >= DETECT_RETRY_MAX / 2 {
                    tracing::warn!(error = %e, "cannot read the instance metadata; fleet handling waits for it");
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(DETECT_RETRY_MAX);
            }
        }
    };
    let instance_id = imds
        .get("/latest/meta-data/instance-id")
        .await
        .ok()
        .flatten()
        .filter(|id| id.starts_with("i-"));
    seen.send_modify(|s| {
        s.in_group = state.is_some();
        s.instance_id = instance_id;
    });
    tracing::info!(
        lifecycle_state = state.as_deref().unwrap_or("-"),
        poll_ms = settings.poll_interval.as_millis() as u64,
        "fleet handling is on: watching for scale-in and Spot interruption notices"
    );
    let mut poll = tokio::time::interval(settings.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reader = notice::Reader::new(settings.spot_stop_margin);
    loop {
        poll.tick().await;
        for n in reader.read(&imds).await {
            match &n {
                Notice::ScaleIn => seen.send_modify(|s| s.terminating = true),
                Notice::Spot { .. } => seen.send_modify(|s| s.interrupted = true),
                Notice::Rebalance => {}
            }
            if notices.send(n).await.is_err() {
                return;
            }
        }
        if reader.done() {
            return;
        }
    }
}
