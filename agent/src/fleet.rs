//! The agent as one instance of an EC2 Auto Scaling group, or as a Spot instance: scale-in
//! and Spot reclaims never cost a running job.
//!
//! Owns:
//! - finding out, in the background and without delaying start, whether this instance is
//!   in a group (`autoscaling/target-lifecycle-state` answers) and which group and
//!   terminating hook are its own;
//! - watching the instance metadata every `poll_interval` for a scale-in (`Terminated`), a
//!   Spot interruption notice and a rebalance recommendation, each sent once as a
//!   [`Notice`] to the daemon, which drains (and, for Spot, stops what cannot finish);
//! - while the group waits on this instance: `RecordLifecycleActionHeartbeat` every
//!   `lifecycle_heartbeat`, then `CompleteLifecycleAction` (`CONTINUE`) once the daemon is
//!   drained, no job runs and the outbox is empty, i.e. after the last outcome is delivered;
//! - scale-in protection (see `protection`).
//!
//! Must not touch: jobs, their stops or their reports (the daemon owns those); this module
//! only learns the daemon's [`Load`] and tells it [`Notice`]s.

mod notice;
pub mod protection;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_autoscaling::error::{DisplayErrorContext, ProvideErrorMetadata};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{FleetMode, FleetSettings};
use crate::imds::{Imds, ReadError};
pub use notice::Notice;
use protection::Protection;

/// What the daemon is doing, as the fleet needs to know it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Jobs the daemon watches (running, or ending and storing their outcome).
    pub running: usize,
    /// Intake is stopped.
    pub draining: bool,
}

/// How many outcomes are still to be delivered (the outbox's depth).
pub type Pending = Arc<dyn Fn() -> usize + Send + Sync>;

/// What the fleet task needs from the daemon at start.
#[derive(Debug, Clone)]
pub struct FleetParts {
    pub settings: FleetSettings,
    pub instance_id: String,
    pub autoscaling: aws_sdk_autoscaling::Client,
}

/// The running fleet task and the daemon's ends of its channels.
#[derive(Debug)]
pub struct Fleet {
    notices: mpsc::Receiver<Notice>,
    load: watch::Sender<Load>,
    task: JoinHandle<()>,
}

/// While the last outcomes go out, how often the outbox is looked at.
const DRAINED_CHECK: Duration = Duration::from_millis(50);
/// `CompleteLifecycleAction` is tried this many times before the hook's own timeout is
/// left to end the wait.
const COMPLETE_ATTEMPTS: u32 = 6;

impl Fleet {
    /// Starts the fleet task, or returns `None` where it is off (`enabled = false`, or the
    /// metadata service is disabled). Detection runs inside the task: start is never delayed.
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
        let task = tokio::spawn(run(Task {
            parts,
            imds,
            pending,
            notices: notice_tx,
            load: load_rx,
        }));
        Some(Fleet {
            notices,
            load,
            task,
        })
    }

    /// The next notice; pending forever once the task has ended.
    pub async fn notice(&mut self) -> Notice {
        match self.notices.recv().await {
            Some(n) => n,
            None => std::future::pending().await,
        }
    }

    /// Tells the task what the daemon is doing now (cheap when nothing changed).
    pub fn publish(&self, load: Load) {
        self.load
            .send_if_modified(|l| std::mem::replace(l, load) != load);
    }

    /// Ends the task (the agent is stopping).
    pub fn stop(self) {
        self.task.abort();
    }
}

struct Task {
    parts: FleetParts,
    imds: Imds,
    pending: Pending,
    notices: mpsc::Sender<Notice>,
    load: watch::Receiver<Load>,
}

/// This instance's place in its group.
#[derive(Debug)]
struct Group {
    name: String,
    /// `ProtectedFromScaleIn` as Auto Scaling reported it at start.
    protected: Option<bool>,
}

/// What has been seen and done so far.
#[derive(Debug, Default)]
struct Seen {
    terminating: bool,
    spot: bool,
    rebalance: bool,
    completed: bool,
    read_failures: u32,
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

/// Asks the instance metadata service whether this instance is in an Auto Scaling group.
/// Quick where there is none (see `imds`).
pub async fn detect(settings: &FleetSettings) -> Detected {
    if settings.mode == FleetMode::Off {
        return Detected::Off("[fleet] enabled = false".into());
    }
    let Some(imds) = Imds::from_env() else {
        return Detected::Off("AWS_EC2_METADATA_DISABLED is set".into());
    };
    detect_with(settings, &imds).await
}

async fn detect_with(settings: &FleetSettings, imds: &Imds) -> Detected {
    match imds.get(notice::LIFECYCLE_STATE).await {
        Ok(None) if settings.mode == FleetMode::Auto => {
            Detected::Off("this instance is not in an Auto Scaling group".into())
        }
        Ok(lifecycle_state) => Detected::On { lifecycle_state },
        // Not on EC2 (on premises, a laptop, CI): nothing to watch.
        Err(ReadError::Unreachable(_)) => {
            Detected::Off("no instance metadata service here (not on EC2)".into())
        }
        Err(e) => Detected::Off(format!("cannot read the instance metadata: {e}")),
    }
}

async fn run(mut t: Task) {
    let detected = detect_with(&t.parts.settings, &t.imds).await;
    let state = match detected {
        Detected::On { lifecycle_state } => lifecycle_state,
        Detected::Off(why) => {
            // Quiet by design: most hosts without fleet handling are simply not on EC2.
            tracing::info!("fleet handling is off: {why}");
            return;
        }
    };
    let group = match state {
        Some(_) => find_group(&t.parts).await,
        None => None,
    };
    tracing::info!(
        auto_scaling_group = group.as_ref().map_or("-", |g| g.name.as_str()),
        lifecycle_state = state.as_deref().unwrap_or("-"),
        poll_ms = t.parts.settings.poll_interval.as_millis() as u64,
        "fleet handling is on: watching for scale-in and Spot interruption notices"
    );
    watch_loop(&mut t, group).await;
}

/// The group: `[fleet] auto_scaling_group`, else Auto Scaling's answer for this instance.
async fn find_group(parts: &FleetParts) -> Option<Group> {
    let asked = parts
        .autoscaling
        .describe_auto_scaling_instances()
        .instance_ids(&parts.instance_id)
        .send()
        .await;
    let found = match asked {
        Ok(out) => out.auto_scaling_instances().first().map(|i| Group {
            name: i.auto_scaling_group_name().unwrap_or_default().to_string(),
            protected: i.protected_from_scale_in(),
        }),
        Err(e) => {
            tracing::warn!(
                instance_id = %parts.instance_id,
                error = %DisplayErrorContext(&e),
                "cannot ask Auto Scaling about this instance; scale-in protection is off and the lifecycle action is left to the hook's timeout unless [fleet] auto_scaling_group is set"
            );
            None
        }
    };
    match (&parts.settings.auto_scaling_group, found) {
        (Some(name), found) => Some(Group {
            name: name.clone(),
            protected: found.filter(|g| &g.name == name).and_then(|g| g.protected),
        }),
        (None, found) => found.filter(|g| !g.name.is_empty()),
    }
}

async fn watch_loop(t: &mut Task, group: Option<Group>) {
    let s = t.parts.settings.clone();
    let mut poll = tokio::time::interval(s.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + s.lifecycle_heartbeat,
        s.lifecycle_heartbeat,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let protecting = s.protect_when_busy && group.is_some();
    let mut protection = Protection::new(
        group.as_ref().and_then(|g| g.protected),
        s.unprotect_after_idle,
        Instant::now(),
    );
    let mut hooks: Option<Vec<String>> = None;
    let mut seen = Seen::default();
    let mut load_open = true;
    loop {
        let load = *t.load.borrow_and_update();
        if protecting && !seen.terminating && !seen.spot {
            if let (Some(want), Some(g)) = (protection.wanted(load.running, Instant::now()), &group)
            {
                set_protection(&t.parts, g, want, &mut protection).await;
                continue;
            }
        }
        let drained = seen.terminating && !seen.completed && load.draining && load.running == 0;
        if drained && (t.pending)() == 0 {
            if let Some(g) = &group {
                let hooks = hooks.get_or_insert(find_hooks(&t.parts, g).await);
                complete(&t.parts, g, hooks).await;
            }
            seen.completed = true;
            continue;
        }
        let next_protection = protection.next_check().filter(|_| protecting);
        tokio::select! {
            _ = poll.tick(), if !seen.completed => read_notices(t, &mut seen).await,
            changed = t.load.changed(), if load_open => load_open = changed.is_ok(),
            _ = heartbeat.tick(), if seen.terminating && !seen.completed && group.is_some() => {
                if let Some(g) = &group {
                    let hooks = hooks.get_or_insert(find_hooks(&t.parts, g).await);
                    record_heartbeat(&t.parts, g, hooks).await;
                }
            }
            () = sleep_until(next_protection), if next_protection.is_some() => {}
            () = tokio::time::sleep(DRAINED_CHECK), if drained => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One round of metadata reads; each notice goes to the daemon once.
async fn read_notices(t: &mut Task, seen: &mut Seen) {
    let mut failed = None;
    if !seen.terminating {
        match t.imds.get(notice::LIFECYCLE_STATE).await {
            Ok(Some(state)) if notice::is_terminating(&state) => {
                seen.terminating = true;
                tracing::warn!(
                    lifecycle_state = %state,
                    "the Auto Scaling group is terminating this instance: draining; running jobs finish, then the lifecycle action is completed"
                );
                let _ = t.notices.send(Notice::ScaleIn).await;
            }
            Ok(_) => {}
            Err(e) => failed = Some(e),
        }
    }
    if !seen.spot {
        match t.imds.get(notice::SPOT_ACTION).await {
            Ok(Some(body)) => match notice::spot_action(&body) {
                Ok(n) => {
                    seen.spot = true;
                    if let Notice::Spot { action, deadline } = &n {
                        tracing::warn!(
                            %action,
                            deadline = %humantime::format_rfc3339_seconds(*deadline),
                            "Spot interruption notice: draining; jobs still running {} before the deadline are stopped and reported Rsql.Interrupted",
                            humantime::format_duration(t.parts.settings.spot_stop_margin)
                        );
                    }
                    let _ = t.notices.send(n).await;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the Spot interruption notice"),
            },
            Ok(None) => {}
            Err(e) => failed = Some(e),
        }
    }
    if !seen.rebalance && !seen.spot {
        match t.imds.get(notice::REBALANCE).await {
            Ok(Some(_)) => {
                seen.rebalance = true;
                tracing::warn!("Spot rebalance recommendation: draining, so that an interruption finds no job running");
                let _ = t.notices.send(Notice::Rebalance).await;
            }
            Ok(None) => {}
            Err(e) => failed = Some(e),
        }
    }
    match failed {
        None => seen.read_failures = 0,
        Some(e) => {
            seen.read_failures += 1;
            // A lost read is retried at the next poll; only a run of them is worth a line.
            if seen.read_failures == 10 {
                tracing::warn!(error = %e, "cannot read the instance metadata; scale-in and Spot notices may be seen late");
            }
        }
    }
}

/// The terminating hooks to heartbeat and complete: `[fleet] lifecycle_hook`, else each of
/// the group's `EC2_INSTANCE_TERMINATING` hooks.
async fn find_hooks(parts: &FleetParts, group: &Group) -> Vec<String> {
    if let Some(hook) = &parts.settings.lifecycle_hook {
        return vec![hook.clone()];
    }
    match parts
        .autoscaling
        .describe_lifecycle_hooks()
        .auto_scaling_group_name(&group.name)
        .send()
        .await
    {
        Ok(out) => {
            let hooks: Vec<String> = out
                .lifecycle_hooks()
                .iter()
                .filter(|h| {
                    h.lifecycle_transition() == Some("autoscaling:EC2_INSTANCE_TERMINATING")
                })
                .filter_map(|h| h.lifecycle_hook_name().map(str::to_string))
                .collect();
            if hooks.is_empty() {
                tracing::info!(auto_scaling_group = %group.name, "the group has no terminating lifecycle hook: nothing to complete");
            }
            hooks
        }
        Err(e) => {
            tracing::warn!(
                auto_scaling_group = %group.name,
                error = %DisplayErrorContext(&e),
                "cannot list the group's lifecycle hooks; set [fleet] lifecycle_hook. The termination waits for the hook's timeout"
            );
            Vec::new()
        }
    }
}

async fn record_heartbeat(parts: &FleetParts, group: &Group, hooks: &[String]) {
    for hook in hooks {
        let sent = parts
            .autoscaling
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(&group.name)
            .lifecycle_hook_name(hook)
            .instance_id(&parts.instance_id)
            .send()
            .await;
        match sent {
            Ok(_) => tracing::debug!(lifecycle_hook = %hook, "lifecycle action heartbeat sent"),
            Err(e) => tracing::warn!(
                lifecycle_hook = %hook,
                error = %DisplayErrorContext(&e),
                "cannot heartbeat the lifecycle action; retrying at the next heartbeat"
            ),
        }
    }
}

/// `CompleteLifecycleAction` (`CONTINUE`) for each hook, with a few retries: the outcomes
/// are delivered, so the instance may go.
async fn complete(parts: &FleetParts, group: &Group, hooks: &[String]) {
    let policy = crate::aws::retry::RetryPolicy::default();
    for hook in hooks {
        for attempt in 0..COMPLETE_ATTEMPTS {
            let sent = parts
                .autoscaling
                .complete_lifecycle_action()
                .auto_scaling_group_name(&group.name)
                .lifecycle_hook_name(hook)
                .instance_id(&parts.instance_id)
                .lifecycle_action_result("CONTINUE")
                .send()
                .await;
            match sent {
                Ok(_) => {
                    tracing::info!(lifecycle_hook = %hook, "every outcome is delivered: completed the lifecycle action; the group terminates this instance");
                    break;
                }
                Err(e) if e.code() == Some("ValidationError") => {
                    // No action waits on this hook (it timed out, or there was none).
                    tracing::info!(lifecycle_hook = %hook, error = %DisplayErrorContext(&e), "no lifecycle action to complete");
                    break;
                }
                Err(e) => {
                    tracing::warn!(lifecycle_hook = %hook, attempt, error = %DisplayErrorContext(&e), "cannot complete the lifecycle action");
                    tokio::time::sleep(policy.delay(attempt)).await;
                }
            }
        }
    }
}

async fn set_protection(parts: &FleetParts, group: &Group, want: bool, p: &mut Protection) {
    let sent = parts
        .autoscaling
        .set_instance_protection()
        .auto_scaling_group_name(&group.name)
        .instance_ids(&parts.instance_id)
        .protected_from_scale_in(want)
        .send()
        .await;
    match sent {
        Ok(_) => {
            p.set(want);
            tracing::info!(
                protected = want,
                "{}",
                if want {
                    "jobs are running: protected this instance from scale-in"
                } else {
                    "idle: cleared this instance's scale-in protection"
                }
            );
        }
        Err(e) => {
            p.failed(Instant::now());
            tracing::warn!(protected = want, error = %DisplayErrorContext(&e), "cannot set this instance's scale-in protection; trying again later");
        }
    }
}
